"""``sample(sampler="auto")``: the tables of ``samplers.defaults``, the spectral band and the teleport
start, checked against numpy eigenvalues and the closed-form probability-flow ODE of a Gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scorekit.analytic import GaussianMixture, gaussian, target
from scorekit.process import DiscreteProcess
from scorekit.samplers import REGISTRY, GaussianFlow, sample
from scorekit.samplers.defaults import AUTO, AUTO_TELEPORT, Choice, auto_choice
from scorekit.schedules import SCHEDULES, karras, spectral_band

S = 157.4  # the suite's sigma_max


def _gaussian(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return mean, cov


def _closed_form(mean, cov, x, s_from, s_to):
    """The PF-ODE of N(mean, cov) from s_from to s_to, in numpy: each eigen-coordinate of x - mean is
    scaled by sqrt((lam + s_to^2) / (lam + s_from^2))."""
    lam, u = np.linalg.eigh(cov.numpy())
    y = (x.numpy() - mean.numpy()) @ u
    return mean.numpy() + (y * np.sqrt((lam + s_to**2) / (lam + s_from**2))) @ u.T


def test_spectral_band_from_numpy_eigenvalues():
    _, cov = _gaussian(4)
    lam = np.linalg.eigvalsh(cov.numpy())
    top, last = spectral_band(cov, top=3.0, last=0.2)  # a covariance: its eigenvalues are taken
    assert top == pytest.approx(3.0 * math.sqrt(lam.max()), rel=1e-12)
    assert last == pytest.approx(0.2 * math.sqrt(lam.mean()), rel=1e-12)
    # the same from the eigenvalues, and equivariant: data scaled by a scales the band by a
    assert spectral_band(torch.tensor(lam), top=3.0, last=0.2) == pytest.approx((top, last))
    t2, l2 = spectral_band(cov * 25.0, top=3.0, last=0.2)
    assert (t2, l2) == pytest.approx((5 * top, 5 * last), rel=1e-12)
    for bad, match in (
        (dict(evals=torch.zeros(3), top=1.0, last=0.1), "positive largest"),
        (dict(evals=cov, top=0.0, last=0.1), "positive and finite"),
        (dict(evals=torch.ones(2, 3), top=1.0, last=0.1), "shape"),
        (dict(evals=torch.ones(3), top=0.1, last=0.5), "must lie below"),
    ):
        with pytest.raises(ValueError, match=match):
            spectral_band(**bad)


def test_teleport_start_is_the_exact_gaussian_transport():
    """With a Gaussian target the first denoiser call sees the start moved by the closed-form flow
    from sigma_max to the band's top (no call spent above it), and the sample converges to the exact
    ODE solution from the same noise."""
    mean, cov = _gaussian(3)
    target = gaussian(mean, cov)
    flow = GaussianFlow(mean, cov)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    seen = []

    def recording(x, sigma):
        seen.append((x.clone(), float(sigma[0])))
        return target(x, sigma)

    nfe = 6
    choice = auto_choice(nfe, teleport=True)
    top = choice.top * math.sqrt(np.linalg.eigvalsh(cov.numpy()).max())
    sample(recording, (5, 3), nfe=nfe, sampler="auto", gaussian=flow, noise=z, sigma_max=S,
                 dtype=torch.float64)  # fmt: skip
    assert len(seen) == nfe
    x_first, s_first = seen[0]
    assert s_first == pytest.approx(top, rel=1e-12)
    np.testing.assert_allclose(x_first.numpy(), _closed_form(mean, cov, S * z, S, top), atol=1e-10)
    # the whole run against the exact solution at sigma = 0 (the sampler's own error only)
    exact = _closed_form(mean, cov, S * z, S, 0.0)
    errs = []
    for k in (4, 10, 20):
        x = sample(target, (5, 3), nfe=k, sampler="auto", gaussian=flow, noise=z, sigma_max=S,
                   dtype=torch.float64)  # fmt: skip
        errs.append(float(np.sqrt(((x.numpy() - exact) ** 2).mean())))
    assert errs[2] < errs[0] and errs[2] < 0.02 * math.sqrt(float(cov.diagonal().mean()))


def test_auto_without_statistics_is_the_table_choice():
    gm = GaussianMixture(
        torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64),
        torch.tensor([[0.2, 0.3], [0.1, 0.2]], dtype=torch.float64),
    )
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # nfe 12 uses the entry of 10 (the largest listed NFE not above it); 4 may use uniform_t on DDPM
    for nfe, key in ((3, 3), (4, 4), (8, 8), (12, 10), (40, 20)):
        c = AUTO[key]
        extra = {"process": DiscreteProcess.linear()} if c.schedule == "uniform_t" else {}
        if c.start == "jump":  # one call at sigma_max, then the band (one call per step here)
            band = SCHEDULES[c.schedule](nfe - 1, c.last, c.top, **extra)
            sig = torch.cat([torch.tensor([80.0], dtype=torch.float64), band])
        else:
            sig = SCHEDULES[c.schedule](nfe, c.last, 80.0, **extra)
        want = REGISTRY[c.sampler](gm, 80.0 * z, sig, **c.options)
        got = sample(gm, (4, 2), nfe=nfe, noise=z, dtype=torch.float64, sampler="auto")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # an explicit schedule or sigma_min wins over the table
    c = AUTO[3]
    a = sample(gm, (4, 2), nfe=3, noise=z, dtype=torch.float64, sigma_min=0.5, sampler="auto",
               schedule="karras")  # fmt: skip
    torch.testing.assert_close(
        a, REGISTRY[c.sampler](gm, 80.0 * z, karras(3, 0.5, 80.0), **c.options), rtol=0, atol=1e-12
    )

    # the last sigma is in data scales: a denoiser declaring sigma_data = 2 ends twice as high
    class Scaled:
        sigma_data = 2.0

        def __call__(self, x, sigma):
            return gm(x, sigma)

    got = sample(Scaled(), (4, 2), nfe=3, noise=z, dtype=torch.float64, sampler="auto",
                 sigma_max=40.0)  # fmt: skip
    sig = SCHEDULES[c.schedule](3, 2.0 * c.last, 40.0)
    torch.testing.assert_close(got, REGISTRY[c.sampler](gm, 40.0 * z, sig, **c.options))


def test_auto_tables_and_errors():
    assert set(AUTO) == set(AUTO_TELEPORT) == {3, 4, 5, 6, 8, 10, 15, 20}
    for table in (AUTO, AUTO_TELEPORT):
        for c in table.values():
            assert isinstance(c, Choice) and c.sampler in REGISTRY and c.last > 0
            assert c.start in (("sigma_max", "jump") if table is AUTO else ("jump", "teleport"))
    assert auto_choice(2) == AUTO[3] and auto_choice(7, teleport=True) == AUTO_TELEPORT[6]
    mean, cov = _gaussian(2)
    target = gaussian(mean, cov)
    with pytest.raises(ValueError, match="auto"):
        sample(target, (2, 2), sigmas=karras(5, 0.1, 10.0), sampler="auto")
    with pytest.raises(ValueError, match="gaussian= is the teleport start of sampler='auto'"):
        sample(target, (2, 2), nfe=5, gaussian=GaussianFlow(mean, cov))
    with pytest.raises(TypeError, match=r"gaussian must be a samplers\.GaussianFlow"):
        sample(target, (2, 2), nfe=5, sampler="auto", gaussian=(mean, cov))


def test_jump_start_spends_one_call_at_sigma_max_then_the_band():
    from unittest.mock import patch

    mean, cov = _gaussian(2)
    target = gaussian(mean, cov)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    jump = Choice("unipc", {"order": 2}, "loglinear", 0.1, 4.0, "jump")
    seen = []

    def recording(x, sigma):
        seen.append(float(sigma[0]))
        return target(x, sigma)

    recording.sigma_data = 0.5  # the band is in data scales: top 2, last 0.05
    with patch.dict(AUTO, {6: jump}):
        got = sample(recording, (4, 2), nfe=6, sampler="auto", noise=z, sigma_max=S,
                     dtype=torch.float64)  # fmt: skip
    band = np.exp(np.linspace(np.log(2.0), np.log(0.05), 5))
    np.testing.assert_allclose(seen, [S, *band], rtol=1e-12)
    sig = torch.tensor([S, *band, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, REGISTRY["unipc"](target, S * z, sig, order=2))
    with pytest.raises(ValueError, match="start must be"):
        Choice("unipc", {}, "loglinear", 0.1, 4.0, "leap")
    with pytest.raises(ValueError, match="top is given exactly"):
        Choice("unipc", {}, "loglinear", 0.1, None, "jump")


def test_a_sigma_min_above_the_band_is_one_line_naming_the_band():
    den = target("ring8").denoise
    with pytest.raises(ValueError, match=r"sigma_min=10 must lie below the band's top 8 \(jump"):
        sample(den, (4, 2), nfe=6, sampler="auto", sigma_min=10.0)
