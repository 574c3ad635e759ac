"""Minority sampling: steer towards samples the model reconstructs badly.

Two ways (both Um et al.):

* ``minority_guidance``: self-guided, training-free (climbs the reconstruction loss of the sample's
  own denoised estimate at every call).
* With a trained minority classifier ("Don't Play Favorites"): ``minority_score`` gives every
  training point its Tweedie reconstruction loss, ``minority_levels`` cuts the scores into ``L``
  quantile levels, ``scorekit.train.classifier.train_classifier(..., labels=levels)`` (or
  ``scorekit train-classifier --minority-of RUN --levels L``) trains the noise-conditional classifier
  on them, and ``classifier_guidance`` towards level ``L - 1`` (the rarest) samples minorities.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma, check_int, check_number
from scorekit.guidance._common import Denoiser, check_denoiser, check_scale
from scorekit.samplers.common import GeneratorLike, randn_like, row_generators

__all__ = ["minority_guidance", "minority_levels", "minority_score"]


def minority_guidance(
    denoiser: Denoiser,
    scale: float,
    *,
    sigma_probe: float,
    generator: GeneratorLike = None,
) -> Denoiser:
    """Self-guided minority sampling: climb a reconstruction loss of the denoised estimate.

    Per call, with ``x0 = D(x, sigma)`` and fresh noise ``z``, the re-noised estimate is denoised
    again at the probe level ``s = sigma_probe`` and the discrepancy is the minority score

        L(x) = |x0 - D(x0 + s z, s)|^2,          D_g = x0 + w sigma^2 grad_x L(x)

    (the gradient taken through both denoiser calls). ``L`` is large where the model's posterior mean
    is unstable, i.e. in low-density regions (the paper relates it to a negative ELBO), so ``w > 0``
    pushes samples towards minority features. The paper measures the discrepancy with LPIPS on
    images; here it is the squared Euclidean distance, for any data.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]``, differentiable in ``x``.
        scale: ``w >= 0`` (0: the denoiser itself). sigma_probe: ``s > 0``.
        generator: ``None``, one generator, or one per row for the probe noise.

    Cost: 2 network evaluations plus a backward pass through both per sampler call.

    References:
        Um & Ye, "Self-Guided Generation of Minority Samples Using Diffusion Models", ECCV 2024.
        Um et al., "Don't Play Favourites: Minority Guidance for Diffusion Models", ICLR 2024 (the
        minority score, there with a trained classifier on its levels).
    """
    check_denoiser("denoiser", denoiser)
    w = check_scale(scale)
    s = check_number("sigma_probe", sigma_probe, low=0, low_ok=False)

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = as_sigma(sigma, x)
        z = randn_like(x, generator)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            x0 = denoiser(xg, sigma.clone())
            if not isinstance(x0, Tensor) or x0.shape != x.shape:
                got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
                raise ValueError(
                    f"denoiser must return a tensor of x's shape {tuple(x.shape)}; got {got}"
                )
            probe = torch.full_like(sigma, s)
            again = denoiser(x0 + s * z.clone(), probe)
            loss = (x0 - again).flatten(1).square().sum(1)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
        return x0.detach() + w * append_dims(sigma.square(), x.ndim) * grad.to(x.dtype)

    return guided


def minority_score(
    denoiser: Denoiser,
    x0: Tensor,
    *,
    sigma: float,
    draws: int = 5,
    seed: int = 0,
    batch: int = 512,
) -> Tensor:
    """The minority score of each data point: its Tweedie reconstruction loss at noise level ``sigma``.

        l(x0) = (1 / K) sum_k |D(x0 + sigma z_k, sigma) - x0|^2,      z_k ~ N(0, I)

    Tweedie's estimate ``D`` is pulled towards the data's high-density regions, so points in
    low-density regions reconstruct badly and score high. The paper measures the distance with LPIPS
    on images and averages over noise draws (5 in the authors' release, at ADM's linear schedule
    ``t = 600 / 1000``, i.e. ``sigma ~ 6.2`` for data in [-1, 1]); here it is the squared Euclidean
    distance (summed over features), for any data. For a Gaussian ``N(m, v I)`` in ``d`` dimensions
    with the exact denoiser, ``E_z l(x0) = (s^2 / (v + s^2))^2 |x0 - m|^2 + d v^2 s^2 / (v + s^2)^2``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]`` (e.g. a run's unconditional branch).
        x0: the data points ``[N, ...]``. sigma: the noise level ``s > 0``.
        draws: noise draws ``K`` averaged per point. seed: row ``i``'s noise depends only on
            ``(seed, i)``, never on ``batch``. batch: rows per denoiser call.

    Returns: ``[N]`` scores in ``x0``'s dtype. Cost: ``K N`` network evaluations, no backward pass.

    References:
        Um, Lee & Ye, "Don't Play Favorites: Minority Guidance for Diffusion Models", ICLR 2024,
        Sec. 3.2 (the minority score).
    """
    check_denoiser("denoiser", denoiser)
    s = check_number("sigma", sigma, low=0, low_ok=False)
    draws = check_int("draws", draws, most=10_000)
    batch = check_int("batch", batch)
    if not isinstance(x0, Tensor) or x0.ndim < 2 or not x0.is_floating_point():
        got = f"{x0.dtype} {tuple(x0.shape)}" if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a float tensor [N, ...] with N >= 1; got {got}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 must be finite; it has NaN or infinite entries")
    out = []
    for start in range(0, x0.shape[0], batch):
        x = x0[start : start + batch]
        gens = row_generators(seed, range(start, start + x.shape[0]), x.device)
        sig = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for _ in range(draws):
                rec = denoiser(x + s * randn_like(x, gens), sig)
                total += (rec - x).flatten(1).double().square().sum(1)
        out.append(total / draws)
    return torch.cat(out).to(x0.dtype)


def minority_levels(scores: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Cut minority scores into ``levels`` quantile levels: ``(labels [N] int64, edges [levels - 1])``.

    ``edges[j]`` is the ``(j + 1) / L`` quantile of ``scores``; a score in ``(edges[j - 1], edges[j]]``
    gets level ``j`` (level 0: the most common points, level ``L - 1``: the rarest), so each level
    holds a fraction ``1 / L`` of the points up to ties (the authors' quantile thresholds).
    """
    levels = check_int("levels", levels, least=2, most=1000)
    if not isinstance(scores, Tensor) or scores.ndim != 1 or not scores.is_floating_point():
        got = (
            f"{scores.dtype} {tuple(scores.shape)}"
            if isinstance(scores, Tensor)
            else type(scores).__name__
        )
        raise ValueError(f"scores must be a 1-D float tensor [N]; got {got}")
    if scores.numel() < levels:
        raise ValueError(f"scores: {scores.numel()} points cannot fill levels={levels} levels")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite; they have NaN or infinite entries")
    q = torch.arange(1, levels, dtype=torch.float64, device=scores.device) / levels
    edges = torch.quantile(scores.double(), q).to(scores.dtype)
    labels = torch.searchsorted(edges.contiguous(), scores.contiguous(), right=False)
    return labels.long(), edges
