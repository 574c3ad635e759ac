"""Long steps: every sampler stays bounded at 5 calls on an imperfect denoiser where Euler does.

A 5-call karras schedule from 80 to 0.002 ends with a step whose sigma falls 85x (1250x for the
two- and three-call-per-step samplers). There the published correctors (EDM's Heun, DPM-Solver-2/3,
their use in ``edm_stochastic`` and ``restart``), the third-order multistep extrapolations and the
Euler-Maruyama drift amplify the denoiser's error by about the step's ratio; ``long_step``
(``scorekit.samplers.common.LONG_STEP``) takes such steps in a stable form. The problems are the
robustness suite's: exact mixtures plus a smooth error of a trained network's size and shape
(``scorekit.bench.samplers.robust.Perturbed``), for eps-, v- and EDM-parameterised networks. The
yardstick is Euler at 5 calls on the same problem (sliced W2 to exact samples of the target); before
``long_step`` the samplers below gave unbounded samples or 8-35x Euler's distance there.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from scorekit.analytic import gaussian, target
from scorekit.bench.samplers.robust import PARAMS, Perturbed, bounded
from scorekit.metrics import sliced_wasserstein
from scorekit.samplers import REGISTRY, sample
from scorekit.samplers.common import LONG_STEP
from scorekit.schedules import karras

ROWS = 300

#: sampler -> the NFE the suite first runs it at (restart's restarts alone take 16 calls)
GUARDED = {
    "heun": 5,
    "dpm_solver_2": 5,
    "dpm_solver_3": 5,
    "edm_stochastic": 5,
    "euler_maruyama": 5,
    "pc_langevin": 5,
    "sa_solver": 5,
    "dpmpp_3m": 5,
    "dpmpp_3m_sde": 5,
    "dc_solver": 5,
    "dpm_solver_v3": 5,
    "restart": 20,
}


def _steps_for(name: str, nfe: int) -> int:
    """The largest step count whose call count is at most ``nfe`` (as the suite chooses it)."""
    from scorekit.samplers.registry import nfe as count

    best = None
    for n in range(1, nfe + 1):
        if count(name, karras(n, 0.002, 80.0)) <= nfe:
            best = n
    assert best is not None
    return best


@pytest.fixture(scope="module", params=[("ring8", "eps"), ("gmm64", "eps"), ("gmm64", "v"), ("ring8", "edm")],
                ids=lambda p: "/".join(p))  # fmt: skip
def problem(request):
    tname, pname = request.param
    gm = target(tname)
    den = Perturbed(gm.denoise, PARAMS[pname](), gm.dim, 0.4, seed=0)
    z = torch.randn(ROWS, gm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = gm.sample(ROWS, torch.Generator().manual_seed(1))
    euler = sample(den, z.shape, sampler="euler", sigmas=karras(5, 0.002, 80.0), noise=z,
                   dtype=torch.float64)  # fmt: skip
    return den, z, data, sliced_wasserstein(euler, data)


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_bounded_where_euler_is(problem, name):
    den, z, data, euler_sw = problem
    sigmas = karras(_steps_for(name, GUARDED[name]), 0.002, 80.0)
    x = sample(den, z.shape, sampler=name, sigmas=sigmas, noise=z, dtype=torch.float64, seed=0)
    assert bounded(x, data), f"{name}: unbounded samples"
    sw = sliced_wasserstein(x, data)
    assert sw <= 4 * euler_sw, (
        f"{name}: sliced W2 {sw:.3f} against Euler's {euler_sw:.3f} at 5 calls"
    )


def _gaussian_flow(mean: float, var: float, x: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """The exact probability-flow ODE solution from ``s0`` to ``s1`` for ``N(mean, var I)`` data."""
    return mean + math.sqrt((var + s1**2) / (var + s0**2)) * (x - mean)


@pytest.mark.parametrize(("name", "order"), [("heun", 2), ("dpm_solver_2", 2)])
def test_long_step_form_converges_at_second_order(name, order):
    """With every step long (``long_step`` just above 1), the stable form is still a second-order
    method: on Gaussian data the error against the closed-form flow falls ~4x per halving."""
    mean, var = 0.7, 0.3
    gm = gaussian(
        torch.full((2,), mean, dtype=torch.float64), var * torch.eye(2, dtype=torch.float64)
    )
    x0 = 5.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errs = []
    for n in (8, 16, 32):
        sig = torch.cat([torch.logspace(math.log10(5.0), math.log10(0.05), n, dtype=torch.float64),
                         torch.zeros(1, dtype=torch.float64)])  # fmt: skip
        # stop before the final x = D step: compare at sigma = 0.05
        out = REGISTRY[name](
            gm.denoise, x0.clone(), [*sig[:-1].tolist(), 0.0], long_step=1.0 + 1e-9
        )
        ref = gm.denoise(_gaussian_flow(mean, var, x0, 5.0, 0.05), torch.tensor(0.05))
        errs.append(float((out - ref).abs().max()))
    rates = [math.log2(a / b) for a, b in itertools.pairwise(errs)]
    assert all(r > order - 0.3 for r in rates), f"{name}: errors {errs}, observed orders {rates}"


def test_default_leaves_edm_schedule_untouched():
    """EDM's 18-step karras schedule has no step wider than 3.7x: the default is Alg. 1 exactly."""
    sig = karras(18, 0.002, 80.0)
    ratios = (sig[:-2] / sig[1:-1]).tolist()
    assert max(ratios) < LONG_STEP
    gm = target("ring8")
    x = 80.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = REGISTRY["heun"](gm.denoise, x.clone(), sig)
    b = REGISTRY["heun"](gm.denoise, x.clone(), sig, long_step=None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [1.0, 0.5, -3, "ten"])
def test_bad_long_step_is_a_one_line_error(bad):
    gm = target("ring8")
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match="long_step"):
        REGISTRY["heun"](gm.denoise, x, karras(4, 0.002, 80.0), long_step=bad)


@pytest.mark.parametrize(
    ("predictor", "exact"), [("ancestral", True), ("reverse_diffusion", False)]
)
def test_pc_predictor_keeps_the_marginal_of_data_at_a_point(predictor, exact):
    """Data at the origin (``D = 0``): the noised marginal at sigma is exactly ``N(0, sigma^2)``. The
    ancestral predictor keeps it on any step (``r^4 sigma_i^2 + sigma_{i+1}^2 (1 - r^2) =
    sigma_{i+1}^2``); reverse diffusion leaves ``r^4 sigma_i^2 + sigma_i^2 - sigma_{i+1}^2``."""
    seen = []
    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    x = 8.0 * torch.randn(40000, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    REGISTRY["pc_langevin"](
        lambda x, s: torch.zeros_like(x), x, sig, predictor=predictor, n_corrector=0,
        long_step=None, generator=torch.Generator().manual_seed(6),
        callback=lambda info: seen.append((info["sigma"], float(info["x"].var()))),
    )  # fmt: skip
    for sigma, var in seen[1:]:
        rel = var / sigma**2 - 1
        if exact:
            assert abs(rel) < 0.03, (sigma, var)
        else:
            assert rel > 0.3, (sigma, var)  # (1/16 + 1 - 1/4) / (1/4) - 1 = 2.25 at r = 1/2
