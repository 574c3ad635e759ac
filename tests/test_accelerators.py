"""Accelerators against exact maths: the teleport of a Gaussian is its exact PF-ODE flow; epsilon
scaling and time shift (now in scorekit.guidance.exposure) by hand."""

from __future__ import annotations

import pytest
import torch

from scorekit import schedules as S
from scorekit.analytic import gaussian, target
from scorekit.guidance import eps_scaling, time_shift
from scorekit.samplers import REGISTRY, nfe
from scorekit.samplers.accelerators import GaussianFlow, teleport, with_teleport


def _random_gaussian(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.05 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return mean, cov


@pytest.mark.slow
@pytest.mark.parametrize("diagonal", [False, True])
def test_teleport_is_the_exact_flow_of_a_gaussian(diagonal):
    mean, cov = _random_gaussian(4)
    if diagonal:
        cov = torch.diag(cov.diagonal())
    target_ = gaussian(mean, cov)
    flow = GaussianFlow(mean, cov.diagonal() if diagonal else cov)
    x0 = 30.0 * torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s_from, s_to in ((30.0, 2.0), (2.0, 0.0)):
        ode = S.pf_ode_reference(target_, x0, s_from, s_to, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(teleport(flow, x0, s_from, s_to), ode, rtol=1e-7, atol=1e-8)


def test_teleport_composes_and_inverts():
    mean, cov = _random_gaussian(3, seed=2)
    flow = GaussianFlow(mean, cov)
    x = torch.randn(5, 3, dtype=torch.float64) * 20
    two_hops = flow(flow(x, 20.0, 4.0), 4.0, 0.5)
    torch.testing.assert_close(two_hops, flow(x, 20.0, 0.5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow(flow(x, 20.0, 0.5), 0.5, 20.0), x, rtol=1e-12, atol=1e-10)
    # Per-row sigmas [B] and image-shaped rows [B, 1, 3].
    s = torch.tensor([20.0, 10.0, 5.0, 2.0, 1.0], dtype=torch.float64)
    rows = torch.stack([flow(x[i : i + 1], float(s[i]), 0.3)[0] for i in range(5)])
    torch.testing.assert_close(flow(x, s, 0.3), rows)
    torch.testing.assert_close(flow(x[:, None], s, 0.3)[:, 0], rows)


def test_with_teleport_saves_the_calls_and_is_exact_on_a_gaussian():
    mean, cov = _random_gaussian(3, seed=3)
    target_ = gaussian(mean, cov)
    flow = GaussianFlow(mean, cov)
    calls = {"n": 0}

    def counted(x, sigma):
        calls["n"] += 1
        return target_(x, sigma)

    sampler = with_teleport("dpmpp_2m", flow)
    sig = torch.cat([torch.tensor([80.0], dtype=torch.float64), S.karras(6, 0.01, 2.0)])
    x = 80.0 * torch.randn(32, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sampler(counted, x.clone(), sig)
    assert calls["n"] == sampler.nfe(sig) == nfe("dpmpp_2m", sig[1:]) == 6
    # The same as running dpmpp_2m from the exactly teleported state.
    direct = REGISTRY["dpmpp_2m"](target_, flow(x, 80.0, 2.0), sig[1:])
    torch.testing.assert_close(out, direct, rtol=0, atol=1e-12)


def test_teleport_beats_the_same_calls_spent_on_high_noise():
    # On a mixture the teleport is approximate, but at equal NFE it is far better than spending the
    # calls above sigma = 5, where the mixture's ODE is nearly its Gaussian approximation's.
    gm = target("ring8")
    flow = GaussianFlow.from_mixture(gm)
    x = 80.0 * torch.randn(400, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = S.pf_ode_reference(gm, x, 80.0, 0.0, rtol=1e-10, atol=1e-10)
    tele = with_teleport("dpmpp_2m", flow)(
        gm, x, torch.cat([torch.tensor([80.0]).double(), S.loglinear(8, 0.01, 5.0)])
    )
    plain = REGISTRY["dpmpp_2m"](gm, x, S.loglinear(8, 0.01, 80.0))
    err = lambda y: float((y - ref).square().mean().sqrt())  # noqa: E731
    assert err(tele) < 0.5 * err(plain), (err(tele), err(plain))


def test_eps_scaling_by_hand():
    d = lambda x, sigma: 0.5 * x  # noqa: E731  (any denoiser)
    x = torch.tensor([[2.0, -4.0]], dtype=torch.float64)
    sigma = torch.tensor([3.0], dtype=torch.float64)
    # lambda = 1 is the identity.
    torch.testing.assert_close(eps_scaling(d, 1.0)(x, sigma), d(x, sigma))
    # eps = (x - D)/sigma = [1/3, -2/3]; eps/1.25 = [4/15, -8/15]; D' = x - sigma eps' = [1.2, -2.4].
    got = eps_scaling(d, 1.25)(x, sigma)
    torch.testing.assert_close(got, torch.tensor([[1.2, -2.4]], dtype=torch.float64))
    # lambda as a function of sigma, per row.
    lam = lambda s: 1 + 0.1 * s  # noqa: E731
    x2 = torch.tensor([[2.0], [2.0]], dtype=torch.float64)
    s2 = torch.tensor([0.0 + 1.0, 5.0], dtype=torch.float64)
    want = x2 - (x2 - 0.5 * x2) / torch.tensor([[1.1], [1.5]], dtype=torch.float64)
    torch.testing.assert_close(eps_scaling(d, lam)(x2, s2), want)
    with pytest.raises(ValueError, match="lam"):
        eps_scaling(d, 0.0)


def test_time_shift_uses_the_noise_level_the_sample_shows():
    seen = {}

    def d(x, sigma):
        seen["sigma"] = sigma.clone()
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 20000, generator=g, dtype=torch.float64)  # data variance 1 per coordinate
    x = x0 + 2.0 * torch.randn(4, 20000, generator=g, dtype=torch.float64)
    # Nominal 2.0 and the sample shows 2.0: no shift (within the estimate's noise, clamped to <= 2).
    time_shift(d, data_var=1.0, max_shift=0.2)(x, torch.full((4,), 2.0, dtype=torch.float64))
    assert ((seen["sigma"] > 1.95) & (seen["sigma"] <= 2.0)).all()
    # Nominal 2.2 but the sample shows 2.0: evaluated at about 2.0.
    time_shift(d, data_var=1.0, max_shift=0.2)(x, torch.full((4,), 2.2, dtype=torch.float64))
    torch.testing.assert_close(
        seen["sigma"], torch.full((4,), 2.0, dtype=torch.float64), atol=0.05, rtol=0
    )
    # Never beyond the window: nominal 4.0 -> at least 0.8 * 4.0.
    time_shift(d, data_var=1.0, max_shift=0.2)(x, torch.full((4,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(seen["sigma"], torch.full((4,), 3.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_shift"):
        time_shift(d, data_var=1.0, max_shift=1.5)


def test_errors():
    mean, cov = _random_gaussian(3)
    flow = GaussianFlow(mean, cov)
    with pytest.raises(ValueError, match="values per row"):
        flow(torch.zeros(2, 4, dtype=torch.float64), 1.0, 0.5)
    with pytest.raises(ValueError, match="cov"):
        GaussianFlow(mean, torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="semi-definite"):
        GaussianFlow(mean, -torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="euler"):
        with_teleport("nope", flow)
    with pytest.raises(TypeError, match="GaussianFlow"):
        with_teleport("euler", (mean, cov))
    with pytest.raises(ValueError, match="3 entries"):
        with_teleport("euler", flow)(lambda x, s: x, torch.zeros(1, 3), torch.tensor([1.0, 0.0]))
