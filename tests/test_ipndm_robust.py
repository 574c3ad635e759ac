"""ipndm on an imperfect denoiser: bounded where Euler is, and the published variant kept as an option.

Problem: the exact denoiser of a 2-D Gaussian mixture plus a smooth, fixed error of the size a trained
eps-prediction network makes: ``eps_hat = eps + level * g(alpha x, log sigma)``, i.e.
``D_hat = D - sigma * level * g`` with ``g`` a random-feature field (unit RMS, smooth in ``x`` and
``log sigma``). The reference is the exact probability-flow ODE of the *perturbed* field (scipy's
DOP853, tight), so the error measured is the sampler's own, not the network's. DDPM's sigma range
(157.4 down), karras schedules, as a user would sample a DDPM checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import solve_ivp

from scorekit.analytic import GaussianMixture
from scorekit.samplers import REGISTRY
from scorekit.schedules import karras

SIGMA_MAX, ROWS = 157.4, 64


def _mixture() -> GaussianMixture:
    ang = torch.arange(6, dtype=torch.float64) * (2 * math.pi / 6)
    means = 1.2 * torch.stack([ang.cos(), ang.sin()], 1)
    return GaussianMixture(means, torch.full((6, 2), 0.05, dtype=torch.float64))


def _perturbed(gm: GaussianMixture, level: float):
    g = torch.Generator().manual_seed(3)
    k = 32
    w = torch.randn(k, 2, generator=g, dtype=torch.float64)
    om = torch.randn(k, generator=g, dtype=torch.float64)
    b = 2 * math.pi * torch.rand(k, generator=g, dtype=torch.float64)
    a = torch.randn(k, 2, generator=g, dtype=torch.float64) * math.sqrt(2 / k)

    def den(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        u = x / torch.sqrt(1 + sigma**2)[:, None]  # what an eps network sees: alpha x
        err = torch.cos(u @ w.T + sigma.log()[:, None] * om + b) @ a
        return gm.denoise(x, sigma) - sigma[:, None] * level * err

    return den


@pytest.fixture(scope="module")
def problem():
    gm = _mixture()
    den = _perturbed(gm, 0.1)
    x = SIGMA_MAX * torch.randn(
        ROWS, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )

    def rhs(u, y):  # u = log sigma: dx/du = x - D(x, e^u)
        xs = torch.from_numpy(y).reshape(ROWS, 2)
        return (xs - den(xs, math.exp(u))).reshape(-1).numpy()

    lo = math.log(1e-4)
    sol = solve_ivp(rhs, (math.log(SIGMA_MAX), lo), x.reshape(-1).numpy(), method="DOP853",
                    rtol=1e-9, atol=1e-9)  # fmt: skip
    end = torch.from_numpy(sol.y[:, -1]).reshape(ROWS, 2)
    ref = den(end, 1e-4)  # the last 1e-4 of sigma: one Tweedie step, error ~1e-8
    return den, x, ref


def _err(name, den, x, ref, n, **opts):
    sig = karras(n, 0.002, SIGMA_MAX).double()
    out = REGISTRY[name](den, x.clone(), sig, **opts)
    assert torch.isfinite(out).all()
    return float((out - ref).square().mean().sqrt())


@pytest.mark.parametrize("n", [5, 10])
def test_ipndm_stays_within_euler_on_an_imperfect_eps_denoiser(problem, n):
    den, x, ref = problem
    euler, ipndm = _err("euler", den, x, ref, n), _err("ipndm", den, x, ref, n)
    equal = _err("ipndm", den, x, ref, n, variant="equal")
    # The published equal-step coefficients amplify the error (their parasitic root exceeds the
    # flow's contraction 1/r on steps of ratio r > 1.35 at order 4); the default must not: within
    # 1.5x of Euler's error (measured 1.3x at n = 5, 0.7x at n = 10), clearly below "equal" (1.9x and
    # 4.5x Euler's).
    assert ipndm <= 1.5 * euler, (ipndm, euler, equal)
    assert equal > 1.3 * ipndm, (ipndm, euler, equal)


def test_ipndm_variants_coincide_on_equal_steps():
    # On a uniform grid the variable-step weights are the Adams-Bashforth ones: same path.
    gm = _mixture()
    sig = torch.cat([torch.linspace(3.0, 0.3, 12, dtype=torch.float64), torch.zeros(1)])
    x = 3.0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for order in (1, 2, 3, 4):
        a, b = [], []
        REGISTRY["ipndm"](gm.denoise, x, sig, order=order, callback=a.append)
        REGISTRY["ipndm"](gm.denoise, x, sig, order=order, variant="equal", callback=b.append)
        for sa, sb in zip(a, b, strict=True):
            torch.testing.assert_close(sa["x"], sb["x"], rtol=1e-12, atol=1e-12)


def test_ipndm_variable_weights_are_the_integral_of_the_interpolant():
    # dx/dsigma = f(sigma), f a cubic, posed through D(x, sigma) = x - sigma f(sigma). From the 4th step
    # on, variable-step AB4 integrates the cubic through its last four nodes exactly whatever the steps
    # (here geometric, ratio 2): each increment x_{i+1} - x_i is int_{sigma_i}^{sigma_{i+1}} f.
    def f(s):
        return (2.0 - s) ** 3 + 0.5 * s

    def integral(a, b):  # int_a^b f
        return ((2.0 - a) ** 4 - (2.0 - b) ** 4) / 4 + 0.25 * (b**2 - a**2)

    def den(x, sigma):
        return x - (sigma * f(sigma)).reshape(-1, 1)

    sig = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0], dtype=torch.float64)
    states: list[dict] = []
    out = REGISTRY["ipndm"](
        den, torch.zeros(1, 1, dtype=torch.float64), sig, callback=states.append
    )
    xs = [st["x"].item() for st in states] + [out.item()]
    for i in range(3, len(sig) - 1):
        a, b = float(sig[i]), float(sig[i + 1])
        assert xs[i + 1] - xs[i] == pytest.approx(integral(a, b), abs=1e-12), i
    # and the equal-step variant does not (its weights assume equal steps)
    eq: list[dict] = []
    REGISTRY["ipndm"](
        den, torch.zeros(1, 1, dtype=torch.float64), sig, variant="equal", callback=eq.append
    )
    assert abs(eq[5]["x"].item() - eq[4]["x"].item() - integral(0.5, 0.25)) > 1e-3


def test_ipndm_rejects_unknown_variant():
    gm = _mixture()
    sig = karras(4, 0.01, 10.0).double()
    with pytest.raises(ValueError, match="variant must be 'variable' or 'equal'; got 'fixed'"):
        REGISTRY["ipndm"](gm.denoise, torch.zeros(2, 2, dtype=torch.float64), sig, variant="fixed")
