"""scorekit's ODE samplers against diffusers 0.42's schedulers: same exact denoiser, same sigmas, float64.

Each diffusers scheduler is built from config in code on DDPM's linear table (float64
``alphas_cumprod``) and driven by the exact Gaussian-mixture denoiser through
``scorekit.bench.samplers.run_diffusers`` (eps-prediction, frames converted: diffusers' VP-frame
``x_t = x / sqrt(1 + sigma^2)``, its Euler/Heun sample is already in the sigma frame). scorekit gets the
very same sigma sequence (diffusers' ``sigmas`` promoted to float64, Heun's doubled entries merged),
and the outputs must agree to float64 round-off.

Where diffusers' defaults are not the paper's algorithm, diffusers is set to the paper's:
    * DDIM: ``clip_sample=False`` (its default clamps x0 to [-1, 1]) and ``timestep_spacing="trailing"``
      (with other spacings DDIM steps from t to t - 1000//n, not to its next timestep).
    * DPM-Solver++(2M)/(3M) (Lu et al. 2022, Alg. 2): ``algorithm_type="dpmsolver++"``,
      ``solver_type="midpoint"`` (the paper's D = (1 + 1/2r) D_i - 1/2r D_{i-1}; "heun" is another
      variant), ``final_sigmas_type="zero"``; diffusers then forces ``lower_order_final`` on the
      final step (to sigma = 0 the multistep formula is undefined: h = inf), as scorekit does.
    * DPM-Solver++(3M) does NOT agree, by design: diffusers (like the reference DPM-Solver code)
      weights the second divided difference D2 = h^2 D[0,1,2] by phi_2/h - 1/2 ~ h/6, half the exact
      integral of the quadratic interpolant (~ h/3), so its third-order term is halved and its observed
      order falls to 2; scorekit integrates the quadratic exactly. Tested: scorekit's 3M converges at
      order 3 on a smooth problem, diffusers' at under 2.6, and the two agree on the 2M part.
    * UniPC (Zhao et al. 2023): ``predict_x0=True``, bh1 or bh2, orders 1 and 2 exactly. At order 3
      the two choose different coefficients and diffusers lowers the order of the second-to-last step
      (``lower_order_final``), so order 3 is compared by convergence order (both about 4) instead.
    * DEIS: diffusers stops at sigma_min (no zero final sigma), so scorekit's state at sigma_min (its
      callback) is compared; ``lower_order_final=False`` keeps the paper's order to the end. scorekit's
      default ``basis="logrho"`` is diffusers' algorithm (orders 1-3 agree exactly); its ``"rho"``
      basis (Lagrange in sigma) is checked by convergence order.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from scorekit import schedules as S
from scorekit.analytic import target
from scorekit.bench.samplers import (
    diffusers_scheduler,
    diffusers_sigmas,
    rms_error,
    run_diffusers,
)
from scorekit.samplers import REGISTRY, nfe

pytestmark = pytest.mark.peer

DPMPP = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "final_sigmas_type": "zero"}
KARRAS = {"use_karras_sigmas": True}

CASES = [
    # id, diffusers scheduler, its config, scorekit sampler, options, steps
    ("ddim", "DDIMScheduler", {"timestep_spacing": "trailing"}, "euler", {}, 10),
    ("euler", "EulerDiscreteScheduler", {}, "euler", {}, 10),
    ("euler-karras", "EulerDiscreteScheduler", KARRAS, "euler", {}, 7),
    # diffusers' Heun is EDM Alg. 1 on every step: compare with long_step=None (see common.LONG_STEP)
    ("heun", "HeunDiscreteScheduler", {}, "heun", {"long_step": None}, 6),
    ("heun-karras", "HeunDiscreteScheduler", KARRAS, "heun", {"long_step": None}, 5),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {**DPMPP, "solver_order": 2}, "dpmpp_2m", {}, 10),
    (
        "dpmpp_2m-karras",
        "DPMSolverMultistepScheduler",
        {**DPMPP, **KARRAS, "solver_order": 2},
        "dpmpp_2m",
        {},
        8,
    ),
    (
        "unipc-bh2",
        "UniPCMultistepScheduler",
        {"solver_order": 2, "solver_type": "bh2", "predict_x0": True},
        "unipc",
        {"order": 2, "variant": "bh2"},
        10,
    ),
    (
        "unipc-bh2-karras",
        "UniPCMultistepScheduler",
        {**KARRAS, "solver_order": 2, "solver_type": "bh2", "predict_x0": True},
        "unipc",
        {"order": 2, "variant": "bh2"},
        12,
    ),
    (
        "unipc-order1",
        "UniPCMultistepScheduler",
        {"solver_order": 1, "solver_type": "bh2", "predict_x0": True},
        "unipc",
        {"order": 1, "variant": "bh2"},
        8,
    ),
]


@pytest.fixture(scope="module")
def problem():
    gm = target("ring8")
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return gm, z


def _calls(denoiser):
    box = {"n": 0}

    def counted(x, sigma):
        box["n"] += 1
        return denoiser(x, sigma)

    return counted, box


@pytest.mark.parametrize(
    ("sched_name", "config", "sampler", "options", "steps"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_same_output_as_diffusers(problem, sched_name, config, sampler, options, steps):
    gm, z = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = diffusers_scheduler(sched_name, **config)
        sigmas = diffusers_sigmas(sched, steps)
        assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
        x = sigmas[0] * z
        theirs, their_nfe = run_diffusers(sched, _calls(gm)[0], x.clone(), steps)
    counted, box = _calls(gm)
    ours = REGISTRY[sampler](counted, x.clone(), sigmas, **options)
    assert box["n"] == their_nfe == nfe(sampler, sigmas, **options)
    # Same algorithm, same sigmas, float64: agreement to round-off (outputs are O(1)).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    # And not trivially: the output is a clean sample near the target, not the input.
    assert (ours - x).abs().max() > 1.0


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(problem, order):
    """diffusers' DEIS stops at sigma_min: compare scorekit's state there (its callback)."""
    gm, z = problem
    steps = 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # lower_order_final=False: the paper's method keeps its order to the end.
        sched = diffusers_scheduler(
            "DEISMultistepScheduler", solver_order=order, lower_order_final=False
        )
        sig_d = diffusers_sigmas(sched, steps)  # ends at sigma_min (diffusers' DEIS has no zero)
        x = sig_d[0] * z
        theirs, _ = run_diffusers(sched, gm, x.clone(), steps)
    assert sig_d[-1] > 0
    states = {}
    sig = torch.cat([sig_d, sig_d.new_zeros(1)])
    REGISTRY["deis"](gm, x.clone(), sig, order=order, basis="logrho", callback=_recorder(states))
    torch.testing.assert_close(states[steps], theirs, rtol=0, atol=1e-10)


def test_unipc_bh1_matches_diffusers_up_to_its_final_step(problem):
    """diffusers' bh1 returns NaN on the step to sigma = 0 (B(h) = h = inf times a zero update), so
    compare the corrected state at the last positive sigma, which both compute before that step."""
    gm, z = problem
    steps = 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = {"solver_order": 2, "solver_type": "bh1", "predict_x0": True}
        sched = diffusers_scheduler("UniPCMultistepScheduler", **cfg)
        sig = diffusers_sigmas(sched, steps)
        x = sig[0] * z
        theirs, _ = run_diffusers(sched, gm, x.clone(), steps)
    assert torch.isnan(theirs).all()  # the diffusers 0.42 behaviour this test works around
    s_last = sig[-2]
    their_state = sched.last_sample.as_subclass(torch.Tensor) * (1 + s_last**2).sqrt()
    states = {}
    ours = REGISTRY["unipc"](
        gm,
        x.clone(),
        sig,
        order=2,
        variant="bh1",
        callback=lambda s: states.update({s["i"]: s["x"]}),
    )
    torch.testing.assert_close(states[steps - 1], their_state, rtol=0, atol=1e-10)
    assert torch.isfinite(ours).all()


def _smooth_problem():
    from scorekit.analytic import GaussianMixture

    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    gm = GaussianMixture(means, torch.tensor([[0.5, 0.3], [0.4, 0.6]], dtype=torch.float64))
    z = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return gm, z


def _recorder(states: dict):  # callback storing x at each step
    return lambda s: states.update({s["i"]: s["x"]})


def _orders(sched_name, config, sampler, options, steps_list=(20, 40, 80)):
    """Observed orders (log2 error ratios on doubling) of scorekit and diffusers on log-linear sigmas
    from 30 to 0.3 (diffusers driven on the same custom sigmas, ending at 0.3), errors vs a tight ODE
    solve. Returns (ours, theirs), each a list of slopes, and the last errors."""
    gm, z = _smooth_problem()
    errs = {"ours": [], "theirs": []}
    for steps in steps_list:
        sig = S.loglinear(steps + 1, 0.3, 30.0)[:-1]  # [steps + 1], ends at 0.3 (no zero)
        x = sig[0] * z
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = diffusers_scheduler(
                sched_name, lower_order_final=False, final_sigmas_type="sigma_min", **config
            )
            theirs, _ = run_diffusers(sched, gm, x.clone(), steps, sigmas=sig)
        ref = S.pf_ode_reference(gm, x, 30.0, 0.3, rtol=1e-12, atol=1e-12)
        states = {}
        REGISTRY[sampler](
            gm, x.clone(), torch.cat([sig, sig.new_zeros(1)]), callback=_recorder(states), **options
        )
        errs["ours"].append(rms_error(states[steps], ref))
        errs["theirs"].append(rms_error(theirs, ref))
    slopes = {k: [math.log2(a / b) for a, b in itertools.pairwise(v)] for k, v in errs.items()}
    return slopes["ours"], slopes["theirs"], errs


@pytest.mark.slow
def test_dpmpp_3m_is_third_order_where_diffusers_is_not():
    ours, theirs, errs = _orders(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 3},
        "dpmpp_3m",
        {},
    )
    assert min(ours) > 2.8, ours
    assert theirs[-1] < 2.6, theirs  # diffusers' halved D2 term: order tends to 2
    assert errs["ours"][-1] < 0.5 * errs["theirs"][-1], errs


@pytest.mark.slow
def test_dpmpp_2m_custom_sigmas_order_and_agreement():
    ours, _, errs = _orders(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "solver_order": 2},
        "dpmpp_2m",
        {},
    )
    assert min(ours) > 1.8, ours
    for a, b in zip(errs["ours"], errs["theirs"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-8), errs


@pytest.mark.slow
def test_unipc_order3_converges_like_diffusers():
    ours, theirs, errs = _orders(
        "UniPCMultistepScheduler",
        {"solver_order": 3, "solver_type": "bh2", "predict_x0": True},
        "unipc",
        {"order": 3, "variant": "bh2"},
    )
    assert min(ours) > 3.6 and min(theirs) > 3.6, (ours, theirs)
    assert 0.5 < errs["ours"][-1] / errs["theirs"][-1] < 2.0, errs


@pytest.mark.slow
def test_deis_rho_basis_is_order_3_too():
    """scorekit's alternative rho basis (Lagrange in sigma) differs from diffusers' log-rho per step
    but converges at the same order."""
    ours, theirs, _ = _orders(
        "DEISMultistepScheduler", {"solver_order": 3}, "deis", {"order": 3, "basis": "rho"}
    )
    assert min(ours) > 2.65 and min(theirs) > 2.65, (ours, theirs)
