"""Self-guided minority sampling: steer towards samples the model reconstructs badly."""

from __future__ import annotations

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma, check_number
from scorekit.guidance._common import Denoiser, check_denoiser, check_scale
from scorekit.samplers.common import GeneratorLike, randn_like

__all__ = ["minority_guidance"]


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
