"""Bespoke linear solvers (``scorekit.samplers.bespoke``): the linear form of the one-call samplers,
the fitted solver against closed forms and held-out exact solutions, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.analytic import gaussian, target
from scorekit.samplers import REGISTRY, BespokeSolver, bespoke, fit_bespoke, linear_coefficients
from scorekit.samplers.accelerators import GaussianFlow
from scorekit.samplers.bespoke import LINEAR
from scorekit.schedules import karras, loglinear, pf_ode_reference

BASE_OPTIONS = {"unipc": [{"order": 1}, {"order": 3, "variant": "bh1"}], "deis": [{"order": 3}]}


def _noise(rows, dim, seed, sigma):
    g = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(rows, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("base", LINEAR)
@pytest.mark.parametrize("schedule", ["karras", "loglinear"])
def test_the_linear_form_reproduces_each_base_sampler(base, schedule):
    gm = target("ring8")
    sig = karras(6, 0.02, 40.0) if schedule == "karras" else loglinear(6, 0.02, 40.0)
    x = _noise(64, 2, 0, 40.0)
    for opts in BASE_OPTIONS.get(base, [{}]):
        want = REGISTRY[base](gm, x.clone(), sig, **opts)
        a = linear_coefficients(base, sig, **opts)
        assert a.shape == (7, 7)
        assert torch.allclose(a.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-12)
        got = bespoke(gm, x.clone(), sig, coefficients=a)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    # coefficients=None is the base itself
    assert torch.allclose(bespoke(gm, x.clone(), sig, base=base), REGISTRY[base](gm, x, sig))


def test_euler_coefficients_match_their_closed_form():
    # Euler (DDIM) in the sigma frame: x_{k+1} = r_k x_k + (1 - r_k) D_k with r_k = s_{k+1} / s_k, so
    # x_k = (s_k / s_0) x_0 + sum_{j<k} (1 - r_j) (s_k / s_{j+1}) D_j.
    s = [20.0, 7.0, 2.0, 0.5, 0.1, 0.0]
    a = linear_coefficients("euler", s)
    for k in range(1, 6):
        assert a[k, 0] == pytest.approx(s[k] / s[0], abs=1e-14)
        for j in range(k):
            want = (1 - s[j + 1] / s[j]) * (s[k] / s[j + 1] if s[k] > 0 else float(j == k - 1))
            assert a[k, j + 1] == pytest.approx(want, abs=1e-13)


def test_rows_summing_to_one_make_every_base_shift_equivariant():
    # A shift c of the data and of x shifts the sample by c; this is what the row sums encode.
    gm = target("ring8")
    c = torch.tensor([3.0, -1.5], dtype=torch.float64)

    def shifted(x, sigma):
        return gm(x - c, sigma) + c

    sig, x = karras(5, 0.02, 30.0), _noise(32, 2, 1, 30.0)
    for base in LINEAR:
        a = linear_coefficients(base, sig)
        assert torch.allclose(
            bespoke(shifted, x + c, sig, coefficients=a), bespoke(gm, x, sig, coefficients=a) + c,
            atol=1e-10,
        )  # fmt: skip


def test_fit_finds_the_exact_one_step_solver_of_a_gaussian():
    # Data N(m, v I): D(x, s) = m + w (x - m) with w = v / (v + s^2), and the exact PF-ODE solution
    # from x_T at s0 is m + r (x_T - m), r = sqrt(v / (v + s0^2)). One step x_1 = a x_T + (1 - a) D_0
    # is exact iff a + (1 - a) w = r, i.e. a* = (r - w) / (1 - w). Euler's one step has a = 0.
    v, s0, dim = 0.7, 6.0, 3
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    g = gaussian(m, v * torch.ones(dim, dtype=torch.float64))
    w, r = v / (v + s0**2), math.sqrt(v / (v + s0**2))
    a_star = (r - w) / (1 - w)
    solver = fit_bespoke(g, [s0, 0.0], shape=(256, dim), base="euler", iterations=300, lr=0.02)
    assert solver.sigmas.tolist() == [s0, 0.0]  # no teleport: the start is fixed
    assert solver.coefficients[1, 0] == pytest.approx(a_star, abs=2e-3)
    assert solver.coefficients[1].sum() == pytest.approx(1.0, abs=1e-12)
    base_rms, fitted_rms = solver.calibration_rms
    assert fitted_rms < 0.05 * base_rms


def test_fit_beats_its_base_on_held_out_noise():
    # ring8 at 3 calls: the fitted solver (teleport start) against ipndm on the same steps, both
    # measured on noise the fit never saw, against the exact PF-ODE solution.
    gm = target("ring8")
    flow = GaussianFlow.from_mixture(gm)
    smax, sig = 80.0, loglinear(3, 0.05, 10.0)
    solver = fit_bespoke(
        gm, sig, shape=(256, 2), base="ipndm", gaussian=flow, sigma_max=smax,
        iterations=150, lr=0.02, seed=1,
    )  # fmt: skip
    assert solver.teleport and solver.nfe == 3
    assert smax > solver.sigmas[0] > solver.sigmas[1] > solver.sigmas[2] > 0 == solver.sigmas[3]
    x = _noise(512, 2, 7, smax)
    ref = pf_ode_reference(gm, x, smax, 0.0)
    base_out = REGISTRY["ipndm"](gm, flow(x, smax, float(sig[0])), sig)
    calls = []

    def counted(x, s):
        calls.append(1)
        return gm(x, s)

    fit_out = solver(counted, x, gaussian=flow)
    assert len(calls) == 3

    def rms(out):
        return float((out - ref).square().mean().sqrt())

    assert rms(fit_out) < 0.7 * rms(base_out)
    base_rms, fitted_rms = solver.calibration_rms
    assert fitted_rms <= base_rms


def test_round_trip_and_clear_errors():
    gm = target("ring8")
    sig = karras(3, 0.05, 10.0)
    a = linear_coefficients("dpmpp_2m", sig)
    solver = BespokeSolver(sig, a, 10.0, False, "dpmpp_2m", (0.1, 0.05))
    back = BespokeSolver.from_dict(solver.to_dict())
    assert torch.equal(back.sigmas, solver.sigmas) and torch.equal(back.coefficients, a)
    x = _noise(8, 2, 2, 10.0)
    assert torch.allclose(back(gm, x), REGISTRY["dpmpp_2m"](gm, x, sig), atol=1e-12)

    with pytest.raises(ValueError, match="allowed"):
        linear_coefficients("heun", sig)
    with pytest.raises(ValueError, match=r"shape \[N \+ 1, N \+ 1\] = \[4, 4\]"):
        bespoke(gm, x, sig, coefficients=torch.eye(3))
    upper = a.clone()
    upper[1, 3] = 0.5
    with pytest.raises(ValueError, match="lower-triangular"):
        bespoke(gm, x, sig, coefficients=upper)
    bad = a.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="finite"):
        bespoke(gm, x, sig, coefficients=bad)
    teleported = BespokeSolver(sig, a, 80.0, True, "dpmpp_2m", (0.1, 0.05))
    with pytest.raises(ValueError, match="gaussian="):
        teleported(gm, x)
    with pytest.raises(ValueError, match="sigma_max"):
        BespokeSolver.from_dict({**solver.to_dict(), "sigma_max": 1.0})
    with pytest.raises(ValueError, match="sigma_max > sigmas"):
        fit_bespoke(gm, sig, shape=(8, 2), gaussian=GaussianFlow.from_mixture(gm))
    with pytest.raises(ValueError, match="pass gaussian="):
        fit_bespoke(gm, sig, shape=(8, 2), sigma_max=50.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fit_bespoke(gm, [1.0, 2.0, 0.0], shape=(8, 2))


def test_chunked_gradients_give_the_same_fit():
    gm = target("ring8")
    kw = dict(shape=(200, 2), base="dpmpp_2m", iterations=5, lr=0.05, seed=3)
    sig = loglinear(3, 0.05, 20.0)
    whole = fit_bespoke(gm, sig, batch_size=1000, **kw)
    chunked = fit_bespoke(gm, sig, batch_size=64, **kw)  # 64 + 64 + 64 + 8 rows
    assert torch.allclose(whole.coefficients, chunked.coefficients, atol=1e-10)
    assert torch.allclose(whole.sigmas, chunked.sigmas, rtol=1e-10)
    assert math.isclose(whole.calibration_rms[1], chunked.calibration_rms[1], rel_tol=1e-9)
    with pytest.raises(ValueError, match="batch_size"):
        fit_bespoke(gm, sig, shape=(8, 2), batch_size=0)
    with pytest.raises(ValueError, match="exactly one of shape"):
        fit_bespoke(gm, sig)
