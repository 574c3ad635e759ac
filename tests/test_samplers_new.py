"""``sample(..., noise=z)`` and the ``variant="k-diffusion"`` paths of dpmpp_3m / dpmpp_3m_sde.

The k-diffusion reference below is written here from the published update of k-diffusion's
``sample_dpmpp_3m_sde`` (Crowson, k-diffusion ``sampling.py``; its ``eta = 0`` path is the "DPM++ 3M"
ODE sampler): k-diffusion itself is not installed, and the reference shares no code with scorekit.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from scorekit.analytic import GaussianMixture, gaussian, target
from scorekit.samplers import REGISTRY, sample
from scorekit.samplers.common import row_generators
from scorekit.samplers.dc import DCSolver, fit_dc
from scorekit.samplers.dpm3 import EMS, fit_ems
from scorekit.schedules import karras, loglinear


def _mixture():
    return GaussianMixture(
        torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]], dtype=torch.float64),
        torch.tensor([[0.3, 0.2], [0.2, 0.4], [0.25, 0.25]], dtype=torch.float64),
    )


# -- sample(..., noise=z) ---------------------------------------------------------------------------


def test_noise_is_the_start_of_a_hand_written_euler_loop():
    gm = _mixture()
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sig = karras(7, 0.02, 20.0)
    got = sample(gm, (6, 2), sampler="euler", sigmas=sig, noise=z, dtype=torch.float64)
    x = z * 20.0  # Euler on dx/dsigma = (x - D) / sigma, written out
    for s0, s1 in zip(sig[:-1].tolist(), sig[1:].tolist(), strict=True):
        x = x + (s1 - s0) * (x - gm.denoise(x, s0)) / s0
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)


def test_noise_gives_the_seed_path_when_it_is_the_seeds_draw():
    # sample() with seed s starts row i from its own generator's first draw; passing those draws as
    # noise must give the same samples for every deterministic sampler, whatever the nfe.
    gm = _mixture()
    gens = row_generators(9, range(5))
    z = torch.stack([torch.randn(2, generator=g, dtype=torch.float64) for g in gens])
    for name, nfe in (("dpmpp_2m", 6), ("heun", 7), ("unipc", 5)):
        kw = {"sampler": name, "nfe": nfe, "dtype": torch.float64, "sigma_max": 20.0}
        torch.testing.assert_close(
            sample(gm, (5, 2), noise=z, seed=123, **kw), sample(gm, (5, 2), seed=9, **kw)
        )
    # Two samplers from the same z converge to the same ODE solution as the NFE grows.
    kw = {"dtype": torch.float64, "sigma_max": 20.0, "noise": z}
    a = sample(gm, (5, 2), sampler="dpmpp_3m", nfe=200, **kw)
    b = sample(gm, (5, 2), sampler="heun", nfe=399, **kw)
    assert (a - b).abs().max() < 1e-3


def test_noise_is_checked():
    gm = _mixture()
    with pytest.raises(ValueError, match="shape"):
        sample(gm, (4, 2), nfe=5, noise=torch.zeros(3, 2))
    with pytest.raises(TypeError, match="floating"):
        sample(gm, (4, 2), nfe=5, noise=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        sample(gm, (4, 2), nfe=5, noise=torch.full((4, 2), math.nan))
    z = torch.randn(4, 2, dtype=torch.float64)  # cast to the requested dtype
    assert sample(gm, (4, 2), nfe=5, noise=z, dtype=torch.float32).dtype == torch.float32


# -- variant="k-diffusion" ----------------------------------------------------------------------------


def kdiffusion_dpmpp_3m_sde(model, x, sigmas, eta, gen):
    """k-diffusion's published DPM++(3M) SDE update (eta = 0: its DPM++ 3M ODE sampler)."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i].expand(x.shape[0]))
        if sigmas[i + 1] == 0:
            x = den
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * den
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (den - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * (den - d_1) / (h_1 / h)
            if eta:
                noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        d_1, d_2, h_1, h_2 = den, d_1, h, h_1
    return x


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_dpmpp_3m_sde_kdiffusion_variant_is_kdiffusions_path(eta):
    g = target("ring8")
    x = 20.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for sig in (karras(9, 0.02, 20.0), loglinear(4, 0.1, 20.0)):
        want = kdiffusion_dpmpp_3m_sde(g, x, sig, eta, torch.Generator().manual_seed(5))
        got = REGISTRY["dpmpp_3m_sde"](
            g, x, sig, eta=eta, variant="k-diffusion", generator=torch.Generator().manual_seed(5)
        )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
        if eta > 0:  # and it is a different algorithm from scorekit's default
            default = REGISTRY["dpmpp_3m_sde"](
                g, x, sig, eta=eta, generator=torch.Generator().manual_seed(5)
            )
            assert (default - want).abs().max() > 1e-3


def test_dpmpp_3m_kdiffusion_variant_is_kdiffusions_path_and_less_accurate_at_25_steps():
    gm = _mixture()
    x = 10.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = karras(12, 0.05, 10.0)
    want = kdiffusion_dpmpp_3m_sde(gm, x, sig, 0.0, None)
    got = REGISTRY["dpmpp_3m"](gm, x, sig, variant="k-diffusion")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    exact = REGISTRY["dpmpp_3m"](gm, x, sig)
    assert (exact - want).abs().max() > 1e-4  # half vs full D'' weight: a different path
    # Accuracy at 25 steps against a 2000-step solve (error far below both): the exact weight wins.
    fine = REGISTRY["dpmpp_3m"](gm, x, loglinear(2000, 1e-4, 10.0))
    sig25 = loglinear(25, 1e-4, 10.0)
    e_exact = (REGISTRY["dpmpp_3m"](gm, x, sig25) - fine).abs().max()
    e_kd = (REGISTRY["dpmpp_3m"](gm, x, sig25, variant="k-diffusion") - fine).abs().max()
    assert e_exact < e_kd, (e_exact, e_kd)


def test_variants_are_checked():
    g = target("ring8")
    with pytest.raises(ValueError, match="variant"):
        REGISTRY["dpmpp_3m"](g, torch.ones(2, 2), karras(3, 0.1, 1.0), variant="kdiff")
    with pytest.raises(ValueError, match="variant"):
        REGISTRY["dpmpp_3m_sde"](g, torch.ones(2, 2), karras(3, 0.1, 1.0), variant="exact")


# -- SA-Solver ----------------------------------------------------------------------------------------

SIGMA_MAX, SIGMA_MIN, BATCH = 10.0, 0.05, 16


@pytest.fixture(scope="module")
def ode_problem(mixture_ode):
    """``conftest.mixture_ode``: the exact mixture's PF-ODE from sigma 10 to 0.05 (DOP853, 1e-13)."""
    return mixture_ode


def _error_at_sigma_min(problem, name, opts, n):
    gm, x0, ref = problem
    seen = {}

    def grab(info):
        if info["i"] == n - 1:
            seen["x"] = info["x"]

    REGISTRY[name](gm, x0.clone(), loglinear(n, SIGMA_MIN, SIGMA_MAX), callback=grab, **opts)
    return (seen["x"] - ref).abs().max().item()


def _slope(problem, name, opts, ns=(24, 48, 96)):
    errs = [_error_at_sigma_min(problem, name, opts, n) for n in ns]
    return -math.log(errs[-1] / errs[0]) / math.log(ns[-1] / ns[0]), errs


#: SA-Solver at tau = 0 (the ODE): (predictor_order, corrector_order, global order). A corrector with
#: c >= 2 nodes corrects the first-order warm-up step too, so the order is min(p + 1, c).
SA_ORDERS = [(1, 0, 1), (2, 0, 2), (1, 2, 2), (2, 3, 3), (3, 3, 3), (4, 4, 4)]


@pytest.mark.parametrize(("p", "c", "order"), SA_ORDERS, ids=str)
def test_sa_solver_order_on_the_ode(ode_problem, p, c, order):
    opts = {"tau": 0.0, "predictor_order": p, "corrector_order": c}
    slope, errs = _slope(ode_problem, "sa_solver", opts)
    assert slope >= order - 0.3, f"SA-Solver p={p} c={c}: errors {errs}, slope {slope:.2f}"


def test_sa_solver_special_cases_are_known_samplers():
    g = target("checker")
    x = 40.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = karras(9, 0.01, 40.0)
    # tau = 0 with three predictor nodes and no corrector: the exact-moment 3M step of dpmpp_3m
    # (both with the published update on every step: their long-step thresholds differ).
    a = REGISTRY["sa_solver"](
        g, x, sig, tau=0.0, predictor_order=3, corrector_order=0, long_step=None
    )
    want = REGISTRY["dpmpp_3m"](g, x, sig, long_step=None)
    torch.testing.assert_close(a, want, rtol=0, atol=1e-12)
    # tau = 1 with one node: DDPM's ancestral step (same noise stream).
    gens = [torch.Generator().manual_seed(i) for i in range(32)]
    b = REGISTRY["sa_solver"](
        g, x, sig, tau=1.0, predictor_order=1, corrector_order=0, generator=gens
    )
    gens = [torch.Generator().manual_seed(i) for i in range(32)]
    want = REGISTRY["euler_ancestral"](g, x, sig, eta=1.0, generator=gens)
    torch.testing.assert_close(b, want, rtol=0, atol=1e-12)
    # tau as a function of sigma: 0 everywhere is the ODE; a band differs from both ends.
    zero = REGISTRY["sa_solver"](g, x, sig, tau=lambda s: 0.0)
    torch.testing.assert_close(zero, REGISTRY["sa_solver"](g, x, sig, tau=0.0), rtol=0, atol=0)
    band = REGISTRY["sa_solver"](
        g, x, sig, tau=lambda s: 1.0 if 0.5 <= s <= 5.0 else 0.0,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert (band - zero).abs().max() > 1e-3
    with pytest.raises(ValueError, match="tau"):
        REGISTRY["sa_solver"](g, x, sig, tau=lambda s: -1.0 if s < 1 else 0.0)


def test_sa_solver_samples_an_exact_gaussian_at_tau_one():
    # The law: N(m, diag(1, 0.04)) from 4000 rows after 40 karras steps (tau = 1, p = c = 3), mean and
    # variance within sampling error (4 standard errors) plus 5% for the discretisation.
    mean = torch.tensor([0.5, -0.3], dtype=torch.float64)
    var = torch.tensor([1.0, 0.04], dtype=torch.float64)
    n = 4000
    x = 40.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out = REGISTRY["sa_solver"](
        gaussian(mean, var), x, karras(40, 0.01, 40.0), generator=torch.Generator().manual_seed(8)
    )
    assert ((out.mean(0) - mean).abs() < 4 * (var / n).sqrt()).all(), out.mean(0)
    assert ((out.var(0) / var - 1).abs() < 4 * math.sqrt(2 / n) + 0.05).all(), out.var(0)


# -- DC-Solver ----------------------------------------------------------------------------------------


def test_dc_solver_without_ratios_is_unipc():
    g = target("ring8")
    x = 20.0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = karras(7, 0.02, 20.0)
    for opts in ({"order": 3, "variant": "bh2"}, {"order": 2, "variant": "bh1"}):
        want = REGISTRY["unipc"](g, x, sig, **opts)
        torch.testing.assert_close(
            REGISTRY["dc_solver"](g, x, sig, **opts), want, rtol=0, atol=1e-12
        )
        ones = REGISTRY["dc_solver"](g, x, sig, ratios=[1.0] * 7, **opts)
        torch.testing.assert_close(ones, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rho", [0.6, 1.3])
def test_dc_compensation_is_the_interpolant_at_the_shifted_level(rho):
    # D(x, sigma) = c(lambda), a quadratic in lambda = -log sigma that ignores x: the last step
    # returns D^_{N-1} = c(lambda_{N-2} + rho (lambda_{N-1} - lambda_{N-2})) exactly (dc_order 2
    # interpolates a quadratic exactly; earlier ratios 1 keep the history exact).
    def c(lam):
        return 0.3 - 0.7 * lam + 0.2 * lam**2

    def den(x, sigma):
        return c(-sigma.log()).reshape(-1, 1).expand_as(x).clone()

    sig = karras(6, 0.05, 10.0)
    lam = [-math.log(v) for v in sig[:-1].tolist()]
    out = REGISTRY["dc_solver"](
        den, torch.zeros(3, 2, dtype=torch.float64), sig, ratios=[1.0] * 5 + [rho]
    )
    want = c(lam[-2] + rho * (lam[-1] - lam[-2]))
    torch.testing.assert_close(
        out, torch.full((3, 2), want, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_fit_dc_lowers_the_error_on_held_out_noise_and_round_trips_through_json():
    from scorekit.pfode import pf_ode_reference

    g = target("ring8")
    sig = karras(5, 0.02, 20.0)
    solver = fit_dc(g, sig, shape=(64, 2), seed=1, reference_rtol=1e-7)
    assert solver.calibration_rms[1] < solver.calibration_rms[0]
    assert solver.ratios[:2] == (1.0, 1.0) and any(r != 1.0 for r in solver.ratios)
    x = 20.0 * torch.randn(128, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = pf_ode_reference(g, x, 20.0, 0.0, rtol=1e-8, atol=1e-8)
    base = REGISTRY["unipc"](g, x, sig, order=3)
    fitted = solver(g, x)
    assert (fitted - ref).square().mean() < 0.5 * (base - ref).square().mean()
    again = DCSolver.from_dict(json.loads(json.dumps(solver.to_dict())))
    torch.testing.assert_close(again(g, x), fitted, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ratios"):
        DCSolver.from_dict({**solver.to_dict(), "ratios": [1.0, 1.0]})


# -- DPM-Solver-v3 ------------------------------------------------------------------------------------


def test_dpm_solver_v3_without_statistics_is_dpmpp_3m():
    # l = 1, s = b = 0 reduces the v3 step to DPM-Solver++ with exact exponential moments; the
    # quadrature (Simpson, 64 intervals per step) agrees with dpmpp_3m's closed-form weights.
    g = target("ring8")
    x = 20.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = karras(8, 0.02, 20.0)
    want = REGISTRY["dpmpp_3m"](g, x, sig)
    for stats in (None, EMS.degenerate((2,))):
        got = REGISTRY["dpm_solver_v3"](g, x, sig, statistics=stats)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_fit_ems_on_a_gaussian_has_the_exact_l_and_beats_dpmpp_3m():
    from scorekit.pfode import pf_ode_reference

    mean = torch.tensor([0.5, -0.3], dtype=torch.float64)
    var = torch.tensor([1.0, 0.05], dtype=torch.float64)
    g = gaussian(mean, var)
    ems = fit_ems(g, (32, 2), sigma_min=0.02, sigma_max=20.0, grid=8, seed=1, reference_rtol=1e-5)
    # For a Gaussian, d(x - D)/dx = sigma^2 / (var + sigma^2) is diagonal: Hutchinson is exact.
    sig2 = torch.exp(-2 * ems.lambdas)[:, None]
    torch.testing.assert_close(ems.l, sig2 / (var + sig2), rtol=0, atol=1e-10)
    again = EMS.from_dict(json.loads(json.dumps(ems.to_dict())))
    assert torch.equal(again.s, ems.s) and torch.equal(again.b, ems.b)
    x = 20.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = pf_ode_reference(g, x, 20.0, 0.0, rtol=1e-8, atol=1e-8)
    sig = karras(6, 0.02, 20.0)
    e3 = (REGISTRY["dpmpp_3m"](g, x, sig) - ref).square().mean().sqrt()
    ev3 = (REGISTRY["dpm_solver_v3"](g, x, sig, statistics=again) - ref).square().mean().sqrt()
    assert ev3 < e3 / 5, (ev3, e3)
    with pytest.raises(ValueError, match="shape"):
        REGISTRY["dpm_solver_v3"](g, torch.ones(2, 3), sig, statistics=ems)


# -- parallel sampling (Picard iterations) ------------------------------------------------------------


def test_parallel_euler_matches_euler_in_fewer_rounds():
    from scorekit.samplers.parallel import parallel_euler

    g = target("ring8")
    x = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = karras(60, 0.002, 80.0)
    want = REGISTRY["euler"](g, x, sig)
    st: dict = {}
    exact = parallel_euler(g, x, sig, tol=0.0, stats=st)  # no tolerance: one state per round
    torch.testing.assert_close(exact, want, rtol=0, atol=1e-12)
    assert st == {"rounds": 60, "evaluations": 60 * 61 // 2, "steps": 60}
    for window in (None, 12):
        st = {}
        out = parallel_euler(g, x, sig, window=window, tol=1e-3, stats=st)
        assert (out - want).abs().max() < 1e-3
        assert st["rounds"] < 60 / 2, st  # measured: 25 rounds for 60 steps
        assert st["evaluations"] > 60  # the price: more denoiser work in total
    with pytest.raises(ValueError, match="tol"):
        parallel_euler(g, x, sig, tol=-1.0)
    with pytest.raises(ValueError, match="window"):
        parallel_euler(g, x, sig, window=0)


# -- sampler="auto" --------------------------------------------------------------------------------


def test_a_sampler_name_and_the_default_use_the_default_grid():
    # sampler="auto" (its tables, the teleport start) is tested in tests/test_auto_defaults.py
    gm = _mixture()
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # a sampler name leaves karras on the default grid (laid to 0.002 on one more step, that last
    # point dropped)
    b = sample(gm, (4, 2), nfe=8, noise=z, dtype=torch.float64, sampler="euler")
    grid = karras(9, 0.002, 80.0)
    torch.testing.assert_close(
        b, REGISTRY["euler"](gm, 80.0 * z, torch.cat([grid[:-2], grid[-1:]]))
    )
    with pytest.raises(ValueError, match="auto"):
        sample(gm, (4, 2), sigmas=karras(5, 0.1, 10.0), sampler="auto")
    # the default is dpmpp_2m on the same grid (bounded on every robust-suite network)
    c = sample(gm, (4, 2), nfe=8, noise=z, dtype=torch.float64)
    torch.testing.assert_close(
        c, REGISTRY["dpmpp_2m"](gm, 80.0 * z, torch.cat([grid[:-2], grid[-1:]]))
    )
