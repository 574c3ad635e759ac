"""Density guidance against the exact log-density of a Gaussian mixture: the rate of change of
``log p_sigma`` along the guided flow, computed here by autograd and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.guidance import class_target, density_guidance
from scorekit.samplers import REGISTRY
from scorekit.schedules import karras

MIX = class_target("ring6").uncond  # 2-D, 6 overlapping Gaussians


def _rates(den, x, sigma):
    """``d log p_sigma(x_sigma) / d(-log sigma)`` along the drift ``(x - den) / sigma``, and the flow's
    own rate ``-sigma^2 Lap log p_sigma``, both from the exact log-density (autograd, finite difference)."""
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    h = 1e-5 * sigma
    d_sigma = (MIX.log_prob(x, s + h) - MIX.log_prob(x, s - h)) / (2 * h)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(MIX.log_prob(xg, s).sum(), xg, create_graph=True)
    lap = sum(
        torch.autograd.grad(grad[:, j].sum(), xg, retain_graph=True)[0][:, j]
        for j in range(x.shape[1])
    )
    drift = (x - den(x, s)) / sigma
    along = d_sigma + (grad.detach() * drift).sum(1)
    return -sigma * along, -(sigma**2) * lap.detach()


@pytest.mark.parametrize("sigma", [0.05, 0.4, 2.0])
def test_guided_flow_adds_rate_nats_per_unit_log_sigma(sigma):
    g = torch.Generator().manual_seed(1)
    x = MIX.sample(32, g) + sigma * torch.randn(32, 2, generator=g, dtype=torch.float64)
    own, own_from_lap = _rates(MIX, x, sigma)
    # The unguided flow's rate is -sigma^2 Lap log p (the continuity equation; checks the harness).
    torch.testing.assert_close(own, own_from_lap, rtol=1e-5, atol=1e-6)
    for rate in (-3.0, 0.5, 2.0):
        guided, _ = _rates(density_guidance(MIX, rate, max_ratio=math.inf), x, sigma)
        torch.testing.assert_close(guided, own + rate, rtol=1e-5, atol=1e-5)


def test_rate_zero_is_the_denoiser_and_the_sign_moves_the_exact_log_density():
    # 16-D: the guided flow's extra rate shows in the final exact log-density. (In 2-D, on ring6, a
    # positive rate pulls paths to the ring's centre at large sigma, where p_sigma is one broad bump,
    # and the final density falls: the flow's own rate along the changed path is not the same.)
    mix = class_target("gmm16").uncond
    g = torch.Generator().manual_seed(2)
    x = 80.0 * torch.randn(128, 16, generator=g, dtype=torch.float64)
    sig = karras(30, 0.002, 80.0, dtype=torch.float64)
    run = REGISTRY["heun"]
    plain = run(mix, x, sig)
    torch.testing.assert_close(run(density_guidance(mix, 0.0), x, sig), plain)
    lp = {r: float(mix.log_prob(run(density_guidance(mix, r), x, sig), 0.002).mean())
          for r in (-0.1, 0.1)}  # fmt: skip
    lp0 = float(mix.log_prob(plain, 0.002).mean())
    # 0.1 nats per unit over log(80 / 0.002) = 10.6 units: measured about -0.75 / +0.74 nats.
    assert lp[-0.1] < lp0 - 0.4 and lp[0.1] > lp0 + 0.4


def test_density_guidance_errors_and_shape():
    with pytest.raises(ValueError, match="rate must be a finite number"):
        density_guidance(MIX, math.nan)
    with pytest.raises(ValueError, match="max_ratio must be a number > 0"):
        density_guidance(MIX, 1.0, max_ratio=0)
    with pytest.raises(TypeError, match="denoiser must be a denoiser"):
        density_guidance(3.0, 1.0)
    x = torch.randn(5, 2, dtype=torch.float32)
    out = density_guidance(lambda x, s: 0.5 * x, 1.0)(x, torch.full((5,), 0.3))
    assert out.shape == x.shape and out.dtype == x.dtype
