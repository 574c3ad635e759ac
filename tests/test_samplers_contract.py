"""The contract every sampler in ``scorekit.samplers.REGISTRY`` keeps (DESIGN.md, "Sampler").

Shape and dtype kept (float32 and float64, 2-D and 4-D data), exactly ``nfe(...)`` denoiser calls
(counted by the test's own denoiser), determinism for a fixed generator, sample ``i`` independent of
the batch, and clear errors for bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.analytic import gaussian, target
from scorekit.samplers import ADAPTIVE, REGISTRY, STOCHASTIC, nfe, sample
from scorekit.schedules import karras

#: Every sampler and the options the contract runs it with (small, so the suite stays fast).
CONTRACT: dict[str, dict] = {
    "euler": {},
    "heun": {},
    "dpm_solver_2": {},
    "dpm_solver_3": {},
    "dpmpp_2s": {},
    "dpmpp_2m": {},
    "dpmpp_3m": {},
    "unipc": {"order": 3, "variant": "bh1"},
    "dc_solver": {"order": 2, "variant": "bh1"},
    "dpm_solver_v3": {"order": 3},
    "deis": {"order": 3},
    "ipndm": {"order": 4},
    "bespoke": {"base": "dpmpp_2m"},
    "euler_ancestral": {"eta": 1.0},
    "euler_maruyama": {},
    "dpmpp_2m_sde": {"eta": 1.0},
    "dpmpp_3m_sde": {"eta": 0.7},
    "edm_stochastic": {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0},
    "restart": {"t_min": 0.3, "t_max": 2.0, "restarts": 2, "restart_steps": 2},
    "pc_langevin": {"snr": 0.1, "n_corrector": 2},
    "sa_solver": {"tau": 0.8, "predictor_order": 3, "corrector_order": 3},
    "adaptive_ode": {"rtol": 1e-6, "atol": 1e-6},
    "adaptive_sde": {"rtol": 0.05, "atol": 0.01},
}

NAMES = sorted(CONTRACT)


def test_registry_and_contract_cover_the_same_names():
    assert set(REGISTRY) == set(CONTRACT)


class Counting:
    """Wraps an exact denoiser and counts its calls; checks the sigma contract on every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x, sigma):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype and sigma.device == x.device
        self.calls += 1
        return self.inner(x, sigma)


def _run(name, den, x, sigmas, generator=None, **extra):
    opts = {**CONTRACT[name], **extra}
    return REGISTRY[name](den, x, sigmas, generator=generator, **opts)


def _gens(seed, n):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_kept_and_exact_nfe(name, dtype):
    # 4-D data [B, 1, 2, 3] against a 6-D Gaussian: rank-agnostic broadcasting, exact call counts.
    g = gaussian(torch.zeros(6, dtype=torch.float64), torch.linspace(0.2, 1.5, 6).double())
    for n_steps in (1, 2, 5) if name != "restart" else (2, 5):
        den = Counting(g)
        sig = karras(n_steps, 0.05, 10.0, dtype=torch.float64)
        x = 10.0 * torch.randn(4, 1, 2, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
        stats = {}
        extra = {"stats": stats} if name in ADAPTIVE else {}
        out = _run(name, den, x, sig, generator=_gens(0, 4), **extra)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        if name in ADAPTIVE:
            assert stats["nfe"] == den.calls
        else:
            assert den.calls == nfe(name, sig, **CONTRACT[name]), (n_steps, den.calls)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_fixed_generator(name):
    g = target("ring8")
    sig = karras(6, 0.02, 20.0)
    x = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = _run(name, g, x.clone(), sig, generator=_gens(7, 5))
    b = _run(name, g, x.clone(), sig, generator=_gens(7, 5))
    assert torch.equal(a, b)
    c = _run(name, g, x.clone(), sig, generator=torch.Generator().manual_seed(5))
    d = _run(name, g, x.clone(), sig, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c, d)


@pytest.mark.parametrize("name", NAMES)
def test_sample_i_does_not_depend_on_the_batch(name):
    g = target("ring8")
    sig = karras(6, 0.02, 20.0)
    x = 20.0 * torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # adaptive_ode shares step sizes across the batch: rows agree to within its tolerance only.
    tol = 1e-4 if name == "adaptive_ode" else 1e-9
    full = _run(name, g, x, sig, generator=_gens(2, 5))
    for i in (0, 3):
        one = _run(name, g, x[i : i + 1], sig, generator=_gens(2, 5)[i : i + 1])
        torch.testing.assert_close(one[0], full[i], rtol=tol, atol=tol)
    # The same through sample(): row i of a batch of 5 equals sample number i drawn alone.
    kw = {"sampler": name, "sigmas": sig, "seed": 11, "dtype": torch.float64, **CONTRACT[name]}
    batch = sample(g, (5, 2), **kw)
    for i in (1, 4):
        alone = sample(g, (1, 2), index_offset=i, **kw)
        torch.testing.assert_close(alone[0], batch[i], rtol=tol, atol=tol)
    other_seed = sample(g, (5, 2), **{**kw, "seed": 12})
    assert not torch.allclose(other_seed, batch)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ADAPTIVE])
def test_sample_matches_the_requested_nfe_exactly(name):
    g = Counting(target("ring8"))
    opts = CONTRACT[name]
    # The achievable NFEs are nfe(name, sigmas) over step counts; each must be hit exactly.
    achievable = sorted({nfe(name, karras(n, 0.1, 10.0), **opts) for n in range(2, 7)})
    for want in achievable:
        g.calls = 0
        out = sample(g, (3, 2), nfe=want, sampler=name, sigma_min=0.1, sigma_max=10.0, **opts)
        assert g.calls == want and out.shape == (3, 2) and out.dtype == torch.float32
    gaps = sorted(set(range(achievable[0], achievable[-1])) - set(achievable))
    if gaps:
        with pytest.raises(ValueError, match="nearest achievable"):
            sample(g, (3, 2), nfe=gaps[0], sampler=name, **opts)
    with pytest.raises(ValueError, match="too small"):
        sample(g, (3, 2), nfe=achievable[0] - 1, sampler=name, **opts)


# -- bad input --------------------------------------------------------------------------------------


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError, match="euler"):
        sample(target("ring8"), (2, 2), nfe=10, sampler="eulr")
    with pytest.raises(ValueError, match="dpmpp_2m"):
        nfe("nope", karras(3, 0.1, 1.0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("sigmas", "match"),
    [
        (torch.tensor([[1.0, 0.0]]), "1-D"),
        (torch.tensor([2.0, 3.0, 1.0, 0.0]), "strictly decreasing"),
        (torch.tensor([2.0, 1.0, 1.0, 0.0]), "strictly decreasing"),
        (torch.tensor([2.0, 1.0, 0.5]), "end in 0"),
        (torch.tensor([2.0, 1.0, -0.5, 0.0]), ">= 0"),
        (torch.tensor([math.nan, 1.0, 0.0]), "finite"),
        (torch.tensor([0.0]), "at least 2"),
    ],
)
def test_bad_sigmas_are_rejected_before_any_call(name, sigmas, match):
    den = Counting(target("ring8"))
    with pytest.raises(ValueError, match=match):
        _run(name, den, torch.zeros(2, 2), sigmas)
    assert den.calls == 0


@pytest.mark.parametrize("name", NAMES)
def test_bad_denoisers_fail_at_the_first_call(name):
    x = torch.randn(3, 2, dtype=torch.float64) * 10
    sig = karras(4, 0.1, 10.0)
    with pytest.raises(ValueError, match="shape"):
        _run(name, lambda x, s: x[:, :1], x, sig)
    calls = []

    def nan_denoiser(x, s):
        calls.append(1)
        return torch.full_like(x, math.nan)

    with pytest.raises(FloatingPointError, match="not finite"):
        _run(name, nan_denoiser, x, sig)
    assert len(calls) == 1

    def late_nan(x, s):  # finite at first, NaN later: caught on the final sample, never returned
        calls.append(1)
        return torch.full_like(x, math.nan) if len(calls) > 3 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match="not finite"):
        _run(name, late_nan, x, sig)


@pytest.mark.parametrize("name", NAMES)
def test_misspelt_options_are_type_errors(name):
    g = target("ring8")
    with pytest.raises(TypeError):
        REGISTRY[name](g, torch.zeros(2, 2), karras(3, 0.1, 1.0), not_an_option=1)
    with pytest.raises(TypeError, match="not_an_option"):
        sample(g, (2, 2), nfe=20, sampler=name, not_an_option=1)
    if name not in ADAPTIVE:
        with pytest.raises(TypeError, match="not_an_option"):
            nfe(name, karras(3, 0.1, 1.0), not_an_option=1)


def test_adaptive_nfe_is_not_known_in_advance():
    for name in ADAPTIVE:
        with pytest.raises(ValueError, match="not known in advance"):
            nfe(name, karras(3, 0.1, 1.0))


def test_per_row_generators_must_match_the_batch():
    from scorekit.samplers.common import randn_like

    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="generator"):
        randn_like(x, _gens(0, 2))
    rows = randn_like(x, _gens(0, 3))
    for i in range(3):  # row i is exactly what generator i alone draws
        assert torch.equal(rows[i], torch.randn(2, generator=_gens(0, 3)[i]))
    for name in [n for n in NAMES if n in STOCHASTIC]:
        with pytest.raises(ValueError, match="generator"):
            _run(
                name, target("ring8"), torch.ones(3, 2), karras(3, 0.1, 10.0), generator=_gens(0, 2)
            )


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ADAPTIVE])
def test_host_reads_do_not_grow_with_the_number_of_steps(name, monkeypatch):
    # Every read of a tensor value on the host (a device synchronisation on GPU) goes through one of
    # these methods. Fixed-step samplers read sigmas once, check the first denoiser output and the
    # final sample; the count must not depend on how many steps the loop takes.
    reads = []
    for method in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, method)

        def counted(self, *a, _orig=original, _m=method, **k):
            reads.append(_m)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, counted)

    def sync_free(x, sigma):  # exact denoiser of N(0.3, 0.5 I), without any host read
        s2 = sigma.square().reshape(-1, *([1] * (x.ndim - 1)))
        return 0.3 + 0.5 / (0.5 + s2) * (x - 0.3)

    counts = []
    for n_steps in (4, 12):
        sig = karras(n_steps, 0.05, 10.0)
        x = 10.0 * torch.randn(
            3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        )
        reads.clear()
        _run(name, sync_free, x, sig, generator=_gens(0, 3))
        counts.append(len(reads))
    assert counts[0] == counts[1], f"{name}: host reads {counts} grow with the steps"


def test_sample_options_schedule_callable_progress_and_mismatched_nfe():
    g = Counting(target("ring8"))
    seen = []

    def schedule(n, sigma_min, sigma_max):
        seen.append((n, sigma_min, sigma_max))
        return karras(n, sigma_min, sigma_max, rho=3.0)

    a = sample(g, (3, 2), nfe=8, sampler="euler", schedule=schedule, sigma_min=0.1, sigma_max=5.0)
    assert seen == [(8, 0.1, 5.0)] and g.calls == 8
    b = sample(
        g, (3, 2), nfe=8, sampler="euler", sigmas=karras(8, 0.1, 5.0, rho=3.0), progress=True
    )
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="does not match"):
        sample(g, (3, 2), nfe=9, sampler="euler", sigmas=karras(8, 0.1, 5.0))
    with pytest.raises(ValueError, match="shape"):
        sample(g, (3,), nfe=8, sampler="euler")
    with pytest.raises(ValueError, match="index_offset"):
        sample(g, (3, 2), nfe=8, sampler="euler", index_offset=-1)
    with pytest.raises(ValueError, match="unknown schedule"):
        sample(g, (3, 2), nfe=8, sampler="euler", schedule="nope")


def test_sample_with_explicit_sigmas_and_an_adaptive_sampler_refuses_nfe():
    g = Counting(target("ring8"))
    sig = karras(4, 0.1, 5.0)
    with pytest.raises(ValueError, match="adaptive"):
        sample(g, (3, 2), nfe=4, sampler="adaptive_ode", sigmas=sig)
    stats: dict = {}
    out = sample(g, (3, 2), sampler="adaptive_ode", sigmas=sig, rtol=1e-4, atol=1e-4, stats=stats)
    assert out.shape == (3, 2) and stats["nfe"] == g.calls > 4


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "auto"])
@pytest.mark.parametrize("arg", ["generator", "callback"])
def test_sample_refuses_a_generator_or_callback_before_any_call(sampler, arg):
    g = Counting(target("ring8"))
    with pytest.raises(TypeError, match=f"sample\\(\\) takes no {arg}=.*seed="):
        sample(g, (3, 2), nfe=4, sampler=sampler, **{arg: torch.Generator()})
    assert g.calls == 0


@pytest.mark.parametrize("name", NAMES)
def test_stochastic_flag_matches_the_use_of_the_generator(name):
    # A sampler marked stochastic must change with the generator; one not marked must not.
    g = target("ring8", dtype=torch.float32)
    x = 5.0 * torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    sig = karras(6, 0.05, 5.0)
    runs = [
        REGISTRY[name](
            g, x.clone(), sig, generator=torch.Generator().manual_seed(k), **CONTRACT[name]
        )
        for k in (1, 2)
    ]
    differs = not torch.equal(runs[0], runs[1])
    assert differs == (name in STOCHASTIC), name


@pytest.mark.parametrize("name", NAMES)
def test_callback_sees_every_step_in_order(name):
    # The callback contract: one call per step i = 0 .. N-1 with the state x at noise level sigma
    # (x's shape) and the denoiser output there (x's shape), or None where an adaptive sampler
    # reports a state between its own steps. sigma is sigmas[i], except that edm_stochastic reports
    # the churned level sigma_hat = sigma_i (1 + gamma_i) of the state it denoises (gamma_i <=
    # sqrt(2) - 1), as k-diffusion does.
    g = target("ring8", dtype=torch.float32)
    x = 5.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    sig = karras(5, 0.05, 5.0)
    seen = []
    REGISTRY[name](
        g, x.clone(), sig, generator=torch.Generator().manual_seed(1), callback=seen.append,
        **CONTRACT[name],
    )  # fmt: skip
    assert [d["i"] for d in seen] == list(range(len(sig) - 1)), name
    got, want = [d["sigma"] for d in seen], sig[:-1].tolist()
    if name == "edm_stochastic":
        assert all(w <= g <= math.sqrt(2) * w * (1 + 1e-12) for g, w in zip(got, want, strict=True))
        assert got != pytest.approx(want)  # the options above do churn
    else:
        assert got == pytest.approx(want, rel=1e-12)
        torch.testing.assert_close(seen[0]["x"], x)  # step 0 sees the start state itself
    for d in seen:
        assert set(d) == {"i", "sigma", "x", "denoised"}
        assert d["x"].shape == x.shape
        assert d["denoised"] is None or d["denoised"].shape == x.shape
    # A fixed-step sampler reports D(x, sigma_i) of the state it shows; the predictor-correctors
    # (UniPC, SA-Solver, DC-Solver) report the output at their predicted point and the state after
    # the corrector that used it.
    if name not in ADAPTIVE and name not in ("unipc", "sa_solver", "dc_solver"):
        for d in seen:
            want = g(d["x"], torch.full((3,), d["sigma"]))
            torch.testing.assert_close(d["denoised"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("unipc", {"order": 4}, "order"),
        ("unipc", {"variant": "bh3"}, "variant"),
        ("deis", {"order": 0}, "order"),
        ("deis", {"basis": "t"}, "basis"),
        ("ipndm", {"order": 5}, "order"),
        ("dpm_solver_2", {"r1": 0.0}, "r1"),
        ("dpmpp_2s", {"r": 1.5}, "r "),
        ("euler_ancestral", {"eta": -1.0}, "eta"),
        ("dpmpp_2m_sde", {"eta": -0.1}, "eta"),
        ("edm_stochastic", {"s_churn": -1.0}, "s_churn"),
        ("restart", {"t_min": 0.5, "t_max": 0.2}, "t_min"),
        ("restart", {"restart_steps": 0}, "restart_steps"),
        ("restart", {"t_min": 20.0, "t_max": 30.0}, "t_max"),
        ("pc_langevin", {"predictor": "ode"}, "predictor"),
        ("pc_langevin", {"step_size": "auto"}, "step_size"),
        ("pc_langevin", {"n_corrector": -1}, "n_corrector"),
        ("adaptive_ode", {"rtol": 0.0}, "rtol"),
        ("adaptive_sde", {"atol": -1.0}, "atol"),
        ("sa_solver", {"tau": -1.0}, "tau"),
        ("dc_solver", {"ratios": [1.0, 2.0]}, "ratios"),
        ("dc_solver", {"dc_order": 0}, "dc_order"),
        ("dpm_solver_v3", {"order": 4}, "order"),
        ("sa_solver", {"predictor_order": 5}, "predictor_order"),
        ("sa_solver", {"corrector_order": -1}, "corrector_order"),
    ],
)
def test_bad_option_values_are_clear_errors(name, options, match):
    den = Counting(target("ring8"))
    with pytest.raises(ValueError, match=match):
        REGISTRY[name](den, torch.ones(2, 2), karras(5, 0.1, 10.0), **options)
    assert den.calls == 0


def test_sample_auto_refuses_a_gaussian_of_another_dimension_before_any_call():
    from scorekit.samplers import GaussianFlow

    g = Counting(target("ring8"))
    flow = GaussianFlow(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"gaussian= is a Gaussian of 3 values per row; shape \(4, 2\)"
    ):
        sample(g, (4, 2), nfe=6, sampler="auto", gaussian=flow)
    assert g.calls == 0
