"""OOD detection on exact targets: features against the analytic score, AUROC against a pair count."""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.analytic import target
from scorekit.likelihood import OODDetector, auroc, log_likelihood, score_norm_features


def test_features_are_log_scaled_score_norms():
    gm = target("ring8")
    x = gm.sample(20, torch.Generator().manual_seed(0))
    sigmas = [0.05, 0.3, 2.0]
    f = score_norm_features(gm, x, sigmas)
    # independent route: the analytic score (log-density gradient), not the denoiser
    want = torch.stack([torch.log(s * gm.score(x, s).norm(dim=1)) for s in sigmas], 1)
    torch.testing.assert_close(f, want, rtol=1e-9, atol=1e-9)


def test_auroc_equals_pair_count():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g)
    b = torch.randn(40, generator=g) + 0.7
    b[:5] = a[:5]  # ties count one half
    pairs = (b[None] > a[:, None]).double() + 0.5 * (b[None] == a[:, None]).double()
    assert auroc(a, b) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert auroc(torch.zeros(3), torch.ones(3)) == 1.0
    with pytest.raises(ValueError, match="finite"):
        auroc(torch.tensor([float("nan")]), torch.ones(2))


@pytest.mark.slow
def test_detector_separates_off_manifold_points_on_exact_target():
    # in-distribution: ring8; OOD: points between the modes (same radius, rotated half a mode) and
    # broad noise of the same overall scale. The exact denoiser gives near-perfect separation.
    gm = target("ring8")
    g = torch.Generator().manual_seed(1)
    x_fit, x_in = gm.sample(400, g), gm.sample(200, g)
    ang = (torch.arange(200, dtype=torch.float64) + 0.5) * (2 * math.pi / 8)
    between = math.sqrt(1.98) * torch.stack([ang.cos(), ang.sin()], 1)
    between = between + 0.1 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(200, 2, generator=g, dtype=torch.float64)
    det = OODDetector(gm, sigmas=torch.logspace(-1.5, 0.5, 6), n_components=3).fit(x_fit)
    s_in = det.score(x_in)
    assert s_in.shape == (200,) and s_in.dtype == torch.float64
    assert auroc(s_in, det.score(between)) > 0.95
    assert auroc(s_in, det.score(noise)) > 0.9
    # the likelihood score agrees on this target (exact log-density at sigma_min, checked elsewhere)
    nll = lambda x: -log_likelihood(gm, x[:40], sigma_min=0.01, sigma_max=50.0)  # noqa: E731
    assert auroc(nll(x_in), nll(between)) > 0.95


def test_detector_errors():
    gm = target("ring8")
    with pytest.raises(ValueError, match="sigmas"):
        OODDetector(gm, sigmas=[0.1, -1.0])
    with pytest.raises(ValueError, match="n_components"):
        OODDetector(gm, n_components=0)
    det = OODDetector(gm, sigmas=[0.1, 1.0])
    with pytest.raises(RuntimeError, match="fit"):
        det.score(gm.sample(3))
    with pytest.raises(ValueError, match="at least"):
        det.fit(gm.sample(3))
    bad = gm.sample(10)
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        det.fit(bad)
