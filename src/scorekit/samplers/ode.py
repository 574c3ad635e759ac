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

from scorekit._util import check_number, to_d
from scorekit.samplers.common import (
    LONG_STEP,
    GeneratorLike,
    check_long_step,
    combine,
    emit,
    finish,
    is_long,
    lagrange_weights,
    phi,
    phis,
    prepare,
    sampler,
    steps,
)

__all__ = [
    "deis",
    "dpm_solver_2",
    "dpm_solver_3",
    "dpmpp_2m",
    "dpmpp_2s",
    "dpmpp_3m",
    "euler",
    "heun",
    "ipndm",
    "unipc",
]


def _exp_moments(h: float, k: int, eta: float = 0.0) -> list[float]:
    """``m_j = int_0^h a e^{-a (h - tau)} tau^j dtau`` for ``j < k``, ``a = 1 + eta``.

    Equals ``j! C_j(a h) / a^j`` with ``C_j(z) = z^{j+1} phi_{j+1}(-z)``: the weights of the
    data-prediction exponential integrator (``eta = 0``: the ODE; ``eta > 0``: the SDE family of
    ``scorekit.samplers.sde``).
    """
    a = 1.0 + eta
    z = a * h
    p = phis(-z, k)
    return [math.factorial(j) * z ** (j + 1) * p[j + 1] / a**j for j in range(k)]


@sampler(nfe=lambda n, o: n)
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


@sampler(nfe=lambda n, o: 2 * n - 1)
def heun(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    long_step: float | None = LONG_STEP,
) -> Tensor:
    """Heun's second-order method (EDM Alg. 1 with ``S_churn = 0``).

    With ``d(x, sigma) = (x - D(x, sigma)) / sigma`` and ``h = sigma_{i+1} - sigma_i``:

        x'      = x_i + h d(x_i, sigma_i)                                   (Euler)
        x_{i+1} = x_i + h/2 (d(x_i, sigma_i) + d(x', sigma_{i+1}))          (trapezoid)

    The last step, to ``sigma = 0``, is Euler (``x = D``). Order 2; ``NFE = 2N - 1``.

    A long step (``sigma_i / sigma_{i+1} > long_step``, default 10; see ``common.LONG_STEP``) is
    taken instead with the same two calls in the data-prediction form (DPM-Solver++(2S) with the
    geometric midpoint ``s = sqrt(sigma_i sigma_{i+1})``: ``u = lerp(D_i, x_i, s / sigma_i)``,
    ``x_{i+1} = lerp(D(u, s), x_i, sigma_{i+1} / sigma_i)``), also second order and a convex
    combination at every stage: the trapezoid's slope at ``sigma_{i+1}`` amplifies the denoiser's
    error by about ``sigma_i / sigma_{i+1}`` (a 5-call karras schedule to 0.002 ends with a step of
    ratio 1250, where Alg. 1 diverges on a network-sized error). ``long_step=None`` is Alg. 1 on
    every step.

    References:
        Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models",
        NeurIPS 2022, Alg. 1. Lu et al., "DPM-Solver++", arXiv:2211.01095 (2022), Alg. 1 (the
        long-step form).
    """
    long_step = check_long_step(long_step)
    s, model = prepare(denoiser, x, sigmas)
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        x = heun_step(model, x, d, s0, s1, long_step)
    return finish(x)


def heun_step(
    model: Callable, x: Tensor, d: Tensor, s0: float, s1: float, long_step: float | None = None
) -> Tensor:
    """One step of ``heun`` from ``x`` at ``s0`` (with ``d = D(x, s0)``) to ``s1``; Euler if ``s1 = 0``,
    the data-prediction midpoint step if the step is long (``heun``'s docstring).

    Shared by ``heun``, ``edm_stochastic`` and ``restart``; one call (none if ``s1 = 0``).
    """
    if s1 == 0:
        return d
    if is_long(s0, s1, long_step):
        return midpoint_step(model, x, d, s0, s1, math.sqrt(s0 * s1))
    x1 = torch.lerp(d, x, s1 / s0)
    h = s1 - s0
    return x + (0.5 * h / s0) * (x - d) + (0.5 * h / s1) * (x1 - model(x1, s1))


def midpoint_step(
    model: Callable, x: Tensor, d: Tensor, s0: float, s1: float, sm: float, r: float = 0.5
) -> Tensor:
    """DPM-Solver++(2S) from ``x`` at ``s0`` (``d = D(x, s0)``) via ``sm`` to ``s1`` (``dpmpp_2s``'s
    update with ``sm = s0 e^{-r h}``); one call. The long-step form of the second-order singlestep
    samplers."""
    u = torch.lerp(d, x, sm / s0)  # (s/sigma_i) x - expm1(-r h) D, since e^{-r h} = s/sigma_i
    return torch.lerp(torch.lerp(d, model(u, sm), 0.5 / r), x, s1 / s0)


@sampler(nfe=lambda n, o: n)
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


_FRACTION = " (the intermediate point as a fraction of the step)"


@sampler(nfe=lambda n, o: 2 * n - 1)
def dpm_solver_2(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    r1: float = 0.5,
    long_step: float | None = LONG_STEP,
) -> Tensor:
    """DPM-Solver-2: second-order singlestep exponential integrator in the noise-prediction form.

    Each interval ``[sigma_i, sigma_{i+1}]`` of ``sigmas`` is one step, with ``h = log(sigma_i /
    sigma_{i+1})``, an intermediate level ``s = sigma_i e^{-r1 h}`` and ``eps(x, sigma) = (x - D) / sigma``:

        u       = x_i - sigma_s (e^{r1 h} - 1) eps_i            = x_i - (sigma_i - s) eps_i
        x_{i+1} = x_i - sigma_{i+1} (e^h - 1) eps_i - sigma_{i+1} (e^h - 1) / (2 r1) (eps(u, s) - eps_i)

    (``sigma_{i+1} (e^h - 1) = sigma_i - sigma_{i+1}`` exactly in this frame). Steps are not grouped:
    every interval ending at ``sigma > 0`` costs 2 calls; the interval to ``sigma = 0`` (``h = inf``,
    no intermediate level exists) is the first-order step ``x = D``. Order 2; ``NFE = 2N - 1``.
    A long step (``sigma_i / sigma_{i+1} > long_step``, as ``heun``) is taken in the data-prediction
    form, ``dpmpp_2s`` with ``r = r1`` (same calls): the noise-prediction form's stage error grows
    with the step's sigma ratio. ``long_step=None``: Alg. 1 on every step.

    References:
        Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
        10 Steps", NeurIPS 2022, Alg. 1 (DPM-Solver-2).
    """
    check_number("r1", r1, low=0, high=1, low_ok=False, what=_FRACTION)
    long_step = check_long_step(long_step)
    s, model = prepare(denoiser, x, sigmas)
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        sm = s0 * math.exp(-r1 * math.log(s0 / s1))
        if is_long(s0, s1, long_step):
            x = midpoint_step(model, x, d, s0, s1, sm, r1)
            continue
        eps0 = to_d(x, s0, d)
        u = x - (s0 - sm) * eps0
        eps1 = (u - model(u, sm)) / sm
        x = x - (s0 - s1) * eps0 - ((s0 - s1) / (2 * r1)) * (eps1 - eps0)
    return finish(x)


@sampler(nfe=lambda n, o: 3 * n - 2)
def dpm_solver_3(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    long_step: float | None = LONG_STEP,
) -> Tensor:
    """DPM-Solver-3: third-order singlestep exponential integrator in the noise-prediction form.

    Each interval of ``sigmas`` is one step. With ``h = log(sigma_i / sigma_{i+1})``, ``r1 = 1/3``,
    ``r2 = 2/3``, ``s_k = sigma_i e^{-r_k h}``, ``eps_i = (x_i - D_i)/sigma_i`` and
    ``psi(z) = (e^z - 1)/z - 1 = z phi_2(z)``:

        u1      = x_i - (sigma_i - s_1) eps_i,                 D1 = eps(u1, s_1) - eps_i
        u2      = x_i - (sigma_i - s_2) eps_i - s_2 (r2/r1) psi(r2 h) D1,   D2 = eps(u2, s_2) - eps_i
        x_{i+1} = x_i - (sigma_i - sigma_{i+1}) eps_i - (sigma_{i+1}/r2) psi(h) D2

    Steps are not grouped: every interval ending at ``sigma > 0`` is a third-order step (3 calls);
    the interval to ``sigma = 0`` is the first-order step ``x = D``. Order 3; ``NFE = 3N - 2``.
    A long step (``sigma_i / sigma_{i+1} > long_step``, as ``heun``) is taken with the same three
    calls in the data-prediction form: ``u = lerp(D_i, x_i, s_1 / sigma_i)`` (first order to
    ``s_1``), then ``dpmpp_2s`` from ``s_1`` to ``sigma_{i+1}`` through their geometric mean.
    ``long_step=None``: Alg. 2 on every step.

    References:
        Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
        10 Steps", NeurIPS 2022, Alg. 2 (DPM-Solver-3).
    """
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    long_step = check_long_step(long_step)
    s, model = prepare(denoiser, x, sigmas)
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        h = math.log(s0 / s1)
        sa, sb = s0 * math.exp(-r1 * h), s0 * math.exp(-r2 * h)
        if is_long(s0, s1, long_step):
            u1 = torch.lerp(d, x, sa / s0)
            x = midpoint_step(model, u1, model(u1, sa), sa, s1, math.sqrt(sa * s1))
            continue
        eps0 = to_d(x, s0, d)
        u1 = x - (s0 - sa) * eps0
        d1 = (u1 - model(u1, sa)) / sa - eps0
        u2 = x - (s0 - sb) * eps0 - (sb * (r2 / r1) * r2 * h * phi(2, r2 * h)) * d1
        d2 = (u2 - model(u2, sb)) / sb - eps0
        x = x - (s0 - s1) * eps0 - (s1 / r2 * h * phi(2, h)) * d2
    return finish(x)


@sampler(nfe=lambda n, o: 2 * n - 1)
def dpmpp_2s(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++(2S): second-order singlestep exponential integrator in the data-prediction form.

    With ``h = log(sigma_i / sigma_{i+1})`` and the intermediate level ``s = sigma_i e^{-r h}``:

        u       = (s / sigma_i) x_i - expm1(-r h) D_i
        D'      = (1 - 1/(2r)) D_i + 1/(2r) D(u, s)
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D'

    Each interval ending at ``sigma > 0`` costs 2 calls; the interval to ``sigma = 0`` is ``x = D``.
    Order 2; ``NFE = 2N - 1``.

    References:
        Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
        arXiv:2211.01095 (2022), Alg. 1.
    """
    check_number("r", r, low=0, high=1, low_ok=False, what=_FRACTION)
    s, model = prepare(denoiser, x, sigmas)
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        x = midpoint_step(model, x, d, s0, s1, s0 * math.exp(-r * math.log(s0 / s1)), r)
    return finish(x)


@sampler(nfe=lambda n, o: n)
def dpmpp_3m(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    variant: str = "exact",
    long_step: float | None = LONG_STEP,
) -> Tensor:
    """DPM-Solver++(3M): third-order multistep exponential integrator in the data-prediction form.

    ``D`` is interpolated in ``lambda = -log sigma`` through the last three outputs ``D_i, D_{i-1},
    D_{i-2}`` (nodes ``tau_j = lambda_{i-j} - lambda_i``, ``p(tau) = D_i + tau D' + tau^2/2 D''``) and
    the step integrates it exactly against the exponential kernel:

        x_{i+1} = e^{-h} x_i + C_0(h) D_i + C_1(h) D' + C_2(h) D'',
        C_k(h)  = int_0^h e^{-(h-tau)} tau^k / k! dtau = h^{k+1} phi_{k+1}(-h)

    (``C_0 = -expm1(-h)``, ``C_1 = h + expm1(-h)``, ``C_2 = h^2/2 - h - expm1(-h)``, evaluated by
    series at small ``h``). Warm-up: orders 1 and 2 at the first two steps; the last step, to
    ``sigma = 0``, is ``x = D``. The steps are third order; the first-order first step leaves an
    O(h^2) term with a small constant (``D`` barely moves at ``sigma_max``), so the global error
    falls like h^3 over practical step counts and like h^2 asymptotically
    (``tests/test_samplers_order.py`` measures both). Unlike the reference DPM-Solver code, the
    ``D''`` term carries the exact weight ``C_2`` (theirs is half of it). ``NFE = N``.

    ``variant="k-diffusion"`` reproduces k-diffusion's update (its ``sample_dpmpp_3m_sde`` at
    ``eta = 0``, the "DPM++ 3M" of tools built on it) for users porting settings: the same steps with
    ``C_2 / 2`` on ``D''``. The half weight is not the Taylor coefficient, so its steps are second
    order; it is less accurate than the default at 25 steps and can be slightly more accurate at
    100+ steps, where the warm-up's O(h^2) term dominates and the two errors partly cancel.

    A long step (``sigma_i / sigma_{i+1} > long_step``, default 10, ``common.LONG_STEP``) is first
    order (``x_{i+1} = lerp(D_i, x_i, sigma_{i+1} / sigma_i)``): the quadratic through the history
    extrapolated over it amplifies the history's errors (on an eps network the largest, from the
    largest sigmas). ``long_step=None`` keeps order 3 on every step.

    References:
        Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
        arXiv:2211.01095 (2022), Sec. 4 (multistep solvers; third order by the same Taylor
        construction). Hochbruck & Ostermann, "Exponential integrators", Acta Numerica 2010, Sec. 2.
        Crowson, k-diffusion, ``sampling.py: sample_dpmpp_3m_sde`` (the ``"k-diffusion"`` variant).
    """
    if variant not in ("exact", "k-diffusion"):
        raise ValueError(f"variant must be 'exact' or 'k-diffusion'; got {variant!r}")
    long_step = check_long_step(long_step)
    s, model = prepare(denoiser, x, sigmas)
    hist: list[tuple[float, Tensor]] = []  # (lambda, D), most recent first
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        lam, h = -math.log(s0), math.log(s0 / s1)
        hist = [(lam, d), *hist[:2]]
        if is_long(s0, s1, long_step):
            x = torch.lerp(d, x, s1 / s0)
            continue
        moments = _exp_moments(h, len(hist))
        if variant == "k-diffusion":
            moments[2:] = [0.5 * m for m in moments[2:]]  # half the D'' weight
        w = lagrange_weights([l - lam for l, _ in hist], moments)
        x = combine(x, s1 / s0, w, [t for _, t in hist])
    return finish(x)


@sampler(nfe=lambda n, o: n)
def unipc(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    order: int = 2,
    variant: str = "bh2",
) -> Tensor:
    """UniPC: the UniP-p multistep predictor with the UniC corrector, data-prediction form.

    Step ``i -> i+1`` with ``h = log(sigma_i/sigma_{i+1})``, ``p = min(order, i + 1)``, history nodes
    ``r_m = (lambda_{i-m} - lambda_i) / h`` and differences ``Delta_m = (D_{i-m} - D_i) / r_m``:

        predictor  x^p_{i+1} = e^{-h} x_i + C_0(h) D_i + B(h) sum_{m<p} a_m Delta_m
        corrector  x_{i+1}   = e^{-h} x_i + C_0(h) D_i + B(h) (sum_{m<p} c_m Delta_m + c_p Delta_p),
                   Delta_p = D(x^p_{i+1}, sigma_{i+1}) - D_i  (r_p = 1)

    with ``C_k`` as in ``dpmpp_3m`` and ``a`` (resp. ``c``) solving the order conditions
    ``sum_m a_m r_m^{k-1} = k! C_k(h) / (h^k B(h))`` for ``k = 1 .. p-1`` (resp. ``1 .. p``); the
    paper's fixed choice ``1/2`` is used for a single coefficient (UniP-2, UniC-1), where ``B``
    matters: ``B(h) = h`` (``variant="bh1"``) or ``1 - e^{-h}`` (``"bh2"``). The corrector reuses
    the call the next step needs anyway, so it costs nothing; its result at the last positive sigma
    is not used (the step to ``sigma = 0`` is ``x = D`` at the predicted point), so ``NFE = N``.
    The steps have order ``order + 1``; the warm-up starts with UniP-1 + UniC-1 (local error
    O(h^3)), so the global order is ``min(order + 1, 3)`` asymptotically.

    References:
        Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
        Models", NeurIPS 2023, Alg. 2 and 3 (UniP-p, UniC-p), eq. 8 (B(h)).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2'; got {variant!r}")
    s, model = prepare(denoiser, x, sigmas)
    hist: list[tuple[float, Tensor]] = []  # (lambda, D), most recent first
    plan = None  # (x_i, h, hist_i, p) of the step that produced the current x
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        if plan is not None:  # UniC on the point just predicted, with the new output d
            x_prev, h_prev, hist_prev, p_prev = plan
            w = _unipc_weights(hist_prev, h_prev, p_prev, variant, corrector=True)
            x = combine(x_prev, math.exp(-h_prev), w, [*[t for _, t in hist_prev], d])
        emit(callback, i, s0, x, d)
        if s1 == 0:
            x = d
            break
        h = math.log(s0 / s1)
        hist = [(-math.log(s0), d), *hist[: order - 1]]
        p = len(hist)
        w = _unipc_weights(hist, h, p, variant, corrector=False)
        plan = (x, h, hist, p)
        x = combine(x, s1 / s0, w, [t for _, t in hist])
    return finish(x)


def _solve_small(mat: list[list[float]], rhs: list[float]) -> list[float]:
    """Solve a small dense system by Gaussian elimination with partial pivoting (pure Python)."""
    n = len(rhs)
    a = [[*row, b] for row, b in zip(mat, rhs, strict=True)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            a[r] = [vr - f * vc for vr, vc in zip(a[r], a[c], strict=True)]
    out = [0.0] * n
    for r in reversed(range(n)):
        out[r] = (a[r][n] - sum(a[r][k] * out[k] for k in range(r + 1, n))) / a[r][r]
    return out


def _unipc_weights(
    hist: list[tuple[float, Tensor]], h: float, p: int, variant: str, *, corrector: bool
) -> list[float]:
    """Weights on ``[D_i, D_{i-1}, ..., D_{i-p+1}]`` (``+ [D_{i+1}]`` for the corrector) of UniPC."""
    lam0 = hist[0][0]
    r = [(l - lam0) / h for l, _ in hist[1:p]] + ([1.0] if corrector else [])
    c = _exp_moments(h, len(r) + 1)  # c[k] = k! C_k(h)
    b = h if variant == "bh1" else -math.expm1(-h)
    if len(r) == 1:
        a = [0.5]
    elif r:
        mat = [[rm ** (k - 1) for rm in r] for k in range(1, len(r) + 1)]
        rhs = [c[k] / (h**k * b) for k in range(1, len(r) + 1)]
        a = _solve_small(mat, rhs)
    else:
        a = []
    # B sum_m a_m (D_m - D_i) / r_m  ->  weights on D_m, and minus their sum on D_i.
    extra = [b * am / rm for am, rm in zip(a, r, strict=True)]
    w = [c[0] - sum(extra), *extra]
    return w


def _lower_gamma(k: int, h: float) -> float:
    """``int_0^h w^k e^{-w} dw`` (``= k!`` at ``h = inf``), by series for ``h < 1`` (no cancellation)."""
    if math.isinf(h):
        return float(math.factorial(k))
    if h < 1:  # h^{k+1} sum_n (-h)^n / (n! (k + 1 + n))
        total, term, n = 0.0, h ** (k + 1), 0
        while abs(term) > 1e-18 * abs(total) or n < 2:
            total += term / (k + 1 + n)
            n += 1
            term *= -h / n
        return total
    return math.factorial(k) * (
        1 - math.exp(-h) * sum(h**j / math.factorial(j) for j in range(k + 1))
    )


@sampler(nfe=lambda n, o: n)
def deis(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    order: int = 3,
    basis: str = "logrho",
) -> Tensor:
    """DEIS: exponential-integrator multistep with polynomial extrapolation of ``eps``.

    In the sigma frame the ODE ``dx/dsigma = eps(x, sigma)`` has no linear part (``rho = sigma`` in
    the paper's notation), so the exponential integrator is an Adams-Bashforth method: ``eps`` is
    extrapolated by the Lagrange polynomial through its last ``q = min(order, i + 1)`` values and
    integrated exactly over the step,

        x_{i+1} = x_i + sum_j eps_{i-j} int_{sigma_i}^{sigma_{i+1}} l_j(v(sigma)) dsigma,

    with ``l_j`` the Lagrange basis on the nodes ``v(sigma_i), ..., v(sigma_{i-q+1})`` (variable steps
    allowed) in the variable ``v = sigma`` (``basis="rho"``, rho-AB-DEIS) or ``v = log sigma``
    (``basis="logrho"``, the default: ``eps`` is much closer to a low-degree polynomial in
    ``log sigma`` on graded grids). For ``logrho`` the moments are closed-form,
    ``int_{sigma_i}^{sigma_{i+1}} (log sigma - log sigma_i)^k dsigma = (-1)^{k+1} sigma_i
    gamma(k + 1, h)`` with ``h = log(sigma_i / sigma_{i+1})`` and the lower incomplete gamma function,
    finite at ``sigma_{i+1} = 0``, so the last step uses the same formula in both bases. Warm-up: lower
    orders while the history is short (the first step is Euler, so the asymptotic global order is
    ``min(order, 2)``; the higher-order steps shrink the error constant). ``NFE = N``.

    References:
        Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023,
        eq. 15 and Sec. 4 (rho-AB-DEIS; the polynomial in the time variable).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
    if basis not in ("rho", "logrho"):
        raise ValueError(f"basis must be 'rho' or 'logrho'; got {basis!r}")
    s, model = prepare(denoiser, x, sigmas)
    hist: list[tuple[float, Tensor]] = []  # (sigma, eps), most recent first
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        hist = [(s0, to_d(x, s0, d)), *hist[: order - 1]]
        q = len(hist)
        if basis == "rho":
            nodes = [sj - s0 for sj, _ in hist]
            moments = [(s1 - s0) ** (k + 1) / (k + 1) for k in range(q)]
        else:
            h = math.log(s0 / s1) if s1 > 0 else math.inf
            nodes = [math.log(sj / s0) for sj, _ in hist]
            moments = [(-1) ** (k + 1) * s0 * _lower_gamma(k, h) for k in range(q)]
        w = lagrange_weights(nodes, moments)
        x = combine(x, 1.0, w, [e for _, e in hist])
    return finish(x)


#: Adams-Bashforth coefficients for equal steps, newest derivative first.
_AB = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


@sampler(nfe=lambda n, o: n)
def ipndm(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    order: int = 4,
    variant: str = "variable",
) -> Tensor:
    """iPNDM: Adams-Bashforth in ``sigma`` up to order 4 with lower-order warm-up.

    With ``d_i = (x_i - D_i) / sigma_i`` and ``q = min(order, i + 1)``:

        x_{i+1} = x_i + sum_{j<q} w_j d_{i-j}.

    ``variant="equal"`` is the published method: the fixed equal-step coefficients
    ``w_j = (sigma_{i+1} - sigma_i) b^{(q)}_j``, ``b^{(1..4)} = [1], [3, -1]/2, [23, -16, 5]/12,
    [55, -59, 37, -9]/24``. ``variant="variable"`` (the default) integrates the Lagrange polynomial
    through ``(sigma_{i-j}, d_{i-j})`` exactly over the step, ``w_j = int_{sigma_i}^{sigma_{i+1}} l_j``
    (variable-step Adams-Bashforth); on equal steps the two coincide.

    Why variable steps by default: with steps graded geometrically, ``sigma_{i+1} = sigma_i / r``, a
    perturbation ``delta`` of ``x`` along the noise (``dx/dsigma = delta / sigma`` there) should shrink
    by ``1/r`` per step. The equal-step recurrence ``delta_{i+1} = delta_i - (1 - 1/r) sum_j b_j r^-j
    delta_{i-j}`` has a parasitic root of modulus above 1 for ``r > 2.05`` at order 4 (1.08 at
    ``r = 2.6``: 10 steps log-linear from 157 to 0.03; 1.21 at ``r = 5.5``: 5 steps) and 0.70 for order
    3 at ``r = 2.6``, where the exact factor is 0.385: errors of the denoiser made at large ``sigma``,
    where the steps in ``sigma`` are longest, are carried to ``sigma = 0`` instead of decaying. An exact
    denoiser feeds almost nothing into that mode; a trained eps-prediction network, whose ``eps``
    error is multiplied by ``|sigma_{i+1} - sigma_i|`` (tens at the first steps), does. The variable-step
    weights give no root above the exact ``1/r`` (a polynomial in ``sigma`` through far-back nodes puts
    little weight on them), so the method stays bounded where Euler does, at the price of the equal-step
    variant's extra accuracy on exact targets at 10-20 steps. ``NFE = N``.

    The first steps use the lower-order formulas instead of PNDM's Runge-Kutta warm-up. Order
    ``order`` on uniform grids; on graded grids the global order is 2 (the first step is Euler).

    References:
        Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023,
        App. (iPNDM). Zhou et al., "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps",
        CVPR 2024, Sec. 3 and eq. 9. Hairer, Norsett & Wanner, "Solving Ordinary Differential
        Equations I", Sec. III.5 (variable-step Adams methods).
    """
    if order not in _AB:
        raise ValueError(f"order must be 1, 2, 3 or 4; got {order!r}")
    if variant not in ("variable", "equal"):
        raise ValueError(f"variant must be 'variable' or 'equal'; got {variant!r}")
    s, model = prepare(denoiser, x, sigmas)
    hist: list[tuple[float, Tensor]] = []  # (sigma, d), most recent first
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        emit(callback, i, s0, x, d)
        hist = [(s0, to_d(x, s0, d)), *hist[: order - 1]]
        if variant == "equal":
            w = [(s1 - s0) * b for b in _AB[len(hist)]]
        else:
            moments = [(s1 - s0) ** (k + 1) / (k + 1) for k in range(len(hist))]
            w = lagrange_weights([sj - s0 for sj, _ in hist], moments)
        x = combine(x, 1.0, w, [e for _, e in hist])
    return finish(x)
