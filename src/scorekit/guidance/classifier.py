"""Classifier guidance: add the gradient of a noise-conditional classifier to the denoiser."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma
from scorekit.guidance._common import Denoiser, call, check_denoiser, check_scale

__all__ = ["classifier_guidance"]


def classifier_guidance(
    denoiser: Denoiser, log_prob: Callable[[Tensor, Tensor], Tensor], scale: float
) -> Denoiser:
    """Classifier guidance: ``D = D_u + w sigma^2 grad_x log p(y | x, sigma)``.

    By Tweedie, ``grad log p_sigma(x | y) = grad log p_sigma(x) + grad log p(y | x, sigma)``, so
    with the exact unconditional denoiser and the exact noisy classifier, ``w = 1`` gives the exact
    conditional denoiser; ``w`` tilts towards ``p_sigma(x) p(y | x, sigma)^w``.

    Args:
        denoiser: the unconditional ``D_u(x [B, ...], sigma [B]) -> [B, ...]``.
        log_prob: ``(x [B, ...], sigma [B]) -> [B]``, ``log p(y | x, sigma)`` for the bound class
            ``y``, differentiable in ``x`` (e.g. ``ClassMixture.classifier(y)`` or a trained
            noise-conditional classifier's log-softmax column).
        scale: ``w >= 0``.

    Cost: 1 denoiser evaluation plus 1 classifier forward and backward pass per sampler call.

    References:
        Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021, Sec. 4.
        Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, Sec. 5 / App. I.
    """
    check_denoiser("denoiser", denoiser)
    check_denoiser("log_prob", log_prob)
    w = check_scale(scale)

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = as_sigma(sigma, x)
        d = call("denoiser", denoiser, x, sigma)
        # the gradient is taken even when sampling runs under no_grad or inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            lp = log_prob(xg, sigma.clone())
            if not isinstance(lp, Tensor) or lp.shape != (x.shape[0],):
                got = tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__
                raise ValueError(
                    f"log_prob must return a tensor of shape [B] = [{x.shape[0]}]; got {got}"
                )
            (grad,) = torch.autograd.grad(lp.sum(), xg)
        return d + w * append_dims(sigma.square(), x.ndim) * grad.to(x.dtype)

    return guided
