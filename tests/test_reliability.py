"""Reliability promises of issue 11 that live outside training: each test failed before its fix.

(Training, checkpoints and the command line have their own modules: test_faults.py, test_cli_*.)
"""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch

import scorekit.likelihood.ode as lode
from scorekit._util import atomic_write
from scorekit.analytic import GaussianMixture, target
from scorekit.likelihood import ODESolveError, log_likelihood
from scorekit.samplers import REGISTRY
from scorekit.schedules import karras

# -- log_likelihood ------------------------------------------------------------------------------


def test_likelihood_refuses_a_denoiser_output_of_the_wrong_shape():
    gm = target("ring8")
    x = gm.sample(3, generator=torch.Generator().manual_seed(0))

    def broadcasting(z, sigma):  # [B, 1]: would broadcast against [B, 2] and return numbers
        return gm(z, sigma)[:, :1]

    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        log_likelihood(broadcasting, x, sigma_min=1e-2, sigma_max=80.0)


def test_likelihood_float32_never_calls_the_denoiser_outside_its_range():
    gm = target("ring8", dtype=torch.float32)
    x = gm.sample(16, generator=torch.Generator().manual_seed(1)).float()
    seen = []

    def recording(z, sigma):
        seen.append(sigma.detach())
        return gm(z, sigma)

    smin, smax = 1e-2, 80.0
    logp = log_likelihood(recording, x, sigma_min=smin, sigma_max=smax, rtol=1e-4, atol=1e-4)
    sig = torch.cat(seen)
    assert torch.isfinite(sig).all()
    assert float(sig.min()) >= smin * (1 - 1e-5) and float(sig.max()) <= smax * (1 + 1e-5)
    exact = gm.log_prob(x.double(), smin)
    torch.testing.assert_close(logp.double(), exact, rtol=0, atol=0.05)


def test_likelihood_names_a_failing_row_with_one_extra_solve(monkeypatch):
    gm = target("ring8")
    x = gm.sample(8, generator=torch.Generator().manual_seed(2))
    bad_row = 5

    def rough(z, sigma):  # row 5 oscillates wildly in sigma: the step control cannot follow it
        out = gm(z, sigma)
        wiggle = 50.0 * torch.sin(1e4 * sigma)[:, None] * torch.ones_like(out)
        mask = torch.zeros_like(out)
        mask[bad_row] = 1.0 if z.shape[0] == 8 else 0.0
        return out + mask * wiggle

    solves = []
    real = lode._solve
    monkeypatch.setattr(lode, "_solve", lambda *a, **k: solves.append(1) or real(*a, **k))
    with pytest.raises(ODESolveError) as err:
        log_likelihood(rough, x, sigma_min=1e-2, sigma_max=80.0, max_steps=300)
    assert list(err.value.failures) == [bad_row]
    assert len(solves) <= 2


# -- exact targets and samplers -------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[math.nan, 0.5], [math.inf, 0.0], [-0.5, 1.5]])
def test_gaussian_mixture_refuses_non_finite_or_negative_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor(weights))


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun", "euler_ancestral", "adaptive_ode"])
def test_a_denoiser_of_another_dtype_is_a_clear_error(name):
    gm = target("ring8")  # float64

    def wrong_dtype(z, sigma):
        return gm(z, sigma).double()

    x = torch.ones(2, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"dtype torch\.float32.*got torch\.float64"):
        REGISTRY[name](wrong_dtype, x, karras(4, 0.1, 5.0))


# -- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "out.bin", b"x")
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")  # what open() gives under this umask
    finally:
        os.umask(old)
    got = stat.S_IMODE((tmp_path / "out.bin").stat().st_mode)
    assert got == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


# -- data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (["0", "1e9", "1"], r"row 3, column 'label': class id 1e\+09 is too large"),
        ([f"c{i}" for i in range(1001)], "1001 distinct classes; allowed: at most 1000"),
    ],
)
def test_csv_labels_are_bounded(tmp_path, labels, match):
    from scorekit import data

    rows = "".join(f"{i * 0.1},{lab}\n" for i, lab in enumerate(labels))
    path = tmp_path / "d.csv"
    path.write_text("x,label\n" + rows)
    with pytest.raises(ValueError, match=match):
        data.load(path)
