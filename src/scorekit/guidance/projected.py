"""Guidance rules that reshape the CFG update by projections: APG and TCFG."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma, check_number
from scorekit.guidance._common import Denoiser, call, check_denoiser, check_scale, rowdot

__all__ = ["apg", "tcfg"]


def apg(
    cond: Denoiser,
    uncond: Denoiser,
    scale: float,
    *,
    eta: float = 0.0,
    norm_threshold: float = math.inf,
    momentum: float = -0.5,
) -> Denoiser:
    """Adaptive projected guidance: CFG's update split into parts parallel and orthogonal to ``D_c``.

    Per call, with ``D_c, D_u`` the two denoiser outputs and ``w = scale``:

        Delta = D_c - D_u
        A     = Delta + beta A_prev,  Delta <- A            (reverse momentum, beta = momentum)
        Delta <- Delta min(1, r / |Delta|)                   (rescaling, r = norm_threshold)
        Delta_par = (<Delta, D_c> / <D_c, D_c>) D_c,   Delta_orth = Delta - Delta_par
        D = D_c + (w - 1) (Delta_orth + eta Delta_par)

    norms and inner products per row over all non-batch dimensions. ``eta = 1, r = inf, beta = 0``
    is plain CFG.

    State: the running average ``A`` lives in this closure and is updated at *every* call (every
    network evaluation of the sampler, so a two-stage sampler advances it twice per step). Build a new
    ``apg(...)`` for each sampling call; reusing one across calls carries momentum over, and a batch
    of another shape is a ValueError.

    Args:
        cond, uncond: denoisers ``D(x [B, ...], sigma [B]) -> [B, ...]`` with the condition bound.
        scale: ``w >= 0``. eta: weight of the parallel part (paper: 0). norm_threshold: ``r > 0``
            (``inf``: no rescaling). momentum: ``beta`` in ``(-1, 1)`` (paper: negative, e.g. -0.5).

    Cost: 2 network evaluations per sampler call.

    References:
        Sadat et al., "Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion
        Models", ICLR 2025, Alg. 1.
    """
    check_denoiser("cond", cond)
    check_denoiser("uncond", uncond)
    w = check_scale(scale)
    eta = check_number("eta", eta)
    r = check_number("norm_threshold", norm_threshold, low=0, low_ok=False, finite=False)
    beta = check_number("momentum", momentum, low=-1, high=1, low_ok=False, high_ok=False)
    state: dict[str, Tensor] = {}

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = as_sigma(sigma, x)
        d_c = call("cond", cond, x, sigma)
        delta = d_c - call("uncond", uncond, x, sigma)
        if beta != 0:
            prev = state.get("avg")
            if prev is not None and prev.shape != delta.shape:
                raise ValueError(
                    f"apg: this closure holds momentum for a batch of shape {tuple(prev.shape)}, "
                    f"got x of shape {tuple(x.shape)}; build a new apg(...) per sampling call"
                )
            delta = delta if prev is None else delta + beta * prev
            state["avg"] = delta
        if math.isfinite(r):
            norm = delta.flatten(1).norm(dim=1).clamp(min=torch.finfo(x.dtype).tiny)
            delta = delta * append_dims((r / norm).clamp(max=1.0), x.ndim)
        coef = rowdot(delta, d_c) / rowdot(d_c, d_c).clamp(min=torch.finfo(x.dtype).tiny)
        par = append_dims(coef, x.ndim) * d_c
        return d_c + (w - 1) * (delta - par + eta * par)

    return guided


def tcfg(cond: Denoiser, uncond: Denoiser, scale: float) -> Denoiser:
    """Tangential damping CFG: keep only the part of the unconditional noise prediction that lies
    along the dominant direction shared with the conditional one.

    Per row, with ``eps = (x - D) / sigma`` (the paper works on noise predictions):

        M = [eps_c ; eps_u]  (2 x d),   v_1 = top right-singular vector of M
        eps_u' = <eps_u, v_1> v_1,      eps = eps_u' + w (eps_c - eps_u'),     D = x - sigma eps

    ``w = 1`` gives the conditional denoiser; when ``eps_c`` and ``eps_u`` are parallel it is CFG.
    At ``sigma = 0`` (no noise prediction) the row falls back to plain CFG on ``D``.

    Args:
        cond, uncond: denoisers ``D(x [B, ...], sigma [B]) -> [B, ...]``. scale: ``w >= 0``.

    Cost: 2 network evaluations per sampler call (plus a 2 x d SVD per row).

    References:
        Kwon et al., "TCFG: Tangential Damping Classifier-free Guidance", CVPR 2025.
    """
    check_denoiser("cond", cond)
    check_denoiser("uncond", uncond)
    w = check_scale(scale)

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = as_sigma(sigma, x)
        d_c = call("cond", cond, x, sigma)
        d_u = call("uncond", uncond, x, sigma)
        s = append_dims(sigma, x.ndim)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        e_c, e_u = (x - d_c) / safe, (x - d_u) / safe
        m = torch.stack([e_c.flatten(1), e_u.flatten(1)], dim=1)  # [B, 2, d]
        v1 = torch.linalg.svd(m, full_matrices=False).Vh[:, 0]  # [B, d]
        e_u = append_dims(rowdot(e_u, v1.reshape(x.shape)), x.ndim) * v1.reshape(x.shape)
        d = x - s * (e_u + w * (e_c - e_u))
        return torch.where(s > 0, d, d_u + w * (d_c - d_u))

    return guided
