"""Reward guidance on Tweedie's estimate (universal guidance, forward step)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma
from scorekit.guidance._common import Denoiser, check_denoiser, check_scale

__all__ = ["reward_guidance"]


def reward_guidance(
    denoiser: Denoiser, reward: Callable[[Tensor], Tensor], scale: float
) -> Denoiser:
    """Gradient guidance by a differentiable reward on the denoised estimate:

        D_g(x, sigma) = D(x, sigma) + w sigma^2 grad_x r(D(x, sigma))

    i.e. the score gains ``w grad_x r(D(x, sigma))``, the gradient taken *through* the denoiser
    (``J_D(x)^T grad r``). With a loss ``l = -r`` this is universal guidance's forward step; it needs
    no noise-conditional model of the reward, only ``r`` on clean data.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]``, differentiable in ``x``.
        reward: ``r(x0 [B, ...]) -> [B]``, differentiable (a log-likelihood, a classifier's
            log-probability on clean data, a negative distance to a target).
        scale: ``w >= 0``.

    Cost: 1 network evaluation plus 1 backward pass through the network per sampler call (the
    gradient is taken even when the sampler runs under ``no_grad`` or ``inference_mode``).

    References:
        Bansal et al., "Universal Guidance for Diffusion Models", ICLR 2024, eq. 6 (forward guidance).
        Chung et al., "Diffusion Posterior Sampling for General Noisy Inverse Problems", ICLR 2023.
    """
    check_denoiser("denoiser", denoiser)
    check_denoiser("reward", reward)
    w = check_scale(scale)

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = as_sigma(sigma, x)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            d = denoiser(xg, sigma.clone())
            if not isinstance(d, Tensor) or d.shape != x.shape:
                got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
                raise ValueError(
                    f"denoiser must return a tensor of x's shape {tuple(x.shape)}; got {got}"
                )
            r = reward(d)
            if not isinstance(r, Tensor) or r.shape != (x.shape[0],):
                got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
                raise ValueError(
                    f"reward must return a tensor of shape [B] = [{x.shape[0]}]; got {got}"
                )
            (grad,) = torch.autograd.grad(r.sum(), xg)
        out = d.detach() + w * append_dims(sigma.square(), x.ndim) * grad.to(x.dtype)
        return out

    return guided
