"""Samplers that overwrite the observed part of the state with the noised measurement: RePaint, MCG.

Both work in the operator's spectral basis (``common.spectral_measurement``; they need an SVD): the
observed coordinates ``xb_j = (V^T x)_j`` are replaced at every noise level ``s`` by ``yb_j + s z_j``,
a sample of the forward-noised measurement, and the unobserved ones come from the prior's reverse step.
They treat the measurement as noiseless (``sigma_y`` only enters through ``y``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.inverse.common import (
    check_option,
    check_problem,
    ddim_step,
    finish_watched,
    solver,
    spectral_measurement,
    watch,
)
from scorekit.inverse.guided import residual_gradient
from scorekit.inverse.operators import Operator
from scorekit.samplers.common import GeneratorLike, emit, prepare, randn_like, steps

__all__ = ["mcg", "repaint"]


def _replace(op: Operator, x: Tensor, yb: Tensor, observed: Tensor, s1: float, noise) -> Tensor:
    """``x`` with its observed spectral coordinates set to ``yb + s1 z``."""
    xb = op.svd_vt(x)
    known = yb if noise is None else yb + s1 * op.svd_vt(noise)
    return op.svd_v(torch.where(observed, known, xb))


@solver(nfe=lambda n, o: (n - 1) * o["resample"] + 1, vjp=lambda n, o: 0)
def repaint(
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
    resample: int = 1,
) -> Tensor:
    """RePaint: reverse DDPM steps for the unknown part, the noised measurement for the known part.

    From ``x`` at ``s0`` to ``s1``, repeated ``U = resample`` times (jump length 1, Alg. 1):

        x'  = DDPM(D(x, s0), x)                          (ddim_step with eta = 1)
        x'  = V [yb + s1 z on the observed set; V^T x' elsewhere]
        x   = x' + sqrt(s0^2 - s1^2) n     (back to s0, except after the last repetition)

    The step to ``sigma = 0`` is not repeated. For a ``Mask`` this is the paper's inpainting rule; with
    any SVD operator the "known part" is the range of ``A^T``. ``NFE = (N - 1) U + 1``.

    References:
        Lugmayr, Danelljan, Romero, Yu, Timofte & Van Gool, "RePaint: Inpainting using Denoising
        Diffusion Probabilistic Models", CVPR 2022, Alg. 1 and eqs. 8-9.
    """
    check_problem("repaint", y, operator, x, sigma_y, svd=True)
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be a positive int; got {resample!r}")
    s, model = prepare(denoiser, x, sigmas)
    yb, _, observed = spectral_measurement(operator, y, 0.0)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        for u in range(resample if s1 > 0 else 1):
            d = model(x, s0)
            if u == 0:
                emit(callback, i, s0, x, d)
            noise = randn_like(x, generator) if s1 > 0 else None
            x = ddim_step(d, x, s0, s1, 1.0, noise)
            x = _replace(
                operator, x, yb, observed, s1, randn_like(x, generator) if s1 > 0 else None
            )
            if u < resample - 1 and s1 > 0:
                x = x + math.sqrt(s0 * s0 - s1 * s1) * randn_like(x, generator)
    return finish_watched(x, first, s, "repaint")


@solver(nfe=lambda n, o: n, vjp=lambda n, o: n)
def mcg(
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
    zeta: float = 0.1,
) -> Tensor:
    """Manifold constrained gradient: a DPS-like gradient step, then RePaint's replacement.

    With ``d = D(x, s0)`` and ``r = y - A d``,

        x' = DDPM(d, x) - zeta (1 + s0^2) grad_x |r|^2 / |r|      (the MCG term, eq. 14; as ``dps``)
        x' = V [yb + s1 z on the observed set; V^T x' elsewhere]   (the projection P, eq. 16)

    The gradient keeps the unknown part consistent with the measurement through the denoiser's
    Jacobian (staying near the data manifold); the step uses DPS's normalisation. ``NFE = N``,
    ``VJP = N``.

    References:
        Chung, Sim, Ryu & Ye, "Improving Diffusion Models for Inverse Problems using Manifold
        Constraints", NeurIPS 2022, eqs. 14-16 and Alg. 1.
    """
    check_problem("mcg", y, operator, x, sigma_y, svd=True)
    check_option("zeta", zeta, 0.0)
    s, model = prepare(denoiser, x, sigmas)
    yb, _, observed = spectral_measurement(operator, y, 0.0)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        d, grad = residual_gradient(model, x, s0, y, operator)
        emit(callback, i, s0, x, d)
        x = ddim_step(d, x, s0, s1, 1.0, randn_like(x, generator) if s1 > 0 else None)
        x = x - (zeta * (1 + s0 * s0)) * grad
        x = _replace(operator, x, yb, observed, s1, randn_like(x, generator) if s1 > 0 else None)
    return finish_watched(x, first, s, "mcg")
