"""Fitted schedules (``samplers.optimized``): never worse than their start on calibration noise,
better than karras on fresh noise, cached, and by registry name equal to an independent Euler."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from scorekit.analytic import target
from scorekit.pfode import pf_ode_reference
from scorekit.samplers import optimized
from scorekit.schedules import karras, loglinear


def _euler(denoiser, x, sigmas, *, generator=None, callback=None):
    """Euler on dx/dsigma = (x - D)/sigma, written here independently of scorekit.samplers."""
    for s, s_next in itertools.pairwise(sigmas):
        x = x + (s_next - s) * (x - denoiser(x, s.expand(x.shape[0]))) / s
    return x


def _rms(x, ref):
    return float(((x - ref).square().sum(1) / x.shape[1]).mean().sqrt())


@pytest.mark.slow
def test_optimized_beats_karras_on_fresh_noise_and_caches(tmp_path):
    gm = target("ring8")
    calls = {"n": 0}

    def counting(x, sigma):
        calls["n"] += 1
        return gm(x, sigma)

    cache = tmp_path / "sched.json"
    opt = optimized(
        counting, _euler, 8, sigma_min=0.02, sigma_max=80.0, shape=(128, 2), iterations=30,
        cache=cache, cache_key="ring8",
    )  # fmt: skip
    assert opt.shape == (9,) and opt.dtype == torch.float64 and opt[-1] == 0
    assert (opt[1:] < opt[:-1]).all()
    assert math.isclose(float(opt[0]), 80.0, rel_tol=1e-12)
    assert math.isclose(float(opt[-2]), 0.02, rel_tol=1e-12)

    # Held-out noise: the optimised schedule must beat karras (rho = 7) with the same sampler.
    x = 80.0 * torch.randn(
        400, 2, generator=torch.Generator().manual_seed(123), dtype=torch.float64
    )
    ref = pf_ode_reference(gm, x, 80.0, 0.0, rtol=1e-10, atol=1e-10)
    err_opt = _rms(_euler(gm, x, opt), ref)
    err_karras = _rms(_euler(gm, x, karras(8, 0.02, 80.0)), ref)
    assert err_opt < 0.7 * err_karras, (err_opt, err_karras)

    # Cached: the same call returns the stored sigmas without one denoiser call.
    stored = json.loads(cache.read_text())
    assert len(stored) == 1
    before = calls["n"]
    again = optimized(
        counting, _euler, 8, sigma_min=0.02, sigma_max=80.0, shape=(128, 2), iterations=30,
        cache=cache, cache_key="ring8",
    )  # fmt: skip
    assert calls["n"] == before
    torch.testing.assert_close(again, opt, rtol=0, atol=0)


def test_optimized_free_sigma_min_and_errors():
    gm = target("ring8")
    s = optimized(
        gm, _euler, 4, sigma_min=1e-3, sigma_max=80.0, shape=(64, 2), free_sigma_min=True,
        iterations=15,
    )  # fmt: skip
    assert s.shape == (5,) and (s[1:] < s[:-1]).all() and float(s[-2]) >= 1e-3 * (1 - 1e-12)
    with pytest.raises(TypeError, match="sampler"):
        optimized(gm, 3, 4, sigma_min=0.01, sigma_max=80.0, shape=(8, 2))
    with pytest.raises(ValueError, match="shape"):
        optimized(gm, _euler, 4, sigma_min=0.01, sigma_max=80.0, shape=(8,))
    with pytest.raises(ValueError, match="sigma_min"):
        optimized(gm, _euler, 4, sigma_min=90.0, sigma_max=80.0, shape=(8, 2))


def test_optimized_by_registry_name():
    with pytest.raises(ValueError, match="euler"):  # the message lists the valid names
        optimized(
            target("ring8"), "no_such_sampler", 4, sigma_min=0.01, sigma_max=80.0, shape=(8, 2)
        )
    gm = target("ring8")
    by_name = optimized(
        gm, "euler", 5, sigma_min=0.02, sigma_max=80.0, shape=(64, 2), iterations=10
    )
    by_fn = optimized(gm, _euler, 5, sigma_min=0.02, sigma_max=80.0, shape=(64, 2), iterations=10)
    torch.testing.assert_close(by_name, by_fn, rtol=1e-6, atol=1e-9)


def test_optimized_never_worse_than_a_given_start():
    gm = target("ring8")
    start = loglinear(6, 0.05, 80.0)
    shape, seed = (64, 2), 3
    got = optimized(
        gm, _euler, 6, sigma_min=0.01, sigma_max=80.0, shape=shape, seed=seed, starts=[start],
        free_sigma_min=True, iterations=3,
    )  # fmt: skip
    # The calibration problem, rebuilt here: J(sigmas) on the same noise.
    x = 80.0 * torch.randn(
        shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    ref = pf_ode_reference(gm, x, 80.0, 0.0, rtol=1e-9, atol=1e-9)
    assert _rms(_euler(gm, x, got), ref) <= _rms(_euler(gm, x, start), ref) * (1 + 1e-9)
    assert float(got[-2]) >= 0.01 * (1 - 1e-12)
    with pytest.raises(ValueError, match="starts"):
        optimized(gm, _euler, 6, sigma_min=0.01, sigma_max=80.0, shape=shape, starts=[start[:-1]])
