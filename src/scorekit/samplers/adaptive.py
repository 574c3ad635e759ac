"""Adaptive samplers: error-controlled step sizes, so the NFE follows from tolerances, not from ``sigmas``.

Only ``sigmas[0]`` and the last positive entry ``sigmas[-2]`` matter (the intermediate entries are
output points for ``callback`` in ``adaptive_ode`` and ignored by ``adaptive_sde``); both integrate in
``u = log sigma``, where the dynamics are well conditioned over sigma spanning many decades, and end
with the denoising step ``x = D(x, sigmas[-2])``. The number of denoiser calls is not known in
advance: pass ``stats={}`` and read ``stats["nfe"]`` afterwards. Step-size control needs the error
norm on the host, so these loops synchronise once per step (unlike the fixed-step samplers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, check_finite
from scorekit.samplers._common import GeneratorLike, emit, finish, prepare, randn_like

__all__ = ["adaptive_ode", "adaptive_sde"]


def _check_tolerances(**values: float) -> None:
    for k, v in values.items():
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{k} must be a number > 0; got {v!r}")


def adaptive_ode(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    stats: dict | None = None,
) -> Tensor:
    """An error-controlled Runge-Kutta solve (torchdiffeq) of the PF-ODE in ``u = log sigma``.

        dx/du = sigma dx/dsigma = x - D(x, e^u),     u from log sigmas[0] to log sigmas[-2],

    then ``x = D(x, sigmas[-2])``. The error norm is the largest per-sample RMS of the scaled error,
    so every sample meets ``rtol``/``atol`` whatever the batch; a sample's result depends on its
    batch only through the shared step sizes, i.e. within the tolerance. ``callback`` sees ``x`` at
    each positive entry of ``sigmas`` (dense output, no extra calls; ``denoised`` is None there).
    ``stats["nfe"]`` receives the exact number of denoiser calls (every RK stage plus the final one).

    References:
        Dormand & Prince, "A family of embedded Runge-Kutta formulae", J. Comp. Appl. Math. 1980
        (dopri5). Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018 (torchdiffeq).
        Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, Sec. 4.3.
    """
    from torchdiffeq import odeint

    _check_tolerances(rtol=rtol, atol=atol)
    s, model = prepare(denoiser, x, sigmas)
    batch, calls, last = x.shape[0], 0, x

    def drift(u: Tensor, y: Tensor) -> Tensor:
        nonlocal calls, last
        calls += 1
        last = model(y, u.exp().to(y.dtype).expand(batch))
        return y - last

    def norm(t: Tensor) -> Tensor:  # worst per-sample RMS
        return t.reshape(batch, -1).square().mean(1).sqrt().max()

    positive = s[:-1]
    if len(positive) > 1:
        u = torch.tensor([math.log(v) for v in positive], dtype=x.dtype, device=x.device)
        try:
            path = odeint(drift, x, u, rtol=rtol, atol=atol, method=method, options={"norm": norm})
        except AssertionError as err:  # torchdiffeq's "underflow in dt": usually NaN/inf
            check_finite(last, "denoiser output during the adaptive solve")
            raise RuntimeError(
                f"adaptive_ode: the solver stopped ({err}); too stiff for rtol/atol?"
            ) from err
        for i, sig in enumerate(positive[:-1]):
            emit(callback, i, sig, path[i], None)
        x = path[-1]
    d = model(x, positive[-1])
    emit(callback, len(positive) - 1, positive[-1], x, d)
    if stats is not None:
        stats["nfe"] = calls + 1
    return finish(d)


def adaptive_sde(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.01,
    safety: float = 0.9,
    exponent: float = 0.9,
    max_iterations: int = 100_000,
    stats: dict | None = None,
) -> Tensor:
    """ "Gotta Go Fast": Euler-Maruyama paired with improved Euler, per-sample step-size control.

    The reverse SDE in ``u = log sigma`` is ``dx = 2 (x - D) du + sqrt(2) sigma dW_bar``; time is
    ``t = (u_0 - u) / (u_0 - u_end)`` in ``[0, 1]``. A step of size ``h`` (``du = -h (u_0 - u_end)``,
    ``z ~ N(0, I)`` shared by both stages):

        x'  = x + 2 du (x - D(x, sigma_t)) + sqrt(2 |du|) sigma_t z            (Euler-Maruyama)
        x~  = x + 2 du (x' - D(x', sigma_{t+h})) + sqrt(2 |du|) sigma_{t+h} z
        x'' = (x' + x~) / 2                                                       (improved Euler)
        E   = || (x' - x'') / max(atol, rtol max(|x'|, |x'_prev|)) ||_2 / sqrt(n)

    accept if ``E <= 1`` (``x <- x''``, ``x'_prev <- x'``), and in any case
    ``h <- min(1 - t, safety h E^(-exponent))``. Every sample has its own ``t`` and ``h``, so with per-row
    generators sample ``i`` does not depend on the batch (finished rows take zero-length steps).
    Ends with ``x = D(x, sigmas[-2])``. ``stats`` receives ``nfe`` (``2 * iterations + 1``) and
    ``iterations``; the loop reads ``any(t < 1)`` on the host once per iteration.

    References:
        Jolicoeur-Martineau et al., "Gotta Go Fast When Generating Data with Score-Based Models",
        arXiv:2105.14080 (2021), Alg. 1 (defaults from their Sec. 4). Roberts, "Modify the Improved
        Euler scheme to integrate stochastic differential equations", arXiv:1210.0933 (2012).
    """
    _check_tolerances(rtol=rtol, atol=atol, h_init=h_init, safety=safety, exponent=exponent)
    s, model = prepare(denoiser, x, sigmas)
    u0, u1 = math.log(s[0]), math.log(s[-2])
    span, batch, it = u0 - u1, x.shape[0], 0
    kw = {"dtype": torch.float64, "device": x.device}
    t, h = torch.zeros(batch, **kw), torch.full((batch,), min(h_init, 1.0), **kw)
    x_prev = x
    err = torch.zeros(batch, **kw)
    while span > 0:
        running, broken = torch.stack([(t < 1).any(), err.isnan().any()]).tolist()  # one sync
        if broken:
            raise FloatingPointError(
                "adaptive_sde: the error estimate is not finite (NaN/inf from the denoiser?)"
            )
        if not running:
            break
        if it >= max_iterations:
            raise RuntimeError(f"adaptive_sde did not finish in max_iterations={max_iterations}")
        it += 1
        h = torch.minimum(h, 1 - t)
        du = append_dims((h * span).to(x.dtype), x.ndim)
        sig_a, sig_b = (u0 - t * span).exp(), (u0 - (t + h) * span).exp()
        z = randn_like(x, generator)
        x1 = (
            x
            - 2 * du * (x - model(x, sig_a.to(x.dtype)))
            + (2 * du).sqrt() * append_dims(sig_a.to(x.dtype), x.ndim) * z
        )
        x2 = (
            x
            - 2 * du * (x1 - model(x1, sig_b.to(x.dtype)))
            + (2 * du).sqrt() * append_dims(sig_b.to(x.dtype), x.ndim) * z
        )
        x_hi = 0.5 * (x1 + x2)
        tol = (rtol * torch.maximum(x1.abs(), x_prev.abs())).clamp_min(atol)
        err = ((x1 - x_hi) / tol).flatten(1).square().mean(1).sqrt().to(torch.float64)
        ok = err <= 1
        x, x_prev = (
            torch.where(append_dims(ok, x.ndim), x_hi, x),
            torch.where(append_dims(ok, x.ndim), x1, x_prev),
        )
        t = torch.where(ok, torch.where(h >= 1 - t, torch.ones_like(t), t + h), t)
        h = torch.minimum(1 - t, safety * h * err.clamp_min(1e-10) ** (-exponent))
    d = model(x, s[-2])
    emit(callback, 0, s[-2], x, d)
    if stats is not None:
        stats["nfe"], stats["iterations"] = 2 * it + 1, it
    return finish(d)
