"""SVDD: derivative-free guidance by candidates kept according to a soft value."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import check_int, check_number
from scorekit.guidance._common import Denoiser, check_denoiser, refuse_preset_noise
from scorekit.samplers.common import GeneratorLike, emit, finish, prepare, randn_like, steps

__all__ = ["svdd"]


def _row_uniforms(b: int, generator: GeneratorLike, device) -> Tensor:
    """One uniform per row, from the row's own generator when given per row."""
    if generator is None or isinstance(generator, torch.Generator):
        where = device if generator is None else generator.device
        return torch.rand(b, generator=generator, dtype=torch.float64, device=where).to(device)
    return torch.cat(
        [torch.rand(1, generator=g, dtype=torch.float64, device=g.device) for g in generator]
    ).to(device)


def svdd(
    denoiser: Denoiser,
    reward: Callable[[Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    candidates: int = 4,
    alpha: float = 0.0,
) -> Tensor:
    """Soft value-based decoding: ``M`` DDPM candidates per step, one kept per row by its value.

    From ``x_i`` with ``D_i = D(x_i, sigma_i)``, ``M`` candidates are drawn by the DDPM ancestral
    step, ``x^(m) = D_i + (sigma_{i+1}^2 / sigma_i^2)(x_i - D_i) + sigma_{i+1} sqrt(1 - sigma_{i+1}^2 /
    sigma_i^2) z_m``, each is valued by the reward of its denoised estimate (SVDD-PM),
    ``v_m = r(D(x^(m), sigma_{i+1}))``, and one is kept with probability ``softmax_m(v_m / alpha)``
    (``alpha = 0``: the best). The kept candidate's ``D`` is the next step's ``D_i``; the step to
    sigma = 0 returns ``D_i``. It needs no gradient of ``r`` or of the network; it approximates
    sampling from ``p(x) exp(r(x) / alpha)``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]``.
        reward: ``r(x0 [B, ...]) -> [B]`` on clean data (need not be differentiable).
        x: ``[B, ...]`` at ``sigmas[0]``. sigmas: 1-D decreasing, ending in 0.
        generator: ``None``, one generator, or one per row (then row ``i`` depends on it alone).
        candidates: ``M >= 1`` (``M = 1`` is DDPM ancestral sampling). alpha: temperature ``>= 0``.

    Cost: ``1 + M (N - 1)`` network evaluations for ``N = len(sigmas) - 1`` steps (the candidates'
    evaluations are reused by the next step), and ``M (N - 1)`` reward evaluations.

    References:
        Li et al., "Derivative-Free Guidance in Continuous and Discrete Diffusion Models with Soft
        Value-Based Decoding", 2024, Alg. 1 (SVDD-PM).
    """
    check_denoiser("denoiser", denoiser)
    check_denoiser("reward", reward)
    refuse_preset_noise(generator, "svdd")
    m = check_int("candidates", candidates, least=1)
    a = check_number("alpha", alpha, low=0)
    s, model = prepare(denoiser, x, sigmas)
    b = x.shape[0]
    d = model(x, s[0])
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        r = 1.0 - (s1 * s1) / (s0 * s0)
        mean = torch.lerp(x, d, r)
        cands = [mean + s1 * math.sqrt(r) * randn_like(x, generator) for _ in range(m)]
        if m == 1:
            x, d = cands[0], model(cands[0], s1)
            continue
        flat = torch.cat(cands)  # [M B, ...], candidate-major
        d_all = torch.cat([model(c, s1) for c in cands])
        v = reward(d_all).reshape(m, b).double()
        if a == 0:
            pick = v.argmax(0)
        else:
            cdf = torch.softmax(v / a, dim=0).cumsum(0)
            u = _row_uniforms(b, generator, v.device)
            pick = (cdf < u[None]).sum(0).clamp(max=m - 1)
        idx = pick.to(x.device) * b + torch.arange(b, device=x.device)
        x, d = flat[idx], d_all[idx]
    return finish(x)
