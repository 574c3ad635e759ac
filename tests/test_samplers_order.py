"""Convergence order of the ODE samplers against an independent tight solve, in float64.

Problem: the probability-flow ODE of an exact 2-D Gaussian mixture (its denoiser is exact at every
sigma) from sigma = 10 to sigma = 0.05, 16 start points. Reference: scipy's DOP853 with
rtol = atol = 1e-13 in ``u = log sigma`` (``dx/du = x - D(x, e^u)``), not torchdiffeq and not our code.
The sampler runs on ``loglinear(n, 0.05, 10)`` plus the final 0; its state at sigma = 0.05 (step
``n - 1``, seen through ``callback``) is compared with the reference. The slope of log max-error
against log n over n = 24, 48, 96 must reach the declared order minus 0.3.

Declared orders are the asymptotic global orders. Multistep methods that start with a first-order
step (dpmpp_3m, deis with order 3, ipndm: the lower-order warm-up the papers prescribe) have a local
error O(h^2) in that one step, so their global order is 2 however high the order of the later steps.
A second test takes the warm-up on two steps of size h^2/4 (local error O(h^4)), so the global error
shows the order of the multistep steps themselves: 3 for dpmpp_3m and deis(3), order + 1 for UniPC.
iPNDM's fixed equal-step coefficients are second order on a graded grid and are declared so; a
third test checks orders 1-4 on equal steps (a quadrature problem with a flat start).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scorekit.samplers import ADAPTIVE, REGISTRY, STOCHASTIC
from scorekit.schedules import loglinear

SIGMA_MAX, SIGMA_MIN, BATCH = 10.0, 0.05, 16
NS = (24, 48, 96)

#: (name, options, declared asymptotic global order)
CASES = [
    ("euler", {}, 1),
    ("heun", {}, 2),
    ("dpm_solver_2", {}, 2),
    ("dpm_solver_3", {}, 3),
    ("dpmpp_2s", {}, 2),
    ("dpmpp_2s", {"r": 0.7}, 2),
    ("dpm_solver_2", {"r1": 0.3}, 2),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_3m", {}, 2),  # first step is first order (warm-up)
    ("unipc", {"order": 1, "variant": "bh1"}, 2),
    ("unipc", {"order": 1, "variant": "bh2"}, 2),
    ("unipc", {"order": 2, "variant": "bh1"}, 3),
    ("unipc", {"order": 2, "variant": "bh2"}, 3),
    ("unipc", {"order": 3, "variant": "bh2"}, 3),  # UniC-1 start: second-order first step
    ("dc_solver", {}, 3),  # without fitted ratios: unipc(3, bh2)
    ("dpm_solver_v3", {}, 2),  # without statistics: dpmpp_3m through the quadrature
    ("deis", {"order": 1}, 1),
    ("deis", {"order": 2}, 2),
    ("deis", {"order": 3}, 2),  # first step is first order (warm-up)
    ("deis", {"order": 2, "basis": "rho"}, 2),
    ("deis", {"order": 3, "basis": "rho"}, 2),
    ("ipndm", {"order": 4}, 2),  # fixed equal-step coefficients on a graded grid + warm-up
    ("bespoke", {}, 2),  # without fitted coefficients: ipndm written as a linear solver
]


def test_every_ode_sampler_has_an_order_case():
    # Derived from the registry: every fixed-step ODE sampler, including one added later.
    ode = set(REGISTRY) - STOCHASTIC - ADAPTIVE
    assert {c[0] for c in CASES} == ode


@pytest.fixture(scope="module")
def problem(mixture_ode):
    """``conftest.mixture_ode``: the exact mixture's PF-ODE from sigma 10 to 0.05 (DOP853, 1e-13)."""
    return mixture_ode


def _error_at_sigma_min(problem, name, opts, n):
    gm, x0, ref = problem
    seen = {}

    def grab(info):
        if info["i"] == n - 1:
            assert info["sigma"] == pytest.approx(SIGMA_MIN)
            seen["x"] = info["x"]

    REGISTRY[name](gm, x0.clone(), loglinear(n, SIGMA_MIN, SIGMA_MAX), callback=grab, **opts)
    return (seen["x"] - ref).abs().max().item()


@pytest.mark.parametrize(("name", "opts", "order"), CASES, ids=lambda v: str(v))
def test_convergence_order(problem, name, opts, order):
    errs = [_error_at_sigma_min(problem, name, opts, n) for n in NS]
    logn = torch.tensor([math.log(n) for n in NS], dtype=torch.float64)
    loge = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    slope = -float(
        ((logn - logn.mean()) * (loge - loge.mean())).sum() / (logn - logn.mean()).square().sum()
    )
    assert slope >= order - 0.3, f"{name} {opts}: errors {errs}, slope {slope:.2f} < {order} - 0.3"
    assert errs[-1] < 0.05


def test_higher_order_steps_shrink_the_error_constant(problem):
    # The third-order multistep steps of dpmpp_3m / deis(3) / unipc(3) after their warm-up make the
    # error at practical step counts far below their second-order siblings'.
    n = 24
    e2m = _error_at_sigma_min(problem, "dpmpp_2m", {}, n)
    e3m = _error_at_sigma_min(problem, "dpmpp_3m", {}, n)
    assert e3m < e2m / 4
    assert _error_at_sigma_min(problem, "deis", {"order": 3}, n) < (
        _error_at_sigma_min(problem, "deis", {"order": 2}, n) / 2
    )
    assert _error_at_sigma_min(problem, "unipc", {"order": 3, "variant": "bh2"}, n) < e3m


def test_adaptive_ode_meets_its_tolerance(problem):
    # Error at sigma_min against the scipy reference falls with the tolerance and stays within a small
    # multiple of it; the calls it reports grow as the tolerance tightens.
    errs, calls = [], []
    for tol in (1e-4, 1e-6, 1e-8):
        stats = {}
        errs.append(
            _error_at_sigma_min(
                problem, "adaptive_ode", {"rtol": tol, "atol": tol, "stats": stats}, 2
            )
        )
        calls.append(stats["nfe"])
        assert errs[-1] < 50 * tol, (tol, errs[-1])
    assert errs[0] > errs[1] > errs[2] and calls[0] < calls[1] < calls[2]


#: Multistep formulas and the order of their steps once warmed up: (name, options, order).
STEADY = [
    ("dpmpp_2m", {}, 2),
    ("dpmpp_3m", {}, 3),
    ("deis", {"order": 2}, 2),
    ("deis", {"order": 3}, 3),
    ("unipc", {"order": 1, "variant": "bh2"}, 2),
    ("unipc", {"order": 2, "variant": "bh1"}, 3),
    ("unipc", {"order": 3, "variant": "bh2"}, 4),
]


@pytest.mark.parametrize(("name", "opts", "order"), STEADY, ids=lambda v: str(v))
def test_multistep_steps_have_their_declared_order(problem, fine_start_grid, name, opts, order):
    gm, x0, ref = problem
    errs = []
    for n in NS:
        sig = fine_start_grid(n)
        states: list[dict] = []
        REGISTRY[name](gm, x0.clone(), sig, callback=states.append, **opts)
        states = [info["x"] for info in states]
        assert len(states) == len(sig) - 1  # x at every positive sigma, the last one SIGMA_MIN
        errs.append((states[-1] - ref).abs().max().item())
    slope = -math.log(errs[-1] / errs[0]) / math.log(NS[-1] / NS[0])
    assert slope >= order - 0.3, f"{name} {opts}: errors {errs}, slope {slope:.2f} < {order} - 0.3"


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_has_its_order_on_equal_steps(order):
    # iPNDM's coefficients are Adams-Bashforth's for equal steps. On dx/dsigma = f(sigma), a problem
    # posed through the "denoiser" D(x, sigma) = x - sigma f(sigma), it is a quadrature rule; with
    # f(sigma) = (sigma - s0)^4 cos(sigma) the lower-order warm-up steps are exact to O(h^5), so the
    # global error at sigma_end after n equal steps must fall like h^order. Exact: x0 + int f, by
    # 40-point Gauss-Legendre (exact to rounding for this entire function on a short interval).
    s0, s_end = 2.0, 0.5
    nodes, weights = np.polynomial.legendre.leggauss(40)
    s = 0.5 * (s0 + s_end) + 0.5 * (s_end - s0) * nodes
    exact = 1.0 + 0.5 * (s_end - s0) * float(np.sum(weights * (s - s0) ** 4 * np.cos(s)))

    def forcing(x, sigma):
        return x - (sigma * (sigma - s0) ** 4 * sigma.cos()).reshape(-1, 1)

    errs = []
    for n in (8, 16, 32):
        sig = torch.cat([torch.linspace(s0, s_end, n + 1, dtype=torch.float64), torch.zeros(1)])
        states: list[dict] = []
        x = torch.ones(1, 1, dtype=torch.float64)
        REGISTRY["ipndm"](forcing, x, sig, callback=states.append, order=order)
        errs.append(abs(states[-1]["x"].item() - exact))
    slope = -math.log(errs[-1] / errs[0]) / math.log(4)
    assert slope >= order - 0.3, f"order {order}: errors {errs}, slope {slope:.2f}"
