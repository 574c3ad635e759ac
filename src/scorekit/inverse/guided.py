"""Gradient-guided posterior samplers: DPS, PiGDM and MMPS (second-order Tweedie).

Each replaces the denoiser ``D(x, sigma) = E[x0 | x]`` by an estimate of ``E[x0 | x, y]`` (or moves the
state along an approximate likelihood gradient) and then takes the DDIM step of ``common.ddim_step``.
By Tweedie's formula applied to ``p(x | y)``,

    E[x0 | x, y] = x + sigma^2 grad_x log p(x | y) = D(x, sigma) + sigma^2 grad_x log p(y | x),

so each method is a choice of approximation of ``p(y | x) = int p(y | x0) p(x0 | x) dx0``. They need
autograd through the denoiser: the cost of each is listed as denoiser calls (``NFE``) and backward
passes through the denoiser (vector-Jacobian products, ``VJP``), for ``N = len(sigmas) - 1`` steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.inverse.common import (
    cg,
    check_option,
    check_problem,
    ddim_step,
    finish_watched,
    gram_solve,
    solver,
    vjp,
    watch,
)
from scorekit.inverse.operators import Operator
from scorekit.samplers.common import GeneratorLike, emit, prepare, randn_like, steps

__all__ = ["dps", "mmps", "pigdm"]


def _noise(x: Tensor, s1: float, eta: float, generator: GeneratorLike) -> Tensor | None:
    return randn_like(x, generator) if eta > 0 and s1 > 0 else None


def residual_gradient(model, x: Tensor, sigma: float, y: Tensor, operator: Operator):
    """``D(x, sigma)`` and DPS's step direction ``grad_x |y - A D(x, sigma)|`` per row.

    The gradient of the residual norm (not its square) is DPS's normalised step (Chung et al. 2023,
    Alg. 1); one denoiser call and one backward pass. Shared by ``dps`` and ``mcg``.
    """
    tiny = torch.finfo(x.dtype).tiny
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        d = model(xg, sigma)
        r2 = (y - operator.forward(d)).flatten(1).square().sum(1)
        loss = (r2 / r2.detach().sqrt().clamp(min=tiny)).sum()
        grad = vjp(loss, xg, torch.ones_like(loss), retain=False)
    return d.detach(), grad


@solver(nfe=lambda n, o: n, vjp=lambda n, o: n)
def dps(
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
    eta: float = 1.0,
) -> Tensor:
    """Diffusion posterior sampling: a DDIM step, then a step down the gradient of the residual norm.

    With ``d = D(x_i, sigma_i)`` and ``r = y - A(d)`` (``A`` may be non-linear, it must be
    differentiable), per row,

        x_{i+1} = DDIM(d, x_i; eta) - zeta (1 + sigma_i^2) grad_{x_i} |r|^2 / |r|       (Alg. 1)

    The paper's step ``zeta_i = zeta' / |r|`` is taken in the variance-preserving frame ``x / sqrt(1 +
    sigma^2)`` (data of unit scale); the factor ``1 + sigma^2`` carries it to the sigma frame, so
    ``zeta`` is the paper's ``zeta'`` (0.1 to 1 there; 0.1 here, chosen on ring8 observe-one; the
    step length does not shrink with the residual, so the result stays within about ``2 zeta`` of
    a noiseless measurement rather than on it). ``sigma_y`` enters only through ``y``: DPS does
    not weigh the measurement by its noise (an approximation; with ``A = 0`` it is the prior sampler).
    ``NFE = N``, ``VJP = N``.

    References:
        Chung, Kim, Mccann, Klasky & Ye, "Diffusion Posterior Sampling for General Noisy Inverse
        Problems", ICLR 2023, Alg. 1 and eq. 16.
    """
    check_problem("dps", y, operator, x, sigma_y, linear=False)
    check_option("zeta", zeta, 0.0)
    check_option("eta", eta, 0.0, 1.0)
    s, model = prepare(denoiser, x, sigmas)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        d, grad = residual_gradient(model, x, s0, y, operator)
        emit(callback, i, s0, x, d)
        x = ddim_step(d, x, s0, s1, eta, _noise(x, s1, eta, generator))
        x = x - (zeta * (1 + s0 * s0)) * grad
    return finish_watched(x, first, s, "dps")


@solver(nfe=lambda n, o: n, vjp=lambda n, o: n)
def pigdm(
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
    eta: float = 1.0,
    data_var: float = 1.0,
) -> Tensor:
    """Pseudoinverse-guided diffusion: ``p(x0 | x) ~ N(D, r^2 I)`` gives the likelihood gradient.

    With ``d = D(x, sigma)``, ``J = dD/dx`` and ``r^2 = data_var sigma^2 / (data_var + sigma^2)`` (the
    posterior variance of ``x0`` under a ``N(., data_var I)`` prior),

        g       = J^T A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A d)                 (eq. 7-8)
        D_y     = d + sigma^2 g,            x_{i+1} = DDIM(D_y, x_i; eta).

    The Gram solve uses the operator's SVD when it has one, else conjugate gradients (no network
    calls). Exact for a Gaussian prior ``N(m, data_var I)``. ``NFE = N``, ``VJP = N``.

    References:
        Song, Vahdat, Mardani & Kautz, "Pseudoinverse-Guided Diffusion Models for Inverse Problems",
        ICLR 2023, eqs. 5-8 and Alg. 1.
    """
    sy = check_problem("pigdm", y, operator, x, sigma_y)
    check_option("eta", eta, 0.0, 1.0)
    check_option("data_var", data_var, 1e-12)
    s, model = prepare(denoiser, x, sigmas)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        r2 = data_var * s0 * s0 / (data_var + s0 * s0)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = model(xg, s0)
            v = gram_solve(operator, y - operator.forward(d.detach()), r2, sy * sy)
            g = vjp(d, xg, operator.adjoint(v), retain=False)
        d = d.detach()
        emit(callback, i, s0, x, d)
        x = ddim_step(d + s0 * s0 * g, x, s0, s1, eta, _noise(x, s1, eta, generator))
    return finish_watched(x, first, s, "pigdm")


@solver(nfe=lambda n, o: n, vjp=lambda n, o: n * (o["cg_iters"] + 1))
def mmps(
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
    eta: float = 1.0,
    cg_iters: int = 3,
) -> Tensor:
    """Moment-matching posterior sampling: ``p(x0 | x)`` approximated by its Tweedie mean and covariance.

    Tweedie's second-order formula gives ``Cov[x0 | x] = sigma^2 J`` with ``J = dD/dx`` (symmetric), so

        p(y | x) ~ N(y; A d, sigma_y^2 I + sigma^2 A J A^T)
        D_y = d + sigma^2 J A^T (sigma_y^2 I + sigma^2 A J A^T)^{-1} (y - A d),
        x_{i+1} = DDIM(D_y, x_i; eta).

    The linear system is solved by ``cg_iters`` conjugate-gradient iterations, each one product
    ``J u`` (a backward pass, ``J^T = J``), and one more product gives ``D_y``. Exact for any Gaussian
    prior once CG has converged. ``NFE = N``, ``VJP = N (cg_iters + 1)``.

    References:
        Rozet, Andry, Lanusse & Louppe, "Learning Diffusion Priors from Observations by Expectation
        Maximization", NeurIPS 2024, eqs. 9-12. Boys et al., "Tweedie Moment Projected Diffusions for
        Inverse Problems", TMLR 2024.
    """
    sy = check_problem("mmps", y, operator, x, sigma_y)
    check_option("eta", eta, 0.0, 1.0)
    if isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 0:
        raise ValueError(f"cg_iters must be an int >= 0; got {cg_iters!r}")
    s, model = prepare(denoiser, x, sigmas)
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(x, i, first)
        s0, s1 = s[i], s[i + 1]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            d = model(xg, s0)

            def matvec(v: Tensor, d=d, xg=xg, s0=s0) -> Tensor:
                return sy * sy * v + s0 * s0 * operator.forward(vjp(d, xg, operator.adjoint(v)))

            v = cg(matvec, y - operator.forward(d.detach()), cg_iters)
            g = vjp(d, xg, operator.adjoint(v), retain=False)
        d = d.detach()
        emit(callback, i, s0, x, d)
        x = ddim_step(d + s0 * s0 * g, x, s0, s1, eta, _noise(x, s1, eta, generator))
    return finish_watched(x, first, s, "mmps")
