"""Deterministic samplers: solvers of the probability-flow ODE in the sigma frame.

With ``x = x0 + sigma * noise`` and a denoiser ``D(x, sigma)``, the probability-flow ODE is

    dx/dsigma = (x - D(x, sigma)) / sigma = eps(x, sigma).

With ``lambda = -log sigma`` and ``h = lambda_{i+1} - lambda_i = log(sigma_i / sigma_{i+1})`` the
exact solution over one step, in the data-prediction (DPM-Solver++) form, is

    x_{i+1} = e^{-h} x_i + int_0^h e^{-(h - tau)} D(lambda_i + tau) dtau,       e^{-h} = sigma_{i+1}/sigma_i,

and in the noise-prediction (DPM-Solver) form ``x_{i+1} = x_i - sigma_{i+1} int_0^h e^{tau} eps dtau``.
The solvers differ in how they approximate ``D`` (or ``eps``) over the step. A step to
``sigma = 0`` has ``h = inf``: every solver here takes it as ``x = D(x, sigma_{N-1})`` (Tweedie's
posterior mean, the limit of every first-order step), except the Adams-type ``deis`` and ``ipndm``,
whose variable (``sigma``) stays finite there.

``sigmas`` has ``N + 1`` entries (``N`` steps); ``callback`` sees ``x`` at each ``sigmas[i]``,
``i < N``, with the denoiser output there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.samplers._common import (
    GeneratorLike,
    emit,
    finish,
    phi,
    prepare,
    steps,
)

__all__ = ["dpmpp_2m", "euler", "heun"]


def _exp_moments(h: float, k: int, eta: float = 0.0) -> list[float]:
    """``m_j = int_0^h a e^{-a (h - tau)} tau^j dtau`` for ``j < k``, ``a = 1 + eta``.

    Equals ``j! C_j(a h) / a^j`` with ``C_j(z) = z^{j+1} phi_{j+1}(-z)``: the weights of the
    data-prediction exponential integrator (``eta = 0``: the ODE; ``eta > 0``: the SDE family of
    ``scorekit.samplers.sde``).
    """
    a = 1.0 + eta
    z = a * h
    return [math.factorial(j) * z ** (j + 1) * phi(j + 1, -z) / a**j for j in range(k)]


def euler(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
) -> Tensor:
    """Euler's method on the PF-ODE: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D_i) / sigma_i``.

    In the sigma frame this is also ``D_i + (sigma_{i+1}/sigma_i) (x_i - D_i)``: DDIM with ``eta = 0``
    and DPM-Solver-1 / DPM-Solver++(1) (first-order exponential integrator) are the same update.
    Order 1; one denoiser call per step (``NFE = N``).

    References:
        Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, eq. 12.
        Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
        NeurIPS 2022, eq. 1 and Alg. 1 (without the correction).
    """
    s, model = prepare(denoiser, x, sigmas)
    for i in steps(len(s) - 1, progress):
        d = model(x, s[i])
        emit(callback, i, s[i], x, d)
        x = torch.lerp(d, x, s[i + 1] / s[i])
    return finish(x)


def heun(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun's second-order method (EDM Alg. 1 with ``S_churn = 0``).

    With ``d(x, sigma) = (x - D(x, sigma)) / sigma`` and ``h = sigma_{i+1} - sigma_i``:

        x'      = x_i + h d(x_i, sigma_i)                                   (Euler)
        x_{i+1} = x_i + h/2 (d(x_i, sigma_i) + d(x', sigma_{i+1}))          (trapezoid)

    The last step, to ``sigma = 0``, is Euler (``x = D``). Order 2; ``NFE = 2N - 1``.

    References:
        Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
        NeurIPS 2022, Alg. 1.
    """
    s, model = prepare(denoiser, x, sigmas)
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        x1 = torch.lerp(d, x, s1 / s0)
        d1 = model(x1, s1)
        h = s1 - s0
        x = x + (0.5 * h / s0) * (x - d) + (0.5 * h / s1) * (x1 - d1)
    return finish(x)


def dpmpp_2m(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++(2M): second-order multistep exponential integrator in the data-prediction form.

    With ``h_i = log(sigma_i / sigma_{i+1})`` and ``r_i = h_{i-1} / h_i``:

        D'      = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}      (D' = D_i at the first step)
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h_i) D'

    The first step is first order (no history yet) and the last step, to ``sigma = 0``, is
    ``x = D`` (the lower-order final step). Order 2; ``NFE = N``.

    References:
        Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
        arXiv:2211.01095 (2022), Alg. 2.
    """
    s, model = prepare(denoiser, x, sigmas)
    d_old, h_old = None, 0.0
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        h = math.log(s0 / s1)
        # (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} = lerp(D_i, D_{i-1}, -1/(2r))
        d_mix = d if d_old is None else torch.lerp(d, d_old, -0.5 * h / h_old)
        x = torch.lerp(d_mix, x, s1 / s0)  # e^{-h} x + (1 - e^{-h}) D'
        d_old, h_old = d, h
    return finish(x)
