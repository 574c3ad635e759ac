"""Out-of-distribution detection from a denoiser: multiscale score norms and a density on top.

For each of ``L`` noise levels ``sigma_i`` the feature of a point ``x`` is the log norm of the
noise-scaled score at ``x`` itself (Mahmood et al. 2021)::

    f_i(x) = log || sigma_i * grad log p_{sigma_i}(x) || = log || x - D(x, sigma_i) || - log sigma_i.

In-distribution points sit where the smoothed densities are high and their scores are moderate at
every scale; anomalies have scores that are too large (far from the data) or whose profile across
scales is unusual (shuffled pixels keep the pixel histogram but break the structure the small-sigma
scores see). A Gaussian mixture fitted to the standardised features of in-distribution data gives the
anomaly score ``-log q(f(x))`` (higher = more anomalous). The likelihood itself
(``-log_likelihood``) is the other per-example score; it can fail on OOD data of lower complexity
(Nalisnick et al. 2019), which is why the multiscale profile is offered as well. Graham et al. 2023
use reconstructions from several noise levels in the same spirit.

References:
    Mahmood, Lopez & Fleuret, "Multiscale Score Matching for Out-of-Distribution Detection",
    ICLR 2021 (Section 3: score norms at several noise levels, GMM on top).
    Graham, Pinaya, Tudosiu, Nachev, Ourselin & Cardoso, "Denoising diffusion models for
    out-of-distribution detection", CVPR Workshops 2023.
    Nalisnick, Matsukawa, Teh, Gorur & Lakshminarayanan, "Do Deep Generative Models Know What They
    Don't Know?", ICLR 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["OODDetector", "auroc", "score_norm_features"]


def _check_sigmas(sigmas) -> Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if s.numel() < 1 or not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"sigmas must be a non-empty list of finite values > 0; got {s.tolist()}")
    return s


@torch.no_grad()
def score_norm_features(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    batch: int = 512,
) -> Tensor:
    """``[B, L]`` features ``log || x - D(x, sigma_i) || - log sigma_i`` (module docstring)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError("x must be a floating-point tensor of shape [B, ...]")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()
        raise ValueError(f"x contains NaN or inf in rows {bad[:10].tolist()}")
    s = _check_sigmas(sigmas)
    feats = []
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch]
        cols = []
        for sig in s.tolist():
            sigma = torch.full((xb.shape[0],), sig, dtype=xb.dtype, device=xb.device)
            res = (xb - denoiser(xb, sigma)).reshape(xb.shape[0], -1)
            # the tiny floor keeps log finite if a denoiser reproduces x exactly
            cols.append(torch.log(res.double().norm(dim=1) + 1e-30) - math.log(sig))
        feats.append(torch.stack(cols, 1))
    return torch.cat(feats).cpu()


class OODDetector:
    """Multiscale score-norm features + a Gaussian mixture fitted on in-distribution data.

    Args:
        denoiser: ``D(x, sigma)`` of the in-distribution model.
        sigmas: noise levels of the features (default: 10 levels log-spaced from 0.01 to 10, for data
            of unit scale).
        n_components: mixture components (sklearn ``GaussianMixture``, full covariances).
        seed: the mixture fit's random state.

    ``fit(x_in)`` then ``score(x) -> [B]`` (higher = more anomalous).
    """

    def __init__(
        self,
        denoiser: Callable[[Tensor, Tensor], Tensor],
        sigmas: Sequence[float] | Tensor | None = None,
        *,
        n_components: int = 4,
        seed: int = 0,
    ):
        self.denoiser = denoiser
        self.sigmas = _check_sigmas(
            torch.logspace(-2, 1, 10, dtype=torch.float64) if sigmas is None else sigmas
        )
        if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1; got {n_components!r}")
        self.n_components, self.seed = n_components, seed
        self._gmm = None

    def features(self, x: Tensor) -> Tensor:
        """``[B, L]`` raw features (:func:`score_norm_features`)."""
        return score_norm_features(self.denoiser, x, self.sigmas)

    def fit(self, x_in: Tensor) -> OODDetector:
        """Fit the feature density on in-distribution points ``x_in`` ``[N, ...]``; returns ``self``."""
        from sklearn.mixture import GaussianMixture as SkGMM

        f = self.features(x_in).numpy()
        need = max(2 * self.n_components, len(self.sigmas) + 1)
        if f.shape[0] < need:
            raise ValueError(
                f"fit needs at least {need} in-distribution points for {self.n_components} "
                f"components on {len(self.sigmas)} features; got {f.shape[0]}"
            )
        self._mean, self._std = f.mean(0), f.std(0) + 1e-12
        self._gmm = SkGMM(
            self.n_components, covariance_type="full", reg_covar=1e-4, random_state=self.seed
        ).fit((f - self._mean) / self._std)
        return self

    def score(self, x: Tensor) -> Tensor:
        """Anomaly score ``-log q(standardised features)`` per row, ``[B]`` float64; higher = stranger."""
        if self._gmm is None:
            raise RuntimeError("call fit(x_in) on in-distribution data before score(x)")
        f = (self.features(x).numpy() - self._mean) / self._std
        return torch.as_tensor(-self._gmm.score_samples(f), dtype=torch.float64)


def auroc(scores_in: Tensor | np.ndarray, scores_out: Tensor | np.ndarray) -> float:
    """Area under the ROC curve for telling ``scores_out`` (positives) from ``scores_in``.

    Scores are "higher = more anomalous"; 1.0 is perfect separation, 0.5 chance. Equals the
    probability that a random out-of-distribution score exceeds a random in-distribution one (ties
    count half), computed with ``sklearn.metrics.roc_auc_score``.
    """
    from sklearn.metrics import roc_auc_score

    a = np.asarray(torch.as_tensor(scores_in).double().cpu()).reshape(-1)
    b = np.asarray(torch.as_tensor(scores_out).double().cpu()).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("auroc needs at least one score in each group")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("auroc scores must be finite")
    y = np.concatenate([np.zeros(a.size), np.ones(b.size)])
    return float(roc_auc_score(y, np.concatenate([a, b])))
