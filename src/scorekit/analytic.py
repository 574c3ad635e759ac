"""Exact denoisers: Gaussian, Gaussian mixture, empirical (a finite data set), Gaussian approximation.

For data ``x0 ~ p`` and ``x = x0 + sigma * noise`` these give the exact posterior mean
``D(x, sigma) = E[x0 | x]``, the exact score ``grad_x log p_sigma(x) = (D - x) / sigma**2`` (Tweedie),
exact samples of ``p`` and the exact log-density of the noised ``p_sigma = p * N(0, sigma**2 I)``.

For a mixture ``sum_k w_k N(m_k, C_k)`` the noised density is ``sum_k w_k N(m_k, C_k + sigma**2 I)``.
With ``C_k = U_k diag(lam_k) U_k^T`` and ``y_k = U_k^T (x - m_k)``, component ``k`` gives

    D_k(x) = m_k + U_k diag(lam_k / (lam_k + sigma**2)) y_k
    score_k(x) = -U_k diag(1 / (lam_k + sigma**2)) y_k

and the mixture weighs them by the posterior responsibilities ``softmax_k(log w_k + log N_k(x))``,
computed with log-sum-exp. The eigenbasis is computed once, so every sigma (0 to 1e3 and beyond) costs
the same and stays finite.

References:
    Efron, "Tweedie's Formula and Selection Bias", JASA 2011. Karras et al. 2022, Appendix B.3 (the ideal
    denoiser of a finite data set). Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score
    Approximation for Diffusion Models and its Applications", TMLR 2024.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scorekit._util import LOG_2PI, append_dims, as_sigma

__all__ = [
    "TARGETS",
    "Empirical",
    "GaussianMixture",
    "gaussian",
    "gaussian_approximation",
    "target",
]


def _flatten(x: Tensor, d: int, what: str = "x") -> Tensor:
    if x.ndim < 2 or x[0].numel() != d:
        raise ValueError(
            f"{what} must have shape [B, ...] with {d} values per row; got {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], d)


def _check_measurement(A, y, sigma_y, d: int, like: Tensor) -> tuple[Tensor, Tensor, float]:
    """Validate ``A`` ``[m, d]``, ``y`` ``[m]`` and ``sigma_y > 0`` for ``GaussianMixture.posterior``."""
    A = torch.as_tensor(A, dtype=like.dtype, device=like.device)
    if A.ndim != 2 or A.shape[1] != d:
        raise ValueError(f"A must have shape [m, d] with d = {d}; got {tuple(A.shape)}")
    y = torch.as_tensor(y, dtype=like.dtype, device=like.device)
    if y.shape != (A.shape[0],):
        raise ValueError(f"y must have shape [m] = [{A.shape[0]}] to match A; got {tuple(y.shape)}")
    if not (torch.isfinite(A).all() and torch.isfinite(y).all()):
        raise ValueError("A and y must be finite; got NaN or inf")
    ok = isinstance(sigma_y, (int, float)) and not isinstance(sigma_y, bool)
    if not (ok and math.isfinite(sigma_y) and sigma_y > 0):
        raise ValueError(f"sigma_y must be a finite number > 0; got {sigma_y!r}")
    return A, y, float(sigma_y) ** 2


class GaussianMixture:
    """A Gaussian mixture ``sum_k w_k N(m_k, C_k)`` with exact denoiser, score, samples and log-density.

    Args:
        means: ``[K, d]`` component means.
        covs: ``[K, d, d]`` full covariances or ``[K, d]`` diagonal variances; positive definite.
        weights: ``[K]`` non-negative, summing to one (default: uniform).

    The dtype of ``means`` (float32 or float64) is used throughout; inputs ``x`` are cast to it and
    results cast back, so float32 callers still get float64-accurate responsibilities if they build the
    mixture in float64.
    """

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | None = None):
        means = torch.as_tensor(means)
        if not means.is_floating_point():
            means = means.to(torch.get_default_dtype())
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d]; got {tuple(means.shape)}")
        k, d = means.shape
        covs = torch.as_tensor(covs, dtype=means.dtype, device=means.device)
        for what, v in (("means", means), ("covs", covs)):
            if not torch.isfinite(v).all():
                raise ValueError(f"{what} contains NaN or inf; allowed: finite values")
        if covs.shape == (k, d):
            self.full = False
            if not (covs > 0).all():
                bad = (covs <= 0).any(dim=1).nonzero().flatten().tolist()
                raise ValueError(f"covs: diagonal variances must be > 0; components {bad} are not")
            self.evals, self.evecs = covs.clone(), None
        elif covs.shape == (k, d, d):
            self.full = True
            if not torch.allclose(covs, covs.mT, rtol=1e-5, atol=1e-8):
                raise ValueError("covs must be symmetric [K, d, d] matrices")
            _, info = torch.linalg.cholesky_ex(covs)
            if (info != 0).any():
                bad = (info != 0).nonzero().flatten().tolist()
                raise ValueError(f"covs must be positive definite; components {bad} are not")
            self.evals, self.evecs = torch.linalg.eigh(covs)
            if (self.evals <= 0).any():
                raise ValueError("covs must be positive definite (an eigenvalue is <= 0)")
        else:
            raise ValueError(
                f"covs must have shape [K, d, d] = {[k, d, d]} (full) or [K, d] = {[k, d]} (diagonal); "
                f"got {tuple(covs.shape)}"
            )
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=means.dtype, device=means.device)
        weights = torch.as_tensor(weights, dtype=means.dtype, device=means.device)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape [K] = [{k}]; got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all():
            raise ValueError(f"weights must be finite; got {weights.tolist()}")
        if (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-5:
            raise ValueError(
                f"weights must be >= 0 and sum to 1; got sum {float(weights.sum()):.6g}"
            )
        self.means, self.covs, self.weights = means, covs, weights
        self.log_weights = torch.log(weights)
        self.k, self.dim = k, d

    # -- the noised mixture ---------------------------------------------------------------
    def _terms(self, x: Tensor, sigma: Tensor | float):
        """Per-component pieces at ``(x, sigma)``: log-joint ``[B, K]``, ``y`` and ``lam + sigma^2``."""
        xf = _flatten(x, self.dim).to(self.means.dtype)
        s2 = as_sigma(sigma, xf).square()
        diff = xf[:, None, :] - self.means[None]  # [B, K, d]
        y = torch.einsum("bkd,kde->bke", diff, self.evecs) if self.full else diff
        var = self.evals[None] + s2[:, None, None]  # [B, K, d]
        log_n = -0.5 * ((y.square() / var).sum(-1) + var.log().sum(-1) + self.dim * LOG_2PI)
        return log_n + self.log_weights, y, var

    def _back(self, y: Tensor) -> Tensor:  # eigenbasis -> data basis, per component
        return torch.einsum("bke,kde->bkd", y, self.evecs) if self.full else y

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """Exact ``log p_sigma(x)`` in nats, ``[B]``, of ``x`` ``[B, ...]`` under the noised mixture."""
        logits, _, _ = self._terms(x, sigma)
        return torch.logsumexp(logits, dim=1).to(x.dtype)

    def responsibilities(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Posterior component probabilities ``p(k | x)``, ``[B, K]``."""
        return torch.softmax(self._terms(x, sigma)[0], dim=1)

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact ``E[x0 | x]`` at noise level ``sigma`` (``[B]`` or scalar); shape of ``x``."""
        logits, y, var = self._terms(x, sigma)
        r = torch.softmax(logits, dim=1)
        per_k = self.means[None] + self._back(y * (self.evals[None] / var))
        return torch.einsum("bk,bkd->bd", r, per_k).reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact ``grad_x log p_sigma(x)``; finite at ``sigma = 0`` too."""
        logits, y, var = self._terms(x, sigma)
        r = torch.softmax(logits, dim=1)
        per_k = -self._back(y / var)
        return torch.einsum("bk,bkd->bd", r, per_k).reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples ``[n, d]`` (component by ``weights``, then ``m_k + U_k sqrt(lam_k) z``)."""
        dev = self.means.device
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype, device=dev)
        y = z * self.evals[idx].sqrt()
        if self.full:  # rotate per component: gathering evecs[idx] would cost n * d * d memory
            rotated = torch.empty_like(y)
            for k in idx.unique().tolist():
                rows = idx == k
                rotated[rows] = y[rows] @ self.evecs[k].T
            y = rotated
        return self.means[idx] + y

    # -- summaries --------------------------------------------------------------------------
    @property
    def mean(self) -> Tensor:
        """Mixture mean ``[d]``."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """Mixture covariance ``[d, d]``: ``sum_k w_k (C_k + m_k m_k^T) - m m^T``."""
        c = self.covs if self.full else torch.diag_embed(self.covs)
        second = torch.einsum(
            "k,kij->ij", self.weights, c + self.means[:, :, None] * self.means[:, None]
        )
        m = self.mean
        return second - torch.outer(m, m)

    def posterior(self, A: Tensor, y: Tensor, sigma_y: float) -> GaussianMixture:
        """The exact posterior ``p(x0 | y)`` for ``y = A x0 + sigma_y n``, ``n ~ N(0, I_m)``: a mixture.

        Component ``k`` is conditioned in closed form (the Kalman update, in Joseph form so the
        covariance stays symmetric positive definite), and its weight is multiplied by its evidence:

            S_k  = A C_k A^T + sigma_y^2 I          K_k = C_k A^T S_k^{-1}
            m_k' = m_k + K_k (y - A m_k)            C_k' = (I - K_k A) C_k (I - K_k A)^T + sigma_y^2 K_k K_k^T
            w_k' = softmax_k( log w_k + log N(y; A m_k, S_k) )            (log-sum-exp)

        Args:
            A: ``[m, d]`` measurement matrix (rows act on the flattened ``d`` coordinates).
            y: ``[m]`` one measurement.
            sigma_y: measurement noise standard deviation, finite and ``> 0``.

        Returns:
            A ``GaussianMixture`` with full covariances, in this mixture's dtype.

        References:
            Bishop, "Pattern Recognition and Machine Learning", 2006, eqs. 2.113-2.117 (linear-Gaussian
            conditioning). Kalman, "A New Approach to Linear Filtering and Prediction Problems", 1960.
        """
        A, y, s2 = _check_measurement(A, y, sigma_y, self.dim, self.means)
        c = self.covs if self.full else torch.diag_embed(self.covs)  # [K, d, d]
        eye_m = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        s = A @ c @ A.T + s2 * eye_m  # [K, m, m]
        chol = torch.linalg.cholesky(s)
        resid = y[None] - self.means @ A.T  # [K, m]
        white = torch.linalg.solve_triangular(chol, resid[:, :, None], upper=False)[..., 0]
        log_ev = -0.5 * (
            white.square().sum(-1)
            + 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            + A.shape[0] * LOG_2PI
        )
        gain = torch.cholesky_solve(A @ c, chol).mT  # C A^T S^{-1} = (S^{-1} A C)^T, [K, d, m]
        means = self.means + (gain @ resid[:, :, None])[..., 0]
        ika = torch.eye(self.dim, dtype=A.dtype, device=A.device) - gain @ A
        covs = ika @ c @ ika.mT + s2 * gain @ gain.mT
        covs = 0.5 * (covs + covs.mT)
        weights = torch.softmax(self.log_weights + log_ev, dim=0)
        return GaussianMixture(means, covs, weights)

    def to(self, dtype: torch.dtype | None = None, device=None) -> GaussianMixture:
        """A copy in another dtype or on another device."""
        kw = {"dtype": dtype, "device": device}
        return GaussianMixture(self.means.to(**kw), self.covs.to(**kw), self.weights.to(**kw))

    def __repr__(self) -> str:
        kind = "full" if self.full else "diagonal"
        return f"GaussianMixture(K={self.k}, d={self.dim}, {kind} covariances, {self.means.dtype})"


def gaussian(mean: Tensor, cov: Tensor) -> GaussianMixture:
    """A single Gaussian ``N(mean [d], cov [d, d] or [d])`` as a one-component mixture."""
    mean = torch.as_tensor(mean)
    cov = torch.as_tensor(cov, dtype=mean.dtype)
    return GaussianMixture(mean[None], cov[None])


def gaussian_approximation(data: Tensor, *, jitter: float = 1e-6) -> GaussianMixture:
    """The Gaussian with the mean and covariance of ``data`` ``[N, ...]`` (flattened per row).

    ``jitter * mean variance`` is added to the diagonal so a rank-deficient data set (more dimensions
    than rows, constant pixels) still gives a positive definite covariance.
    """
    flat = data.reshape(data.shape[0], -1).to(torch.float64)
    if flat.shape[0] < 2:
        raise ValueError(f"data needs at least 2 rows for a covariance; got {flat.shape[0]}")
    mean = flat.mean(0)
    cov = torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])
    scale = float(cov.diagonal().mean()) or 1.0
    cov = cov + jitter * scale * torch.eye(flat.shape[1], dtype=torch.float64)
    return gaussian(mean, cov)


class Empirical:
    """The optimal denoiser of a finite data set ``{y_i}`` (uniform weights): a mixture of deltas.

    ``D(x, sigma) = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i``; at ``sigma = 0`` its limit, the
    nearest data point. ``log_prob`` is defined for ``sigma > 0`` (Karras et al. 2022, eq. 57).

    Args:
        data: ``[N, ...]`` the training set; rows of any shape (images too).
        chunk: rows of ``x`` processed at once (bounds memory at ``chunk * N``).
    """

    def __init__(self, data: Tensor, *, chunk: int = 1024):
        data = torch.as_tensor(data)
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape [N, ...] with N >= 1; got {tuple(data.shape)}")
        if not data.is_floating_point():
            data = data.to(torch.get_default_dtype())
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or inf; allowed: finite values")
        self.data = data
        self.flat = data.reshape(data.shape[0], -1)
        self.sq_norms = self.flat.square().sum(1)
        self.dim = self.flat.shape[1]
        self.chunk = chunk

    def _sq_dists(self, xf: Tensor) -> Tensor:
        """``|x_b - y_i|^2`` ``[b, N]`` via the expansion, clamped at 0 against rounding."""
        d2 = xf.square().sum(1, keepdim=True) - 2 * xf @ self.flat.T + self.sq_norms[None]
        return d2.clamp(min=0)

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact ``E[x0 | x]`` under the empirical distribution; shape of ``x``."""
        xf = _flatten(x, self.dim).to(self.flat.dtype)
        s = as_sigma(sigma, xf)
        out = torch.empty_like(xf)
        for i in range(0, xf.shape[0], self.chunk):
            xs, ss = xf[i : i + self.chunk], s[i : i + self.chunk]
            zero = ss == 0
            # softmax_i(-|x - y_i|^2 / (2 sigma^2)); |x|^2 is constant per row and dropped, and the
            # row is shifted so the nearest point has logit 0 and the others are <= 0 (-inf when
            # sigma^2 underflows): no row is ever all -inf, so no NaN at any sigma.
            d2 = self.sq_norms[None] - 2 * xs @ self.flat.T
            d2 = d2 - d2.min(dim=1, keepdim=True).values
            s2 = ss.square().clamp(min=torch.finfo(ss.dtype).tiny)
            w = torch.softmax(-d2 / (2 * s2[:, None]), dim=1)
            out[i : i + self.chunk] = w @ self.flat
            if zero.any():
                nearest = torch.cdist(xs[zero], self.flat).argmin(dim=1)
                out[i : i + self.chunk][zero] = self.flat[nearest]
        return out.reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``(D - x) / sigma**2``; requires ``sigma > 0`` (the data distribution has no density)."""
        s = as_sigma(sigma, x)
        if (s == 0).any():
            raise ValueError("sigma must be > 0 for the score of an empirical distribution")
        return (self.denoise(x, s) - x) / append_dims(s, x.ndim) ** 2

    def log_prob(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``log (1/N) sum_i N(x; y_i, sigma^2 I)`` in nats, ``[B]``; requires ``sigma > 0``."""
        xf = _flatten(x, self.dim).to(self.flat.dtype)
        s = as_sigma(sigma, xf)
        if (s == 0).any():
            raise ValueError("sigma must be > 0 for log_prob of an empirical distribution")
        out = []
        for i in range(0, xf.shape[0], self.chunk):
            xs, ss = xf[i : i + self.chunk], s[i : i + self.chunk]
            logits = -self._sq_dists(xs) / (2 * ss[:, None] ** 2)
            norm = -0.5 * self.dim * (LOG_2PI + 2 * ss.log()) - math.log(self.flat.shape[0])
            out.append(torch.logsumexp(logits, dim=1) + norm)
        return torch.cat(out).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` rows drawn uniformly with replacement, ``[n, ...]``."""
        idx = torch.randint(
            0, self.data.shape[0], (n,), generator=generator, device=self.data.device
        )
        return self.data[idx]


# -- built-in exact targets -------------------------------------------------------------------


def _unit_scale(means: Tensor, covs: Tensor, weights: Tensor | None = None) -> GaussianMixture:
    """Centre a mixture and scale it so its average per-dimension variance is 1."""
    gm = GaussianMixture(means, covs, weights)
    scale = gm.covariance.diagonal().mean().sqrt()
    return GaussianMixture((means - gm.mean) / scale, covs / scale**2, gm.weights)


def _ring8(g: torch.Generator) -> GaussianMixture:
    # 8 Gaussians of std 0.1 on a circle of radius sqrt(2 * 0.99): per-dimension variance exactly 1.
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    r = math.sqrt(2 * (1 - 0.01))
    means = r * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianMixture(means, torch.full((8, 2), 0.01, dtype=torch.float64))


def _checker(g: torch.Generator) -> GaussianMixture:
    # The 8 dark squares of a 4x4 board, each a flat-ish Gaussian filling its square.
    centres = [(i - 1.5, j - 1.5) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    means = torch.tensor(centres, dtype=torch.float64)
    return _unit_scale(means, torch.full((8, 2), 0.3**2, dtype=torch.float64))


def _swiss(g: torch.Generator) -> GaussianMixture:
    # 16 elongated Gaussians along a swiss-roll spiral, each stretched along the spiral's tangent.
    th = torch.linspace(1.5 * math.pi, 4.5 * math.pi, 16, dtype=torch.float64)
    means = torch.stack([th * th.cos(), th * th.sin()], 1)
    tangent = torch.stack([th.cos() - th * th.sin(), th.sin() + th * th.cos()], 1)
    tangent = tangent / tangent.norm(dim=1, keepdim=True)
    normal = torch.stack([-tangent[:, 1], tangent[:, 0]], 1)
    covs = (
        1.2**2 * tangent[:, :, None] * tangent[:, None]
        + 0.35**2 * normal[:, :, None] * normal[:, None]
    )
    return _unit_scale(means, covs)


def _gmm64(g: torch.Generator) -> GaussianMixture:
    # 16 components in 64-D, random full covariances (Wishart-like, well conditioned), unequal weights.
    k, d = 16, 64
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) / math.sqrt(2 * d)
    scales = 0.05 + 0.25 * torch.rand(k, 1, 1, generator=g, dtype=torch.float64)
    covs = scales * (a @ a.mT + 0.1 * torch.eye(d, dtype=torch.float64))
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return _unit_scale(means, covs, w / w.sum())


#: Built-in exact targets: name -> builder from a seeded generator. All are centred, unit-scale.
TARGETS = {"ring8": _ring8, "checker": _checker, "swiss": _swiss, "gmm64": _gmm64}


def target(name: str, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> GaussianMixture:
    """A built-in exact target by name (``ring8``, ``checker``, ``swiss``, ``gmm64``), seeded."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; allowed: {sorted(TARGETS)}")
    g = torch.Generator().manual_seed(seed)
    return TARGETS[name](g).to(dtype=dtype)
