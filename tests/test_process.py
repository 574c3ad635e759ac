"""Forward processes: round trips, monotonicity, the sigma frame, closed forms, training noise levels."""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.process import (
    EDM,
    PROCESSES,
    VE,
    DiscreteProcess,
    Process,
    RectifiedFlow,
    VPCosine,
    VPLinear,
    get_process,
)

NAMES = sorted(PROCESSES)
VARIANCE_PRESERVING = {"vp", "vp_cosine", "ddpm", "ddpm_scaled_linear"}


def _grid(p: Process, n: int = 2001) -> torch.Tensor:
    return torch.linspace(p.t_min, p.t_max, n, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_t_of_sigma_inverts_sigma_of_t(name):
    p = get_process(name)
    t = _grid(p)
    sigma = p.sigma(t)
    torch.testing.assert_close(p.t(sigma), t, rtol=1e-9, atol=1e-9 * max(1.0, p.t_max))
    # And the other way round, on a log grid over the whole sigma range.
    s = torch.logspace(math.log10(p.sigma_min), math.log10(p.sigma_max), 501, dtype=torch.float64)
    torch.testing.assert_close(p.sigma(p.t(s)), s, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_sigma_increasing_and_snr_decreasing(name):
    p = get_process(name)
    t = _grid(p)
    sigma = p.sigma(t)
    assert (sigma.diff() > 0).all(), "sigma(t) must increase strictly"
    snr = p.alpha(t) ** 2 / p.s(t) ** 2
    assert (snr.diff() < 0).all(), "the signal-to-noise ratio alpha^2 / s^2 must decrease"
    torch.testing.assert_close(snr, 1 / sigma**2, rtol=1e-10, atol=0)
    assert p.sigma_min == pytest.approx(float(sigma[0]), rel=1e-12)
    assert p.sigma_max == pytest.approx(float(sigma[-1]), rel=1e-12)
    assert torch.isfinite(sigma).all() and (sigma > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_alpha_from_sigma_is_alpha_of_t_of_sigma(name):
    p = get_process(name)
    t = _grid(p)
    torch.testing.assert_close(p.alpha_from_sigma(p.sigma(t)), p.alpha(t), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(VARIANCE_PRESERVING))
def test_variance_preserving(name):
    p = get_process(name)
    t = _grid(p)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.s(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_finite_differences(name):
    p = get_process(name)
    if name.startswith("ddpm"):  # piecewise in t: differentiate inside steps
        t = torch.tensor([0.5, 3.25, 100.5, 600.75, p.t_max - 0.5], dtype=torch.float64)
    else:
        t = p.t_min + (p.t_max - p.t_min) * torch.tensor(
            [0.01, 0.2, 0.5, 0.9, 0.99], dtype=torch.float64
        )
    h = 1e-6 * t.clamp(min=1e-2)
    da, ds = p.derivatives(t)
    fd_a = (p.alpha(t + h) - p.alpha(t - h)) / (2 * h)
    fd_s = (p.s(t + h) - p.s(t - h)) / (2 * h)
    torch.testing.assert_close(da, fd_a, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ds, fd_s, rtol=1e-6, atol=1e-8)
    with torch.inference_mode():  # used by the flow adapter while sampling
        da2, ds2 = p.derivatives(t)
    torch.testing.assert_close(da2, da)
    torch.testing.assert_close(ds2, ds)


def test_closed_forms():
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    # VP (Song et al. 2021, eq. 33; EDM Table 1): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
    vp = VPLinear(beta_min=0.1, beta_max=20.0)
    torch.testing.assert_close(vp.sigma(t), torch.sqrt(torch.exp(9.95 * t**2 + 0.1 * t) - 1))
    # VE (Song et al. 2021, eq. 31): sigma_min (sigma_max / sigma_min)^t.
    ve = VE(sigma_min=0.02, sigma_max=100.0)
    torch.testing.assert_close(ve.sigma(t), 0.02 * 5000.0**t)
    torch.testing.assert_close(ve.alpha(t), torch.ones_like(t))
    # Cosine (Nichol & Dhariwal 2021, eq. 17): abar = f(t) / f(0).
    cos = VPCosine()
    f = torch.cos((t.clamp(max=0.99) + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = f / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(cos.sigma(t.clamp(max=0.99)), torch.sqrt((1 - abar) / abar))
    # Rectified flow: x_t = (1 - t) x0 + t eps.
    rf = RectifiedFlow()
    tt = t.clamp(max=0.9)
    torch.testing.assert_close(rf.alpha(tt), 1 - tt)
    torch.testing.assert_close(rf.s(tt), tt)
    # EDM: sigma(t) = t.
    torch.testing.assert_close(EDM().sigma(t), t)


def test_discrete_table_matches_betas():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    p = DiscreteProcess.linear()
    steps = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(p.sigma(steps), torch.sqrt((1 - abar) / abar))
    torch.testing.assert_close(p.alpha(steps), abar.sqrt())
    torch.testing.assert_close(p.t(p.sigma(steps)), steps)
    sl = DiscreteProcess.scaled_linear()
    abar_sl = torch.cumprod(
        1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0
    )
    torch.testing.assert_close(sl.alpha(steps) ** 2, abar_sl)


@pytest.mark.parametrize("name", NAMES)
def test_sigma_frame_statistics(name):
    # Noise a fixed x0 in the process's own frame, x_t = alpha x0 + s eps, then divide by alpha:
    # the result must have mean x0 and standard deviation sigma(t).
    p = get_process(name)
    n = 40_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    for frac in (0.0, 0.3, 0.7, 1.0):
        t_val = p.t_min + frac * (p.t_max - p.t_min)
        if name.startswith("ddpm"):
            t_val = round(t_val)
        t = torch.full((n,), float(t_val), dtype=torch.float64)
        eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
        x_t = p.alpha(t)[:, None] * x0 + p.s(t)[:, None] * eps
        x, sigma = p.to_frame(x_t, t)
        sig = float(sigma[0])
        se_mean = sig / math.sqrt(n)
        assert ((x.mean(0) - x0).abs() < 5 * se_mean).all()
        # Standard error of a sample std of a Gaussian: sigma / sqrt(2 (n - 1)).
        assert ((x.std(0) - sig).abs() < 5 * sig / math.sqrt(2 * (n - 1))).all()
        back, t_back = p.from_frame(x, sigma)
        torch.testing.assert_close(back, x_t)
        torch.testing.assert_close(t_back, t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_training_sigma_range_dtype_and_determinism(name):
    p = get_process(name)
    a = p.training_sigma(5000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = p.training_sigma(5000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert a.shape == (5000,) and a.dtype == torch.float64
    assert torch.equal(a, b)
    assert (a > 0).all() and torch.isfinite(a).all()
    if name != "edm":  # EDM's log-normal is not truncated (Karras et al. 2022, Table 1)
        assert (a >= p.sigma_min * (1 - 1e-9)).all() and (a <= p.sigma_max * (1 + 1e-9)).all()
    assert p.training_sigma(7).dtype == torch.float32


def _assert_normal(z: torch.Tensor, mean: float, std: float):
    """Sample mean and std of ``z`` agree with ``N(mean, std^2)`` within 5 standard errors."""
    n = z.numel()
    assert abs(float(z.mean()) - mean) < 5 * std / math.sqrt(n)
    assert abs(float(z.std()) - std) < 5 * std / math.sqrt(2 * (n - 1))


def _assert_uniform(u: torch.Tensor):
    """Mean 1/2 (variance 1/12) and variance 1/12 (variance 1/180) of U(0, 1) within 5 SE."""
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)


def test_training_sigma_distributions():
    n = 100_000
    g = torch.Generator().manual_seed(0)
    # EDM: ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1).
    edm = EDM(p_mean=-1.2, p_std=1.2)
    _assert_normal(edm.training_sigma(n, generator=g, dtype=torch.float64).log(), -1.2, 1.2)
    # Rectified flow: logit(t) ~ N(m, s^2) (Esser et al. 2024, eq. 19); the clamp at 1e-3 is 7 std out.
    rf = RectifiedFlow(logit_mean=0.3, logit_std=0.8)
    t = rf.t(rf.training_sigma(n, generator=g, dtype=torch.float64))
    _assert_normal(torch.log(t / (1 - t)), 0.3, 0.8)
    # VP, cosine and VE: t uniform on [t_min, t_max].
    for p in (VPLinear(), VPCosine(), VE()):
        t = p.t(p.training_sigma(n, generator=g, dtype=torch.float64))
        _assert_uniform((t - p.t_min) / (p.t_max - p.t_min))
    # DDPM: integer steps, uniformly (chi-square over 10 bins of 100 steps, 9 dof; 40 is p ~ 1e-5).
    dd = DiscreteProcess.linear()
    steps = dd.t(dd.training_sigma(n, generator=g, dtype=torch.float64))
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-6)
    counts = torch.bincount((steps.round().long() // 100), minlength=10).double()
    chi2 = float(((counts - n / 10) ** 2 / (n / 10)).sum())
    assert chi2 < 40


@pytest.mark.parametrize("name", NAMES)
def test_prior_is_wide_gaussian(name):
    p = get_process(name)
    x = p.prior((20_000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (20_000, 2)
    _assert_normal(x.flatten(), 0.0, p.sigma_max)


def test_get_process_and_bad_input():
    assert isinstance(get_process("vp"), VPLinear)
    p = VE()
    assert get_process(p) is p
    assert get_process("ve", sigma_max=10.0).sigma_max == pytest.approx(10.0)
    with pytest.raises(ValueError, match=r"unknown process 'vpsde'; allowed: \['ddpm'"):
        get_process("vpsde")
    with pytest.raises(ValueError, match=r"beta_min < beta_max; got beta_min=5\.0, beta_max=1\.0"):
        VPLinear(beta_min=5.0, beta_max=1.0)
    with pytest.raises(
        ValueError, match=r"sigma_min < sigma_max; got sigma_min=1\.0, sigma_max=0\.5"
    ):
        VE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDM(sigma_min=0.0)
    with pytest.raises(ValueError, match="t_max < 1"):
        VPCosine(t_max=1.0)
    with pytest.raises(ValueError, match="t_min < t_max < 1"):
        RectifiedFlow(t_max=1.0)
    with pytest.raises(
        ValueError, match=r"alphas_cumprod must lie in \(0, 1\) and strictly decrease"
    ):
        DiscreteProcess(torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="at least 2 entries"):
        DiscreteProcess(torch.tensor([0.5]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        get_process("vp", sigma_max=3.0)


class _Quadratic(Process):
    """A user-style process with only the abstract methods: x_t = (1 - t^2 / 2) x0 + t eps."""

    name = "quadratic"
    t_min, t_max = 0.01, 1.0

    def alpha(self, t):
        return 1 - t**2 / 2

    def sigma(self, t):
        return t / (1 - t**2 / 2)

    def t(self, sigma):
        # sigma t^2 / 2 + t - sigma = 0, the positive root without cancellation.
        return 2 * sigma / (1 + torch.sqrt(1 + 2 * sigma**2))


def test_custom_process_uses_the_generic_fallbacks():
    p = _Quadratic()
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    torch.testing.assert_close(p.t(p.sigma(t)), t)
    for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with ctx():
            da, ds = p.derivatives(t)
        torch.testing.assert_close(da, -t)
        torch.testing.assert_close(ds, torch.ones_like(t))
    torch.testing.assert_close(p.alpha_from_sigma(p.sigma(t)), p.alpha(t))
