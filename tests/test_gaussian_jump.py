"""The data's Gaussian beyond the teleport: ``gaussian_jump`` (the corrected last step),
``with_gaussian_jump`` and ``dpm_solver_v3(gaussian=...)``, checked against the exact probability-flow
ODE solved numerically (``pf_ode_reference``), not against the closed forms they use."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch

from scorekit.analytic import GaussianMixture
from scorekit.pfode import pf_ode_reference
from scorekit.samplers import AUTO_TELEPORT, REGISTRY, sample
from scorekit.samplers.accelerators import (
    GaussianFlow,
    extrapolated_jump,
    gaussian_jump,
    with_extrapolated_jump,
    with_gaussian_jump,
)
from scorekit.samplers.defaults import Choice, auto_sigmas
from scorekit.samplers.dpm3 import EMS
from scorekit.schedules import loglinear

F64 = torch.float64


def _gaussian(d: int = 6, seed: int = 0) -> tuple[GaussianMixture, GaussianFlow]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    cov = a @ a.T / d + 0.02 * torch.eye(d, dtype=F64)
    mean = torch.randn(d, generator=g, dtype=F64)
    return GaussianMixture(mean[None], cov[None], torch.ones(1, dtype=F64)), GaussianFlow(mean, cov)


def _mixture(d: int = 8, seed: int = 1) -> GaussianMixture:
    """Two overlapping isotropic components of different variances: non-Gaussian, smooth."""
    g = torch.Generator().manual_seed(seed)
    means = 0.8 * torch.randn(2, d, generator=g, dtype=F64)
    return GaussianMixture(means, torch.tensor([[0.3], [1.0]], dtype=F64).expand(2, d),
                           torch.tensor([0.4, 0.6], dtype=F64))  # fmt: skip


def _noise(n: int, d: int, sigma: float, seed: int = 2) -> torch.Tensor:
    return sigma * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_gaussian_jump_is_the_exact_end_point_on_gaussian_data(sigma):
    gm, flow = _gaussian()
    x = pf_ode_reference(gm, _noise(32, 6, 80.0), 80.0, sigma, rtol=1e-11, atol=1e-11)
    want = pf_ode_reference(gm, x, sigma, 0.0, rtol=1e-11, atol=1e-11)
    d = gm(x, torch.full((32,), sigma, dtype=F64))
    got = gaussian_jump(flow, x, d, sigma)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert float((d - want).abs().max()) > 100 * 1e-7  # the plain jump is not exact


def test_jump_correction_of_a_diagonal_covariance_in_both_forms():
    var = torch.tensor([0.1, 1.0, 3.0], dtype=F64)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    x = _noise(5, 3, 2.0)
    a, b = GaussianFlow(mean, var), GaussianFlow(mean, torch.diag(var))
    torch.testing.assert_close(a.jump_correction(x, 0.7), b.jump_correction(x, 0.7))
    lam = var / (var + 0.49)  # by hand: (sqrt(a) - a) (x - m) per coordinate
    torch.testing.assert_close(a.jump_correction(x, 0.7), (lam.sqrt() - lam) * (x - mean))


def test_with_gaussian_jump_corrects_the_samplers_last_step_only():
    gm = _mixture()
    flow = GaussianFlow.from_mixture(gm)
    x, sig = _noise(16, 8, 40.0), loglinear(6, 0.2, 40.0).to(F64)
    seen, kept = [], {}

    def spy(info):
        seen.append(float(info["sigma"]))
        if float(info["sigma"]) > 0:
            kept.update(info)

    plain = REGISTRY["unipc"](gm, x.clone(), sig, callback=spy, order=3)
    got = with_gaussian_jump("unipc", flow)(gm, x.clone(), sig, order=3, callback=seen.append)
    assert len(seen) == 2 * 6  # the user's callback still sees every node
    torch.testing.assert_close(plain, kept["denoised"], rtol=0, atol=0)
    want = kept["denoised"] + flow.jump_correction(kept["x"], float(kept["sigma"]))
    torch.testing.assert_close(got, want)
    wrapped = with_gaussian_jump(REGISTRY["unipc"], flow)
    assert wrapped.nfe(sig, order=3) == 6 and wrapped.nfe_formula(6, {}) == 6
    with pytest.raises(ValueError, match=r"ipndm does not end with x = D\(x, sigma_last\)"):
        with_gaussian_jump("ipndm", flow)(gm, x.clone(), sig)
    with pytest.raises(TypeError, match="gaussian must be a GaussianFlow; got Tensor"):
        with_gaussian_jump("unipc", flow.mean)
    with pytest.raises(ValueError, match="sampler: dpm_solver_v3 with gaussian= already ends"):
        with_gaussian_jump("dpm_solver_v3", flow)(gm, x.clone(), sig, gaussian=flow)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        flow.jump_correction(x, 0.0)


@pytest.mark.parametrize("options", [{}, {"corrector": True}, {"order": 2}, {"pseudo_order": True}])
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_dpm_solver_v3_with_the_gaussian_is_exact_on_gaussian_data(steps, options):
    gm, flow = _gaussian()
    x = _noise(16, 6, 80.0)
    want = pf_ode_reference(gm, x, 80.0, 0.0, rtol=1e-11, atol=1e-11)
    sig = loglinear(steps, 0.3, 80.0).to(F64)  # steps - 1 solver steps, then the Gaussian jump
    assert len(sig) == steps + 1
    got = REGISTRY["dpm_solver_v3"](gm, x.clone(), sig, gaussian=flow, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    plain = REGISTRY["dpm_solver_v3"](gm, x.clone(), sig, **options)
    assert float((plain - want).abs().max()) > 1e-3


def test_dpm_solver_v3_with_the_gaussian_converges_on_a_mixture():
    gm = _mixture()
    flow = GaussianFlow.from_mixture(gm)
    x = _noise(64, 8, 20.0)
    want = pf_ode_reference(gm, x, 20.0, 0.0, rtol=1e-11, atol=1e-11)

    def err(n):
        sig = loglinear(n, 0.005, 20.0).to(F64)
        out = REGISTRY["dpm_solver_v3"](gm, x.clone(), sig, gaussian=flow, long_step=None)
        return float((out - want).square().mean().sqrt())

    e = [err(n) for n in (16, 32, 64)]
    assert e[0] > e[1] > e[2]
    assert e[1] / e[2] > 2**1.7  # at least second order (the predictor's, as without statistics)


def test_dpm_solver_v3_gaussian_refusals():
    gm, flow = _gaussian()
    x, sig = _noise(4, 6, 10.0), loglinear(3, 0.1, 10.0).to(F64)

    with pytest.raises(ValueError, match=r"give statistics .* or gaussian .*, not both"):
        REGISTRY["dpm_solver_v3"](gm, x, sig, gaussian=flow, statistics=EMS.degenerate((6,)))
    with pytest.raises(ValueError, match="a Gaussian of 3 values per row; x has 6"):
        REGISTRY["dpm_solver_v3"](gm, x, sig, gaussian=GaussianFlow(torch.zeros(3, dtype=F64),
                                                                    torch.ones(3, dtype=F64)))  # fmt: skip
    with pytest.raises(TypeError, match="gaussian must be a GaussianFlow; got dict"):
        REGISTRY["dpm_solver_v3"](gm, x, sig, gaussian={})


def test_choice_jump_values():
    Choice("unipc", {}, "karras", 0.1, 4.0, "teleport", "gaussian")
    with pytest.raises(
        ValueError, match="jump must be 'tweedie', 'gaussian' or 'extrapolated'; got 'exact'"
    ):
        Choice("unipc", {}, "karras", 0.1, 4.0, "teleport", "exact")
    with pytest.raises(ValueError, match="jump='gaussian' needs the data's Gaussian"):
        Choice("unipc", {}, "karras", 0.1, None, "sigma_max", "gaussian")


@pytest.mark.parametrize(
    "choice",
    [
        Choice("unipc", {"order": 2}, "loglinear", 0.2, 2.0, "teleport", "gaussian"),
        Choice("dpm_solver_v3", {"order": 3}, "loglinear", 0.2, 2.0, "teleport", "gaussian"),
    ],
)
def test_sample_auto_runs_a_gaussian_jump_choice(choice):
    gm = _mixture()
    flow = GaussianFlow.from_mixture(gm)
    z = _noise(8, 8, 1.0, seed=5)
    with patch.dict(AUTO_TELEPORT, {5: choice}):
        got = sample(gm, (8, 8), nfe=5, sampler="auto", gaussian=flow, noise=z, sigma_max=80.0,
                     dtype=F64)  # fmt: skip
    sig, top = auto_sigmas(choice, 5, 80.0, evals=flow.evals)
    start = flow(80.0 * z, 80.0, top)
    if choice.sampler == "dpm_solver_v3":
        want = REGISTRY["dpm_solver_v3"](gm, start, sig, gaussian=flow, **choice.options)
    else:
        want = with_gaussian_jump(choice.sampler, flow)(gm, start, sig, **choice.options)
    torch.testing.assert_close(got, want)
    plain = REGISTRY[choice.sampler](gm, start, sig, **choice.options)
    assert not torch.allclose(got, plain)


def test_dpm_solver_v3_with_the_gaussian_reports_and_returns_data_coordinates():
    """Images ``[B, C, H, W]``, float32, a diagonal Gaussian given as ``[d]``, and the callback: the
    states and ``D`` it sees are in the data's coordinates (``D`` equals the denoiser at that state)."""
    g = torch.Generator().manual_seed(4)
    var = 0.1 + torch.rand(12, generator=g, dtype=F64)
    mean = torch.randn(12, generator=g, dtype=F64)
    gm = GaussianMixture(mean[None], var[None], torch.ones(1, dtype=F64))
    flow = GaussianFlow(mean, var)
    x = 20.0 * torch.randn(4, 3, 2, 2, generator=g)  # float32, 12 values per row
    want = flow(x.double().reshape(4, 12), 20.0, 0.0).reshape(4, 3, 2, 2)

    def den(v, sigma):
        return gm(v.reshape(4, 12).double(), sigma.double()).reshape(v.shape).to(v.dtype)

    seen = []
    got = REGISTRY["dpm_solver_v3"](den, x, loglinear(4, 0.2, 20.0), gaussian=flow,
                                    callback=seen.append)  # fmt: skip
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    assert len(seen) == 4
    for info in seen:
        assert info["x"].shape == x.shape
        sig = torch.full((4,), float(info["sigma"]))
        torch.testing.assert_close(info["denoised"], den(info["x"], sig), rtol=0, atol=1e-5)


def test_extrapolated_jump_is_fourth_order_in_sigma_on_the_exact_path():
    """On the exact ODE path of a mixture, the plain jump errs by O(sigma^2), the sigma^2
    extrapolation of the last two D's by O(sigma^4): halving both sigmas cuts it about 16x."""
    gm = _mixture(d=4)
    x = pf_ode_reference(gm, _noise(64, 4, 20.0), 20.0, 0.4, rtol=1e-11, atol=1e-11)
    want = pf_ode_reference(gm, x, 0.4, 0.0, rtol=1e-11, atol=1e-11)

    def errors(s):  # sigma_p = 2 s, sigma_s = s, both on the exact path
        xp = pf_ode_reference(gm, x, 0.4, 2 * s, rtol=1e-11, atol=1e-11)
        xs = pf_ode_reference(gm, x, 0.4, s, rtol=1e-11, atol=1e-11)
        dp, ds = (gm(v, torch.full((64,), t, dtype=F64)) for v, t in ((xp, 2 * s), (xs, s)))
        plain = float((ds - want).square().mean().sqrt())
        extra = extrapolated_jump((2 * s, s), (dp, ds))
        return plain, float((extra - want).square().mean().sqrt())

    (p1, e1), (p2, e2) = errors(0.1), errors(0.05)
    assert 3.0 < p1 / p2 < 5.0  # the plain jump: second order
    assert e1 / e2 > 10.0 and e1 < p1 / 5  # the extrapolation: fourth order, and far smaller
    with pytest.raises(ValueError, match="sigma_p > sigma_s > 0"):
        extrapolated_jump((0.1, 0.2), (want, want))


def test_with_extrapolated_jump_uses_the_last_two_calls():
    gm = _mixture()
    x, sig = _noise(16, 8, 40.0), loglinear(6, 0.2, 40.0).to(F64)
    nodes = []

    def spy(info):
        if float(info["sigma"]) > 0:
            nodes.append(info)

    REGISTRY["unipc"](gm, x.clone(), sig, callback=spy, order=2)
    got = with_extrapolated_jump("unipc")(gm, x.clone(), sig, order=2)
    p, s = nodes[-2:]
    sp, ss = float(p["sigma"]), float(s["sigma"])
    want = s["denoised"] - ss**2 / (sp**2 - ss**2) * (p["denoised"] - s["denoised"])
    torch.testing.assert_close(got, want)
    one = torch.tensor([0.3, 0.0], dtype=F64)  # one call: nothing to extrapolate, the plain jump
    torch.testing.assert_close(with_extrapolated_jump("euler")(gm, x.clone(), one),
                               REGISTRY["euler"](gm, x.clone(), one))  # fmt: skip
    with pytest.raises(ValueError, match="sampler: deis does not end with"):
        with_extrapolated_jump("deis")
    with pytest.raises(ValueError, match="sampler: euler_ancestral adds noise between its calls"):
        with_extrapolated_jump(REGISTRY["euler_ancestral"])


def test_sample_auto_runs_an_extrapolated_choice():
    gm = _mixture()
    z = _noise(8, 8, 1.0, seed=6)
    choice = Choice("unipc", {"order": 3}, "loglinear", 0.05, None, "sigma_max", "extrapolated")
    from scorekit.samplers import AUTO

    with patch.dict(AUTO, {10: choice}):
        got = sample(gm, (8, 8), nfe=10, sampler="auto", noise=z, sigma_max=80.0, dtype=F64)
    sig, _ = auto_sigmas(choice, 10, 80.0)
    want = with_extrapolated_jump("unipc")(gm, 80.0 * z, sig, order=3)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, REGISTRY["unipc"](gm, 80.0 * z, sig, order=3))


def test_the_auto_table_with_statistics_runs_the_extrapolated_jump_after_the_teleport():
    """``sample(sampler="auto", gaussian=...)`` at an NFE whose table entry is extrapolated: the
    Gaussian flow to the band's top, the sampler on the band, the extrapolated last step; and closer
    to the exact ODE solution than the same run with the plain last step."""
    gm = _mixture()
    flow = GaussianFlow.from_mixture(gm)
    z = _noise(32, 8, 1.0, seed=7)
    nfe = next(n for n, c in sorted(AUTO_TELEPORT.items()) if c.jump == "extrapolated" and n >= 10)
    c = AUTO_TELEPORT[nfe]
    got = sample(gm, (32, 8), nfe=nfe, sampler="auto", gaussian=flow, noise=z, sigma_max=80.0,
                 dtype=F64)  # fmt: skip
    sig, top = auto_sigmas(c, nfe, 80.0, evals=flow.evals)
    start = flow(80.0 * z, 80.0, top)
    torch.testing.assert_close(got, with_extrapolated_jump(c.sampler)(gm, start, sig, **c.options))
    ref = pf_ode_reference(gm, 80.0 * z, 80.0, 0.0, rtol=1e-10, atol=1e-10)
    plain = REGISTRY[c.sampler](gm, start, sig, **c.options)
    err, err_plain = (float((v - ref).square().mean().sqrt()) for v in (got, plain))
    assert err < err_plain
