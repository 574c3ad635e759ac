"""Stochastic samplers against exact targets: distances to exact samples, exact Gaussian moments, and
exact identities between samplers.

Ground truth: ``scorekit.analytic`` targets give exact denoisers and exact samples. The sliced W2
between two independent exact sample sets of the same size is the floor that a perfect sampler
reaches (``metrics.sliced_wasserstein`` explains its small-sample bias).
"""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.analytic import gaussian, target
from scorekit.metrics import sliced_wasserstein
from scorekit.samplers import REGISTRY, STOCHASTIC, sample
from scorekit.schedules import karras

N = 1500
SIGMA_MIN, SIGMA_MAX = 0.01, 40.0

#: name -> (options, three levels: step counts, or tolerance dicts for adaptive_sde)
LEVELS = {
    "euler_ancestral": ({}, [3, 12, 64]),
    "euler_maruyama": ({}, [3, 12, 48]),
    "dpmpp_2m_sde": ({}, [3, 12, 48]),
    "dpmpp_3m_sde": ({"eta": 0.7}, [3, 12, 48]),
    "edm_stochastic": ({"s_churn": 20.0}, [3, 12, 48]),
    "restart": ({"t_min": 0.1, "t_max": 1.0, "restarts": 1, "restart_steps": 4}, [3, 12, 48]),
    "pc_langevin": ({"n_corrector": 1}, [3, 12, 48]),
    "sa_solver": ({}, [3, 24, 48]),  # exact-moment third-order steps amplify noise at ~6-12 steps
    "adaptive_sde": (
        {},
        [{"rtol": 0.5, "atol": 0.05}, {"rtol": 0.1, "atol": 0.01}, {"rtol": 0.05, "atol": 0.005}],
    ),
}


def test_every_stochastic_sampler_is_checked():
    # Derived from the registry: adding a stochastic sampler without a LEVELS entry fails here.
    assert set(LEVELS) == STOCHASTIC


def _run(g, name, level, shape, dtype=torch.float32, seed=3, steps=None):
    """Samples from ``name`` at one of its levels; one generator for the batch (fast: the per-row
    generators of ``sample()`` are tested in the contract suite, here only the law matters)."""
    opts, levels = LEVELS[name]
    lv = levels[level] if steps is None or name == "adaptive_sde" else steps
    if isinstance(lv, dict):
        opts, sig = {**opts, **lv}, torch.tensor([SIGMA_MAX, SIGMA_MIN, 0.0], dtype=torch.float64)
    else:
        sig = karras(lv, SIGMA_MIN, SIGMA_MAX)
    gen = torch.Generator().manual_seed(seed)
    x = SIGMA_MAX * torch.randn(shape, generator=gen, dtype=dtype)
    return REGISTRY[name](g, x, sig, generator=gen, **opts)


@pytest.fixture(scope="module")
def checker():
    g = target("checker")
    exact = g.sample(N, torch.Generator().manual_seed(1)).float()
    floors = [
        sliced_wasserstein(g.sample(N, torch.Generator().manual_seed(s)).float(), exact)
        for s in range(2, 6)
    ]
    return g, exact, sum(floors) / len(floors)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LEVELS))
def test_sliced_w2_falls_to_the_exact_floor(checker, name):
    g, exact, floor = checker
    sw = [sliced_wasserstein(_run(g, name, k, (N, 2)), exact) for k in range(3)]
    assert sw[1] < sw[0] and sw[2] < sw[0], f"{name}: SW2 {sw} does not fall with NFE"
    # The exact-vs-exact floor at this N is ~0.07; a perfect sampler is there, a biased one is not
    # (e.g. a 10% scale error of the checker target gives ~0.1 more).
    assert sw[2] < 1.5 * floor, f"{name}: SW2 {sw[2]:.4f} at the highest NFE vs floor {floor:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LEVELS))
def test_exact_gaussian_moments_at_high_nfe(name):
    # An anisotropic Gaussian N(m, diag(1, 0.01)): mean and variance of 3000 samples after 256 steps
    # must match to within sampling error (4 standard errors) plus 5% of the variance for the
    # discretisation (first-order samplers lose ~15% of the variance at 64 karras steps: ancestral
    # sampling plugs in E[x0 | x] and ignores Var[x0 | x]).
    mean = torch.tensor([0.5, -0.3], dtype=torch.float64)
    var = torch.tensor([1.0, 0.01], dtype=torch.float64)
    g = gaussian(mean, var)
    n = 3000
    x = _run(g, name, 2, (n, 2), dtype=torch.float64, seed=7, steps=256)
    se_mean = (var / n).sqrt()
    assert ((x.mean(0) - mean).abs() < 4 * se_mean).all(), (x.mean(0), mean)
    rel = x.var(0) / var - 1
    assert (rel.abs() < 4 * math.sqrt(2 / n) + 0.05).all(), f"{name}: variance {x.var(0)} vs {var}"


# -- exact identities ---------------------------------------------------------------------------


def _x_and_sigmas(seed=0, batch=32):
    gen = torch.Generator().manual_seed(seed)
    return SIGMA_MAX * torch.randn(batch, 2, generator=gen, dtype=torch.float64), karras(
        9, SIGMA_MIN, SIGMA_MAX
    )


def _gens(batch, seed=5):
    return [torch.Generator().manual_seed(seed + i) for i in range(batch)]


def test_noise_free_settings_reduce_to_the_ode_samplers():
    g = target("checker")
    x, sig = _x_and_sigmas()
    heun = REGISTRY["heun"](g, x, sig)
    edm = REGISTRY["edm_stochastic"](g, x, sig, s_churn=0.0, generator=_gens(32))
    torch.testing.assert_close(edm, heun, rtol=0, atol=1e-12)
    rs = REGISTRY["restart"](g, x, sig, restarts=0, generator=_gens(32))
    torch.testing.assert_close(rs, heun, rtol=0, atol=1e-12)
    euler = REGISTRY["euler"](g, x, sig)
    anc = REGISTRY["euler_ancestral"](g, x, sig, eta=0.0, generator=_gens(32))
    torch.testing.assert_close(anc, euler, rtol=0, atol=1e-12)
    two_m = REGISTRY["dpmpp_2m"](g, x, sig)
    sde0 = REGISTRY["dpmpp_2m_sde"](g, x, sig, eta=0.0, generator=_gens(32))
    torch.testing.assert_close(sde0, two_m, rtol=0, atol=1e-12)


def test_first_sde_step_is_the_ddpm_posterior_step():
    # With one step before the final one, SDE-DPM-Solver++ (eta = 1) and ancestral sampling draw from
    # the same exact posterior q(x_1 | x_0, x0 = D): identical with identical noise.
    g = target("checker")
    x, _ = _x_and_sigmas(1)
    sig = torch.tensor([5.0, 0.7, 0.0], dtype=torch.float64)
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        a = REGISTRY[name](g, x, sig, eta=1.0, generator=_gens(32))
        b = REGISTRY["euler_ancestral"](g, x, sig, eta=1.0, generator=_gens(32))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_ancestral_step_matches_the_exact_posterior_moments():
    # One eta=1 step from sigma0 to sigma1 with an exact x0 (a delta target): x1 = x0 + s1^2/s0^2
    # (x - x0) + noise of variance s1^2 (1 - s1^2/s0^2); check against that closed form in 2000 rows.
    x0 = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    s0, s1 = 2.0, 0.5

    def delta(x, sigma):
        return x0.expand_as(x)

    n = 2000
    x = x0 + s0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seen = {}

    def grab(info):
        if info["i"] == 1:
            seen["x"] = info["x"]

    sig = torch.tensor([s0, s1, 0.0], dtype=torch.float64)
    REGISTRY["euler_ancestral"](delta, x, sig, generator=_gens(n), callback=grab)
    resid = seen["x"] - (x0 + (s1 / s0) ** 2 * (x - x0))
    want_var = s1**2 * (1 - (s1 / s0) ** 2)
    assert resid.mean(0).abs().max() < 4 * math.sqrt(want_var / n)
    assert (resid.var(0) / want_var - 1).abs().max() < 4 * math.sqrt(2 / n)


def test_adaptive_sde_spends_more_calls_for_tighter_tolerances():
    g = target("checker")
    counts = []
    for rtol, atol in ((0.5, 0.05), (0.05, 0.005)):
        stats = {}
        sample(g, (64, 2), sampler="adaptive_sde", rtol=rtol, atol=atol, stats=stats, seed=1)
        counts.append(stats["nfe"])
        assert stats["nfe"] == 2 * stats["iterations"] + 1
    assert counts[1] > counts[0]
    with pytest.raises(ValueError, match="nfe must be None"):
        sample(g, (4, 2), sampler="adaptive_sde", nfe=50)
