"""Predictor-corrector guidance: CFG read as a DDIM predictor plus Langevin on the tilted density."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import check_int, check_number
from scorekit.guidance._common import Denoiser, check_denoiser, check_scale
from scorekit.samplers.common import GeneratorLike, emit, finish, prepare, randn_like, steps

__all__ = ["cfg_pc"]


def cfg_pc(
    cond: Denoiser,
    uncond: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    scale: float,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    n_corrector: int = 1,
    step: float = 1.0,
) -> Tensor:
    """Predictor-corrector guidance (PCG): a DDIM step of the conditional model, then Langevin
    steps on the tilted density ``q_sigma ∝ p_sigma(x | y)^w p_sigma(x)^(1 - w)``.

    Predictor (probability-flow Euler step of ``p(x | y)``, i.e. DDIM), ``i`` from 0:

        x <- D_c + (sigma_{i+1} / sigma_i) (x - D_c)

    then ``n_corrector`` Langevin steps at ``sigma_{i+1}`` on ``q``, whose score is CFG's
    ``g = (D_w - x) / sigma^2``, ``D_w = D_u + w (D_c - D_u)``:

        x <- x + eps g + sqrt(2 eps) z,      eps = step (sigma_i^2 - sigma_{i+1}^2) / 2

    The last step (to sigma = 0) is ``x = D_w``. Bradley & Nakkiran show that DDPM sampling with
    CFG of scale ``w`` is, to first order, this rule with one corrector step (``step = 1``) on the
    ``(2w - 1)``-powered density; more corrector steps bring the state at each ``sigma`` closer to
    ``q_sigma``, hence at the smallest sigma to the tilted target ``p(x|y)^w p(x)^(1-w)``.

    Args:
        cond, uncond: denoisers ``D(x [B, ...], sigma [B]) -> [B, ...]`` with the condition bound.
        x: ``[B, ...]`` at ``sigmas[0]``. sigmas: 1-D decreasing, ending in 0. scale: ``w >= 0``.
        generator: ``None``, one generator, or one per row (sample ``i`` then depends on it alone).
        n_corrector: ``C >= 0`` Langevin steps per level. step: ``> 0``, the corrector step relative
            to half the step in ``sigma^2``.

    Cost: ``(N - 1)(1 + 2C) + 2`` network evaluations for ``N = len(sigmas) - 1`` steps.

    References:
        Bradley & Nakkiran, "Classifier-Free Guidance is a Predictor-Corrector", 2024, Sec. 3 (PCG).
        Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, Alg. 2.
    """
    check_denoiser("cond", cond)
    check_denoiser("uncond", uncond)
    w = check_scale(scale)
    c = check_int("n_corrector", n_corrector, least=0)
    rel = check_number("step", step, low=0, low_ok=False)
    s, model_c = prepare(cond, x, sigmas)
    _, model_u = prepare(uncond, x, sigmas)
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d_c = model_c(x, s0)
        if s1 == 0:
            d_u = model_u(x, s0)
            d = d_u + w * (d_c - d_u)
            emit(callback, i, s0, x, d)
            x = d
            break
        emit(callback, i, s0, x, d_c)
        x = torch.lerp(d_c, x, s1 / s0)
        eps = rel * (s0 * s0 - s1 * s1) / 2
        for _ in range(c):
            d_c, d_u = model_c(x, s1), model_u(x, s1)
            g = (d_u + w * (d_c - d_u) - x) / (s1 * s1)
            x = x + eps * g + math.sqrt(2 * eps) * randn_like(x, generator)
    return finish(x)
