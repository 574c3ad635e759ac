"""Plug-and-play split Gibbs sampling with a diffusion prior (PnP-DM): the baseline of annealed MCMC."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from scorekit.inverse.common import (
    check_problem,
    ddim_step,
    finish_watched,
    gram_solve,
    solver,
    watch,
)
from scorekit.inverse.operators import Operator
from scorekit.samplers.common import GeneratorLike, emit, prepare, randn_like, steps

__all__ = ["pnp_gibbs"]


@solver(nfe=lambda n, o: n * o["inner_steps"], vjp=lambda n, o: 0)
def pnp_gibbs(
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
    inner_steps: int = 4,
) -> Tensor:
    """Split Gibbs sampling of ``p(x) N(z; x, rho^2 I) p(y | z)`` with ``rho`` annealed along ``sigmas``.

    One sweep per level ``rho = sigma_i > 0``:

        z ~ p(z | x, y) ∝ N(z; x, rho^2 I) N(y; A z, sigma_y^2 I)        (likelihood step, exact:
            z = u + rho^2 A^T (rho^2 A A^T + sigma_y^2 I)^+ (y - A u - sigma_y m),  u = x + rho n)
        x ~ p(x0 | x_rho = z)                                              (prior step: a denoising
            posterior, drawn by ``inner_steps`` DDPM steps of the reverse diffusion from ``rho`` to 0)

    As ``rho -> 0`` the pair collapses and ``x`` targets ``p(x0 | y)``; the prior step is exact up to
    the inner discretisation (its grid is ``rho (1 - j / K)^7``, ``K = inner_steps``). One sweep per
    level does not equilibrate the chain: on a Gaussian prior (N(m, I) in 3-D, 100 levels) the sample
    covariance was measured 0.38 off the exact posterior's (the mean within 1.5 standard errors). ``x``, the
    state at ``sigmas[0]``, is the first level's ``x``. ``NFE = N inner_steps``, no backward passes.

    References:
        Wu, Sun, Chen, Zhang, Yue & Bouman, "Principled Probabilistic Imaging using Diffusion Models
        as Plug-and-Play Priors", NeurIPS 2024, Alg. 1. Xu & Chi, "Provably Robust Score-Based
        Diffusion Posterior Sampling for Plug-and-Play Image Reconstruction", NeurIPS 2024.
    """
    sy = check_problem("pnp_gibbs", y, operator, x, sigma_y)
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive int; got {inner_steps!r}")
    s, model = prepare(denoiser, x, sigmas)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        rho = s[i]
        u = x + rho * randn_like(x, generator)
        m = randn_like(y, generator) * sy if sy > 0 else 0.0
        v = gram_solve(operator, y - operator.forward(u) - m, rho * rho, sy * sy)
        z = u + rho * rho * operator.adjoint(v)
        grid = [rho * (1 - j / inner_steps) ** 7 for j in range(inner_steps)] + [0.0]
        for j in range(inner_steps):
            d = model(z, grid[j])
            if j == 0:
                emit(callback, i, rho, x, d)
            noise = randn_like(z, generator) if grid[j + 1] > 0 else None
            z = ddim_step(d, z, grid[j], grid[j + 1], 1.0, noise)
        x = z
    return finish_watched(x, first, s, "pnp_gibbs")
