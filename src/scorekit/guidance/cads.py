"""CADS: condition-annealed sampling (noise on the condition embedding, annealed over sigma)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma, check_number
from scorekit.guidance._common import Denoiser, call, check_denoiser
from scorekit.samplers.common import GeneratorLike, randn_like

__all__ = ["cads"]


def _row_mean_std(v: Tensor) -> tuple[Tensor, Tensor]:
    flat = v.flatten(1)
    return flat.mean(1), flat.std(1, correction=0)


def cads(
    denoiser: Denoiser,
    embedding: Tensor,
    *,
    sigma_lo: float,
    sigma_hi: float,
    noise_scale: float = 0.25,
    psi: float = 1.0,
    key: str = "cond",
    generator: GeneratorLike = None,
) -> Denoiser:
    """Condition-annealed sampling: call ``denoiser(x, sigma, **{key: c_hat})`` with a noisy condition.

    Per call and row, with ``c`` the condition embedding and ``n ~ N(0, I)`` fresh noise:

        gamma(sigma) = 1 for sigma <= sigma_lo, 0 for sigma >= sigma_hi, linear in log sigma between
        c_hat = sqrt(gamma) c + noise_scale sqrt(1 - gamma) n
        c_res = (c_hat - mean(c_hat)) / std(c_hat) * std(c) + mean(c)     (per row, over the embedding)
        c_hat <- psi c_res + (1 - psi) c_hat

    The paper anneals linearly in its time ``t`` between ``tau_1`` and ``tau_2``; in the sigma frame
    the thresholds are noise levels and the ramp is linear in ``log sigma``.

    What it needs from a network: a denoiser that takes the condition as a float tensor keyword
    ``key`` of shape ``[B, ...]`` (an embedding, not an integer label), e.g.
    ``lambda x, sigma, cond: net_denoiser(x, sigma, embedding=cond)``. scorekit's own nets take it as
    ``class_embedding`` (``scorekit.nets``): ``cads(run_denoiser, net.class_emb.embed(labels),
    key="class_embedding", ...)``. Compose with CFG as ``cfg(cads(cond_net, c, ...), uncond, w)``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **{key: [B, ...]}) -> [B, ...]``.
        embedding: ``[1, E...]`` (shared by every row) or ``[B, E...]``, a float tensor.
        sigma_lo, sigma_hi: ``0 < sigma_lo < sigma_hi``. noise_scale: ``s >= 0`` (0: CADS off, the
            plain condition ``c`` at every sigma). psi: in ``[0, 1]``.
        generator: ``None``, one generator, or one per row (then row ``i``'s noise is its own).

    Cost: 1 network evaluation per sampler call.

    References:
        Sadat et al., "CADS: Unleashing the Diversity of Diffusion Models through Condition-Annealed
        Sampling", ICLR 2024, eqs. 4-6.
    """
    check_denoiser("denoiser", denoiser)
    if not isinstance(embedding, Tensor) or not embedding.is_floating_point() or embedding.ndim < 2:
        got = tuple(embedding.shape) if isinstance(embedding, Tensor) else type(embedding).__name__
        raise ValueError(f"embedding must be a float tensor [B or 1, E...]; got {got}")
    lo = check_number("sigma_lo", sigma_lo, low=0, low_ok=False)
    hi = check_number("sigma_hi", sigma_hi, low=lo, low_ok=False, what=" (must exceed sigma_lo)")
    s = check_number("noise_scale", noise_scale, low=0)
    psi = check_number("psi", psi, low=0, high=1)

    def annealed(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = as_sigma(sigma, x)
        c = embedding.to(device=x.device, dtype=x.dtype)
        if c.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"embedding must have shape [B, ...] or [1, ...] with B = {x.shape[0]}; "
                f"got {tuple(c.shape)}"
            )
        c = c.expand(x.shape[0], *c.shape[1:])
        if s == 0:  # CADS off: the plain condition (the formula's 0/0 at gamma = 0 is avoided)
            return call("denoiser", denoiser, x, sigma, **{key: c})
        t = (math.log(hi) - sigma.clamp(min=lo).log()) / (math.log(hi) - math.log(lo))
        g = append_dims(t.clamp(0, 1), c.ndim)
        c_hat = g.sqrt() * c + s * (1 - g).sqrt() * randn_like(c, generator)
        if psi > 0 and c[0].numel() > 1:
            m_hat, s_hat = _row_mean_std(c_hat)
            m, sd = _row_mean_std(c)
            tiny = torch.finfo(c.dtype).tiny
            res = (c_hat - append_dims(m_hat, c.ndim)) / append_dims(s_hat.clamp(min=tiny), c.ndim)
            res = res * append_dims(sd, c.ndim) + append_dims(m, c.ndim)
            c_hat = psi * res + (1 - psi) * c_hat
        return call("denoiser", denoiser, x, sigma, **{key: c_hat})

    return annealed
