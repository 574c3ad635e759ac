"""Posterior samplers in the operator's spectral basis: DDRM and DDNM (need an SVD, no autograd).

With ``A = U diag(s) V^T`` (``operators``), write ``xb = V^T x`` (``d`` coordinates: ``r`` along the
singular vectors, the rest in the null space), ``xb0 = V^T D(x, sigma)`` and, for ``s_j > 0``,
``yb_j = (U^T y)_j / s_j`` with noise level ``sigma_y / s_j``: coordinate ``j`` of ``x0`` is observed
as ``yb_j = xb0_j + (sigma_y / s_j) n``. Null-space coordinates (``s_j = 0``, or beyond ``r``) are
updated by the unconditional DDIM step; observed ones are pulled to ``yb`` as each method prescribes.
``NFE = N`` for ``N = len(sigmas) - 1``; no backward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.inverse.common import (
    check_option,
    check_problem,
    finish_watched,
    solver,
    spectral_measurement,
    watch,
)
from scorekit.inverse.operators import Operator
from scorekit.samplers.common import GeneratorLike, emit, prepare, randn_like, steps

__all__ = ["ddnm", "ddrm"]


@solver(nfe=lambda n, o: n, vjp=lambda n, o: 0)
def ddrm(
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
    eta: float = 0.85,
    eta_b: float = 1.0,
) -> Tensor:
    """Denoising diffusion restoration models: a variational step per spectral coordinate.

    From ``x`` at ``s0 = sigma_i`` to ``s1 = sigma_{i+1}``, with ``sb_j = sigma_y / s_j`` and fresh
    ``z ~ N(0, I)`` (eq. 7-8 of the paper, in its sigma frame):

        null space:     xb'_j = xb0_j + sqrt(1 - eta^2) s1 (xb_j - xb0_j) / s0 + eta s1 z_j
        s1 <  sb_j:     xb'_j = xb0_j + sqrt(1 - eta^2) s1 (yb_j - xb0_j) / sb_j + eta s1 z_j
        s1 >= sb_j:     xb'_j = (1 - eta_b) xb0_j + eta_b yb_j + sqrt(s1^2 - eta_b^2 sb_j^2) z_j

    ``eta = 0.85``, ``eta_b = 1`` are the paper's defaults. The second line treats the measurement
    noise as the source of the state's noise, so with a very noisy measurement all samples of one
    ``y`` share a component (with ``A = 0`` it is the unconditional DDIM sampler). ``NFE = N``.

    References:
        Kawar, Elad, Ermon & Song, "Denoising Diffusion Restoration Models", NeurIPS 2022, eqs. 7-8.
    """
    sy = check_problem("ddrm", y, operator, x, sigma_y, svd=True)
    check_option("eta", eta, 0.0, 1.0)
    check_option("eta_b", eta_b, 0.0, 1.0)
    s, model = prepare(denoiser, x, sigmas)
    yb, sb, observed = spectral_measurement(operator, y, sy)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        xb, xb0 = operator.svd_vt(x), operator.svd_vt(d)
        z = operator.svd_vt(randn_like(x, generator)) if s1 > 0 else torch.zeros_like(xb)
        keep = math.sqrt(1 - eta * eta) * s1
        null = xb0 + keep * (xb - xb0) / s0 + eta * s1 * z
        noisy = xb0 + keep * (yb - xb0) / sb.clamp(min=1e-300) + eta * s1 * z
        fresh = (s1 * s1 - (eta_b * sb) ** 2).clamp(min=0).sqrt()
        clean = (1 - eta_b) * xb0 + eta_b * yb + fresh * z
        out = torch.where(s1 < sb, noisy, clean)
        x = operator.svd_v(torch.where(observed, out, null))
    return finish_watched(x, first, s, "ddrm")


@solver(nfe=lambda n, o: n, vjp=lambda n, o: 0)
def ddnm(
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
    eta: float = 0.85,
) -> Tensor:
    """Denoising diffusion null-space model (DDNM+): replace the range-space part of ``D`` by ``A^+ y``.

    The clean estimate is corrected in the range of ``A^T``, by a fraction that keeps the noise it
    brings from ``y`` below the next noise level (``lambda_j = min(1, s1 / sb_j)``, eq. 17-19):

        xb0c_j = xb0_j - lambda_j (xb0_j - yb_j)        (null space: xb0c_j = xb0_j)
        gamma_j = sqrt(s1^2 - (lambda_j sb_j)^2)        (null space: gamma_j = s1)
        xb'_j   = xb0c_j + gamma_j (sqrt(1 - eta^2) (xb_j - xb0_j) / s0 + eta z_j)

    With ``sigma_y = 0`` the correction is the full null-space projection ``x0 - A^+(A x0 - y)``
    (DDNM, eq. 13). ``NFE = N``.

    References:
        Wang, Yu & Zhang, "Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model",
        ICLR 2023, eqs. 13 and 17-19.
    """
    sy = check_problem("ddnm", y, operator, x, sigma_y, svd=True)
    check_option("eta", eta, 0.0, 1.0)
    s, model = prepare(denoiser, x, sigmas)
    yb, sb, observed = spectral_measurement(operator, y, sy)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        xb, xb0 = operator.svd_vt(x), operator.svd_vt(d)
        z = operator.svd_vt(randn_like(x, generator)) if s1 > 0 else torch.zeros_like(xb)
        lam = torch.where(s1 >= sb, 1.0, s1 / sb.clamp(min=1e-300))  # null space: sb = inf, 0
        xb0c = xb0 - lam * (xb0 - yb)
        gamma = (s1 * s1 - (lam * torch.where(observed, sb, 0.0)) ** 2).clamp(min=0).sqrt()
        eps = math.sqrt(1 - eta * eta) * (xb - xb0) / s0 + eta * z
        x = operator.svd_v(xb0c + gamma * eps)
    return finish_watched(x, first, s, "ddnm")
