"""Classifier-free guidance with CFG-rescale and a guidance interval; autoguidance; dynamic
thresholding. Each returns a denoiser built from denoisers (STYLE 5)."""

from __future__ import annotations

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma, check_number
from scorekit.guidance._common import (
    Denoiser,
    call,
    check_denoiser,
    check_interval,
    check_scale,
)

__all__ = ["autoguidance", "cfg", "dynamic_threshold"]


def _row_std(v: Tensor) -> Tensor:
    return v.flatten(1).std(dim=1, correction=0)


def combine(d_c: Tensor, d_u: Tensor, scale: float, rescale: float) -> Tensor:
    """``D_u + w (D_c - D_u)``, then CFG-rescale by ``phi = rescale`` (see ``cfg``)."""
    g = d_u + scale * (d_c - d_u)
    if rescale == 0:
        return g
    tiny = torch.finfo(g.dtype).tiny
    ratio = _row_std(d_c) / _row_std(g).clamp(min=tiny)
    return torch.lerp(g, g * append_dims(ratio, g.ndim), rescale)


def cfg(
    cond: Denoiser,
    uncond: Denoiser,
    scale: float,
    *,
    rescale: float = 0.0,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Classifier-free guidance: the denoiser ``D_w = D_u + w (D_c - D_u)``.

    With ``w = scale``, ``D_c = cond(x, sigma)`` and ``D_u = uncond(x, sigma)``. In score terms
    ``grad log p_w = w grad log p_sigma(x | y) + (1 - w) grad log p_sigma(x)``: ``w = 1`` is the
    conditional denoiser, ``w = 0`` the unconditional one. The sampled distribution is *not* the
    tilted target ``p(x|y)^w p(x)^(1-w)`` for ``w != 0, 1`` (see ``fk_smc`` for a rule that is).

    CFG-rescale (``rescale = phi`` in [0, 1]), applied per row to the denoiser output (Lin et al.
    apply it to their network's v-prediction; the denoiser is scorekit's model-independent choice):

        D_r = D_w * std(D_c) / std(D_w),        D = phi D_r + (1 - phi) D_w

    with ``std`` over all non-batch dimensions of one row.

    Guidance interval ``(lo, hi)``: rows with ``lo < sigma <= hi`` get ``D_w``; the other rows get
    ``D_c`` from the one ``cond`` call, and ``uncond`` is called only on the rows inside (not at all
    when no row is inside).

    Autoguidance is this rule with a weaker model of the same condition as ``uncond``.

    Args:
        cond, uncond: denoisers ``D(x [B, ...], sigma [B]) -> [B, ...]`` with the condition bound.
        scale: ``w >= 0``, finite.
        rescale: ``phi`` in ``[0, 1]`` (0: off).
        interval: ``None`` (guide everywhere) or ``(sigma_lo, sigma_hi)``, ``0 <= lo < hi <= inf``.

    Cost: 2 network evaluations per sampler call (1 for a call whose rows are all outside the interval).

    References:
        Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022.
        Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024, Sec. 3.4.
        Kynkäänniemi et al., "Applying Guidance in a Limited Interval Improves Sample and Distribution
        Quality in Diffusion Models", NeurIPS 2024.
    """
    check_denoiser("cond", cond)
    check_denoiser("uncond", uncond)
    w = check_scale(scale)
    phi = check_number("rescale", rescale, low=0, high=1)
    bounds = check_interval(interval)

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = as_sigma(sigma, x)
        d_c = call("cond", cond, x, sigma)
        if bounds is None:
            return combine(d_c, call("uncond", uncond, x, sigma), w, phi)
        inside = (sigma > bounds[0]) & (sigma <= bounds[1])
        n_in = int(inside.sum())  # one host read per call: decides whether uncond runs at all
        if n_in == 0:
            return d_c
        if n_in == x.shape[0]:
            return combine(d_c, call("uncond", uncond, x, sigma), w, phi)
        d_u = call("uncond", uncond, x[inside], sigma[inside])
        out = d_c.clone()
        out[inside] = combine(d_c[inside], d_u, w, phi)
        return out

    return guided


def autoguidance(
    cond: Denoiser,
    weak: Denoiser,
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Autoguidance: ``D = D_weak + w (D_c - D_weak)`` with a weaker model of the *same* condition.

    This is ``cfg(cond, weak, scale, interval=interval)``: only the second model changes (an
    earlier checkpoint or a smaller network of the same run, conditioned on the same ``y``). Its
    output must have ``x``'s shape (a one-line error otherwise).

    Cost: 2 network evaluations per sampler call (1 of them by the weak model).

    References:
        Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024, eq. 2.
    """
    return cfg(cond, weak, scale, interval=interval)


def dynamic_threshold(
    denoiser: Denoiser, *, percentile: float = 0.995, max_value: float = 1.0
) -> Denoiser:
    """Dynamic thresholding of the denoiser output, for data in ``[-max_value, max_value]`` (images).

    Per row, ``s = max(quantile_p(|D|), max_value)`` and ``D <- clamp(D, -s, s) * max_value / s``
    (``max_value = 1`` is Imagen's rule; the ``max_value`` form is DPM-Solver++'s). Wrap a guided
    denoiser with it: ``dynamic_threshold(cfg(cond, uncond, 7.5))``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]``.
        percentile: ``p`` in ``(0, 1]``. max_value: the data's bound, ``> 0``.

    Cost: the wrapped denoiser's (no extra network evaluation).

    References:
        Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language
        Understanding" (Imagen), NeurIPS 2022, Sec. 2.3. Lu et al., "DPM-Solver++", 2022, Sec. 4.
    """
    check_denoiser("denoiser", denoiser)
    p = check_number("percentile", percentile, low=0, high=1, low_ok=False)
    m = check_number("max_value", max_value, low=0, low_ok=False)

    def thresholded(x: Tensor, sigma: Tensor | float) -> Tensor:
        d = call("denoiser", denoiser, x, as_sigma(sigma, x))
        s = torch.quantile(d.flatten(1).abs(), p, dim=1).clamp(min=m)
        s = append_dims(s, d.ndim)
        return torch.maximum(torch.minimum(d, s), -s) * (m / s)

    return thresholded
