"""DiffPIR: plug-and-play posterior sampling by a proximal data step on the denoiser's estimate."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.inverse.common import (
    check_option,
    check_problem,
    finish_watched,
    gram_solve,
    solver,
    watch,
)
from scorekit.inverse.operators import Operator
from scorekit.samplers.common import GeneratorLike, emit, prepare, randn_like, steps

__all__ = ["diffpir"]


@solver(nfe=lambda n, o: n, vjp=lambda n, o: 0)
def diffpir(
    denoiser: Callable,
    y: Tensor,
    operator: Operator,
    x: Tensor,
    sigmas: Tensor,
    *,
    sigma_y: float,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    lam: float = 1.0,
    zeta: float = 0.3,
) -> Tensor:
    """Denoising diffusion models for plug-and-play image restoration (DiffPIR).

    From ``x`` at ``s0`` to ``s1``: denoise, solve the data sub-problem in closed form, re-noise
    with a fraction ``zeta`` of fresh noise (Alg. 1, in the sigma frame):

        d       = D(x, s0),                          rho = lam sigma_y^2 / s0^2
        z       = argmin_u |y - A u|^2 + rho |u - d|^2 = d + A^T (A A^T + rho I)^+ (y - A d)
        x'      = z + s1 (sqrt(1 - zeta) (x - z) / s0 + sqrt(zeta) n)

    The solve uses the operator's SVD when it has one, else conjugate gradients (no network calls).
    ``lam = 1`` makes the data step the exact posterior mean of ``x0`` given ``d`` and ``y`` when
    ``d`` is treated as ``x0`` observed with noise ``s0``; the paper tunes ``lam`` and ``zeta`` per
    task. ``NFE = N``.

    References:
        Zhu, Zhang, Liang, Cao, Wen, Timofte & Van Gool, "Denoising Diffusion Models for Plug-and-Play
        Image Restoration", CVPR Workshops 2023, eqs. 13-15 and Alg. 1.
    """
    sy = check_problem("diffpir", y, operator, x, sigma_y)
    check_option("lam", lam, 0.0)
    check_option("zeta", zeta, 0.0, 1.0)
    s, model = prepare(denoiser, x, sigmas)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        rho = lam * sy * sy / (s0 * s0)
        z = d + operator.adjoint(gram_solve(operator, y - operator.forward(d), 1.0, rho))
        if s1 == 0:
            x = z
            break
        noise = randn_like(x, generator) if zeta > 0 else torch.zeros_like(x)
        x = z + s1 * (math.sqrt(1 - zeta) * (x - z) / s0 + math.sqrt(zeta) * noise)
    return finish_watched(x, first, s, "diffpir")
