"""DPM-Solver-v3's multistep corrector and pseudo-order estimate (``samplers.dpm3``).

Three kinds of check:

* the sampler against a reimplementation written here from the paper's formulas (Zheng et al.,
  NeurIPS 2023, eq. 9-14, Sec. 3.3-3.4) for constant statistics ``l, s, b``, where every integral has
  a closed form or is taken by scipy's ``quad`` (the code under test uses Simpson/trapezoid on its
  own grid), and the interpolant is solved from a Vandermonde system (full) or a divided-difference
  table (pseudo-order), not through ``common.lagrange_weights``;
* convergence order against scipy's DOP853 at 1e-13 on an exact 2-D mixture (as
  ``tests/test_samplers_order.py``), with and without non-trivial statistics;
* exact NFE, determinism and batch independence with the corrector on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from scorekit.analytic import GaussianMixture
from scorekit.samplers import REGISTRY, nfe, sample
from scorekit.samplers.dpm3 import EMS, fit_ems
from scorekit.schedules import karras, loglinear

SIGMA_MAX, SIGMA_MIN, BATCH = 10.0, 0.05, 16


def _mixture():
    return GaussianMixture(
        torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], dtype=torch.float64),
        torch.tensor([[0.3, 0.2], [0.2, 0.4], [0.25, 0.25]], dtype=torch.float64),
    )


def _constant_ems(l, s, b):
    lam = torch.tensor([-8.0, 8.0], dtype=torch.float64)
    rows = [torch.as_tensor(v, dtype=torch.float64).expand(2, 2).clone() for v in (l, s, b)]
    return EMS(lam, *rows)


# -- the reimplementation ------------------------------------------------------------------------------


def _dd_poly(taus, g):
    """Pseudo-order: sum_k g[tau_0..tau_k] tau^k; returns the coefficients [k] of each row/coord."""
    table = [list(g)]
    for k in range(1, len(taus)):
        prev = table[-1]
        table.append(
            [(prev[j + 1] - prev[j]) / (taus[j + k] - taus[j]) for j in range(len(prev) - 1)]
        )
    return [table[k][0] for k in range(len(taus))]


def _full_poly(taus, g):
    """The interpolant's monomial coefficients from the Vandermonde system."""
    v = np.vander(np.asarray(taus), increasing=True)
    stacked = np.stack([gj.numpy() for gj in g])  # [q, B, D]
    coef = np.linalg.solve(v, stacked.reshape(len(taus), -1)).reshape(stacked.shape)
    return [torch.from_numpy(c) for c in coef]


def _ref_step(x_s, lam_s, lam_t, nodes, consts, pseudo):
    """x_t from the exact formula with constant l, s, b (per coordinate) and a polynomial in tau."""
    l, s, b = consts
    h = lam_t - lam_s
    taus = [lj - lam_s for lj, _ in nodes]
    g = [
        torch.exp(-s * d) * fj - b * (1 - torch.exp(-s * d)) / s
        for d, (_, fj) in zip(taus, nodes, strict=True)
    ]
    coef = (_dd_poly if pseudo else _full_poly)(taus, g)
    out = torch.empty_like(x_s)
    for c in range(x_s.shape[1]):
        a, lc, sc, bc = float(l[c] + s[c]), float(l[c]), float(s[c]), float(b[c])
        moments = [quad(lambda t, k=k, a=a: math.exp(a * t) * t**k, 0, h, epsabs=0, epsrel=1e-13)[0]
                   for k in range(len(taus))]  # fmt: skip
        rest = bc / sc * (math.expm1(a * h) / a - math.expm1(lc * h) / lc)
        integral = sum(m * ck[:, c] for m, ck in zip(moments, coef, strict=True)) + rest
        out[:, c] = math.exp(-lc * h) * (x_s[:, c] - integral)
    return out


def _reference(den, x, sig, consts, order, corrector, pseudo, until=None):
    """The sampler's path; ``until``: correct the state at node ``sigma_i`` only if ``sigma_i > until``."""
    l = consts[0]
    lams = [-math.log(v) for v in sig[:-1].tolist()]
    hist, plan = [], None  # hist: (lambda, f), most recent first
    for i, lam in enumerate(lams):
        d = den(x, torch.full((x.shape[0],), sig[i].item(), dtype=x.dtype))
        f = (1 - l) * x - d
        if plan is not None:
            x_s, lam_s, used = plan
            x = _ref_step(x_s, lam_s, lam, [used[0], (lam, f), *used[1:]], consts, pseudo)
        if i == len(lams) - 1:
            return d
        hist = [(lam, f), *hist[: order - 1]]
        keep = corrector and (until is None or sig[i + 1].item() > until)
        plan = (x, lam, hist) if keep else None
        x = _ref_step(x, lam, lams[i + 1], hist, consts, pseudo)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize(
    ("corrector", "pseudo"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_matches_the_papers_formulas_with_constant_statistics(order, corrector, pseudo):
    gm = _mixture()
    x = 10.0 * torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sig = karras(7, 0.05, 10.0)
    consts = [torch.tensor(v, dtype=torch.float64) for v in ([0.7, 0.9], [0.3, -0.2], [0.1, -0.05])]
    want = _reference(gm, x, sig, consts, order, corrector, pseudo)
    got = REGISTRY["dpm_solver_v3"](
        gm, x, sig, statistics=_constant_ems(*consts), order=order, corrector=corrector,
        pseudo_order=pseudo, long_step=None,
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if corrector or (pseudo and order == 3):  # the options change the path (not vacuous); with
        # two nodes the pseudo-order and full estimates are the same divided difference
        base = _reference(gm, x, sig, consts, order, False, False)
        assert (want - base).abs().max() > 1e-3


@pytest.mark.parametrize("until", [0.5, 2.0])
def test_half_corrector(until):
    # The half-corrector corrects the nodes with sigma > until only: against the reimplementation, and
    # the states at the kept nodes equal the full corrector's, the final sample differs from both
    # the full corrector's and the predictor's.
    gm = _mixture()
    x = 10.0 * torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sig = karras(7, 0.05, 10.0)
    consts = [torch.tensor(v, dtype=torch.float64) for v in ([0.7, 0.9], [0.3, -0.2], [0.1, -0.05])]
    kw = {"statistics": _constant_ems(*consts), "order": 3, "long_step": None, "corrector": True}
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gm(x, sigma)

    half: list[dict] = []
    got = REGISTRY["dpm_solver_v3"](
        counting, x, sig, corrector_until=until, callback=half.append, **kw
    )
    assert len(calls) == 7 == nfe("dpm_solver_v3", sig, corrector_until=until, **kw)
    want = _reference(gm, x, sig, consts, 3, True, False, until=until)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    full: list[dict] = []
    REGISTRY["dpm_solver_v3"](gm, x, sig, callback=full.append, **kw)
    kept = [i for i in range(7) if sig[i].item() > until]
    assert 2 <= len(kept) < 7
    for i in kept:  # callback i shows the state at node i after its correction
        torch.testing.assert_close(half[i]["x"], full[i]["x"], rtol=0, atol=0)
    first = kept[-1] + 1
    assert (half[first]["x"] - full[first]["x"]).abs().max() > 1e-4
    none = _reference(gm, x, sig, consts, 3, False, False)
    full_end = _reference(gm, x, sig, consts, 3, True, False)
    assert min((want - none).abs().max(), (want - full_end).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="corrector_until"):
        REGISTRY["dpm_solver_v3"](gm, x, sig, corrector_until=1.0)
    with pytest.raises(ValueError, match="corrector_until"):
        REGISTRY["dpm_solver_v3"](gm, x, sig, corrector=True, corrector_until=-1.0)


# -- convergence order ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem(mixture_ode):
    """``conftest.mixture_ode``: the exact mixture's PF-ODE from sigma 10 to 0.05 (DOP853, 1e-13)."""
    return mixture_ode


#: statistics linear in lambda (exact under EMS's linear interpolation: no kinks), s and b nonzero
_LINEAR = EMS(
    torch.tensor([-4.0, 5.0], dtype=torch.float64),
    torch.tensor([[0.6, 0.7], [1.05, 1.15]], dtype=torch.float64),
    torch.tensor([[0.3, -0.2], [0.3, -0.2]], dtype=torch.float64),
    torch.tensor([[-0.1, 0.05], [0.35, 0.5]], dtype=torch.float64),
)

#: (options, grid, declared order). The corrector raises the predictor's order by one: 2 -> 3 on
#: log-linear steps (the first-order warm-up step, corrected, is second order), 3 -> 4 once the
#: warm-up is made negligible. Pseudo-order estimates the first derivative from two values, so the
#: method is second order whatever ``order`` (the paper uses it for stability at small NFE).
ORDERS = [
    ({"corrector": True}, "loglinear", 3),
    ({"corrector": True}, "fine", 4),
    ({"corrector": True, "statistics": _LINEAR}, "loglinear", 3),
    ({"corrector": True, "statistics": _LINEAR}, "fine", 4),
    ({"statistics": _LINEAR}, "fine", 3),
    ({"corrector": True, "order": 2}, "fine", 3),
    ({"pseudo_order": True}, "loglinear", 2),
    ({"pseudo_order": True, "corrector": True, "statistics": _LINEAR}, "loglinear", 2),
]


def _name(case):
    opts, grid, order = case
    keys = [("ems" if k == "statistics" else f"{k}={v}") for k, v in opts.items()]
    return "-".join([*keys, grid, f"order{order}"])


@pytest.mark.parametrize(("opts", "grid", "order"), ORDERS, ids=[_name(c) for c in ORDERS])
def test_convergence_order(problem, fine_start_grid, opts, grid, order):
    gm, x0, ref = problem
    errs = []
    for n in (24, 48, 96):
        sig = loglinear(n, SIGMA_MIN, SIGMA_MAX) if grid == "loglinear" else fine_start_grid(n)
        states: list[dict] = []
        REGISTRY["dpm_solver_v3"](gm, x0.clone(), sig, callback=states.append, **opts)
        assert states[-1]["sigma"] == pytest.approx(SIGMA_MIN)
        errs.append((states[-1]["x"] - ref).abs().max().item())
    slope = -math.log(errs[-1] / errs[0]) / math.log(4)
    assert slope >= order - 0.3, f"{opts} {grid}: errors {errs}, slope {slope:.2f}"
    assert errs[-1] < 1e-2


# -- contract with the corrector on ----------------------------------------------------------------------

OPTS = {"corrector": True, "pseudo_order": True, "order": 3}


def test_exact_nfe_determinism_and_batch_independence():
    gm = _mixture()
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return gm(x, sigma)

    x = 10.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for n in (1, 2, 5, 8):
        sig = karras(n, 0.05, 10.0)
        calls.clear()
        a = REGISTRY["dpm_solver_v3"](counting, x, sig, **OPTS)
        assert len(calls) == n == nfe("dpm_solver_v3", sig, **OPTS)
        torch.testing.assert_close(REGISTRY["dpm_solver_v3"](gm, x, sig, **OPTS), a, rtol=0, atol=0)
        for i in (0, 3):
            one = REGISTRY["dpm_solver_v3"](gm, x[i : i + 1], sig, **OPTS)
            torch.testing.assert_close(one[0], a[i], rtol=1e-12, atol=1e-12)
    calls.clear()
    out = sample(counting, (3, 2), nfe=7, sampler="dpm_solver_v3", seed=1, **OPTS)
    assert len(calls) == 7 and out.shape == (3, 2)
    with pytest.raises(TypeError, match="corrector"):
        REGISTRY["dpm_solver_v3"](gm, x, karras(4, 0.05, 10.0), corrector=1)
    with pytest.raises(TypeError, match="pseudo_order"):
        REGISTRY["dpm_solver_v3"](gm, x, karras(4, 0.05, 10.0), pseudo_order="yes")


def test_fit_ems_clips_the_ill_determined_slope():
    # On ring8 at sigma 20, f = (1 - l) x - D barely varies across the rows and the least-squares
    # slope s is huge; unclipped, e^{-S} over a few steps overflows. s_max (default 1) clips it.
    from scorekit.analytic import target
    from scorekit.pfode import pf_ode_reference

    g = target("ring8")
    kw = {"sigma_min": 0.02, "sigma_max": 20.0, "grid": 6, "seed": 1, "reference_rtol": 1e-4}
    raw = fit_ems(g, (16, 2), s_max=None, **kw)
    ems = fit_ems(g, (16, 2), **kw)
    assert raw.s.abs().max() > 100 and ems.s.abs().max() <= 1.0
    torch.testing.assert_close(ems.l, raw.l, rtol=0, atol=0)
    kept = raw.s.abs() <= 1.0
    assert torch.equal(ems.s[kept], raw.s[kept]) and torch.equal(ems.b[kept], raw.b[kept])
    x = 20.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = pf_ode_reference(g, x, 20.0, 0.0, rtol=1e-8, atol=1e-8)
    sig = karras(5, 0.05, 20.0)
    e_uni = (REGISTRY["unipc"](g, x, sig, order=3) - ref).square().mean().sqrt()
    e_v3 = (REGISTRY["dpm_solver_v3"](g, x, sig, statistics=ems) - ref).square().mean().sqrt()
    assert e_v3 < 3 * e_uni, (float(e_v3), float(e_uni))  # measured 1.6x
    with pytest.raises(FloatingPointError):
        REGISTRY["dpm_solver_v3"](g, x, sig, statistics=raw)
    with pytest.raises(ValueError, match="s_max"):
        fit_ems(g, (4, 2), s_max=0.0, **kw)
