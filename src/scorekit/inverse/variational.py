"""Posterior samplers that move a clean estimate: RED-diff (variational) and FlowDPS (flow-driven).

Both keep a clean estimate ``mu`` (or ``x0``) and re-noise it at each level, with the data term taken
on the clean estimate (no backward pass through the denoiser).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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

__all__ = ["flowdps", "red_diff"]


@solver(nfe=lambda n, o: n, vjp=lambda n, o: 0)
def red_diff(
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
    lr: float = 1.0,
    lam: float = 1.0,
) -> Tensor:
    """Regularisation by denoising diffusion: minimise ``|y - A mu|^2 / (2 sigma_y^2) + lam * RED(mu)``.

    RED-diff fits a point mass ``q = delta(mu)`` to the posterior by descending, over the levels
    ``sigma_i`` from high to low, the variational loss whose gradient in ``mu`` is

        A^T (A mu - y) / sigma_y^2 + lam w_i (eps_hat - eps),     x = mu + sigma_i eps, eps ~ N(0, I)

    with ``eps_hat = (x - D(x, sigma_i)) / sigma_i`` (eq. 9 and Alg. 1; the paper's weight ``w = sigma /
    alpha`` is ``sigma_i`` in the sigma frame), so the prior part is ``lam (mu - D(x, sigma_i))``. The
    paper steps with Adam; here each level takes a proximal-gradient step of length ``lr``: a
    gradient step on the prior part, then the exact proximal map of the quadratic data term (a Gram
    solve, SVD or CG), which has no step-size limit however small ``sigma_y`` is:

        u      = mu - lr lam (mu - D(mu + sigma_i eps, sigma_i))
        mu     = u + lr A^T (lr A A^T + sigma_y^2 I)^{-1} (y - A u)

    The first level denoises the given ``x`` (at ``sigmas[0]``). RED-diff is an optimiser, not a
    sampler: ``mu`` collapses towards a mode (measured: with ``A = 0`` on ring8 its spread within a
    mode is below the prior's; docs/inverse-problems.md). ``NFE = N``, no backward passes.

    References:
        Mardani, Song, Kautz & Vahdat, "A Variational Perspective on Solving Inverse Problems with
        Diffusion Models", ICLR 2024 (arXiv:2305.04391), eq. 9 and Alg. 1.
    """
    sy = check_problem("red_diff", y, operator, x, sigma_y)
    check_option("lr", lr, 1e-12)
    check_option("lam", lam, 0.0)
    s, model = prepare(denoiser, x, sigmas)
    first, mu = None, x
    for i in steps(len(s) - 1, progress):
        first = watch(mu, i, first)
        s0 = s[i]
        xi = x if i == 0 else mu + s0 * randn_like(mu, generator)
        d = model(xi, s0)
        emit(callback, i, s0, xi, d)
        u = d if i == 0 else mu - (lr * lam) * (mu - d)
        mu = u + lr * operator.adjoint(gram_solve(operator, y - operator.forward(u), lr, sy * sy))
    return finish_watched(mu, first, s, "red_diff")


@solver(nfe=lambda n, o: n, vjp=lambda n, o: 0)
def flowdps(
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
    data_steps: int = 1,
    lr: float = 1.0,
    eta: float = 1.0,
) -> Tensor:
    """Flow-driven posterior sampling: a data step on the clean part of the flow, stochastic noise part.

    The rectified-flow state ``z_t = (1 - t) x0 + t eps`` is ``x = x0 + sigma eps`` in the sigma frame
    (``sigma = t / (1 - t)``). FlowDPS splits the flow's Euler step into its clean and noise parts and
    moves only the clean part towards the measurement, by gradient steps on ``|y - A x0|^2 / 2`` taken
    on the estimate itself (no backward pass through the network), then mixes fresh noise into the
    noise part (Alg. 1):

        d = D(x, s0),   eps_hat = (x - d) / s0
        x0 = d;  repeat data_steps:  x0 = x0 + lr A^T (y - A x0)
        eps' = sqrt(1 - h) eps_hat + sqrt(h) z,   h = eta t_{i+1},   t = s / (1 + s)
        x_{i+1} = x0 + s1 eps'

    ``lr = 1`` makes one step exact on the observed part for a mask or the identity (``A A^T = I``);
    ``lr`` must be below ``2 / |A|^2``. Like DPS it does not weigh the measurement by ``sigma_y``. ``NFE =
    N``, no backward passes.

    References:
        Kim, Kim, Chung & Ye, "FlowDPS: Flow-Driven Posterior Sampling for Inverse Problems",
        arXiv:2503.08136 (2025), Alg. 1 and eqs. 12-15.
    """
    check_problem("flowdps", y, operator, x, sigma_y)
    if isinstance(data_steps, bool) or not isinstance(data_steps, int) or data_steps < 0:
        raise ValueError(f"data_steps must be an int >= 0; got {data_steps!r}")
    check_option("lr", lr, 0.0)
    check_option("eta", eta, 0.0, 1.0)
    s, model = prepare(denoiser, x, sigmas)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        x0 = d
        for _ in range(data_steps):
            x0 = x0 + lr * operator.adjoint(y - operator.forward(x0))
        if s1 == 0:
            x = x0
            continue
        h = eta * s1 / (1 + s1)
        eps = (x - d) / s0
        if h > 0:
            eps = math.sqrt(1 - h) * eps + math.sqrt(h) * randn_like(x, generator)
        x = x0 + s1 * eps
    return finish_watched(x, first, s, "flowdps")
