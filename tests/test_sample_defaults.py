"""``scorekit.sample``'s default noise levels: where the first and the last call land.

The first sigma is ``min(80, 20 sigma_data)`` when the denoiser declares its data's scale, 80
otherwise; the schedule is laid on ``n + 1`` steps down to 0.002 and that last point is dropped, so
the last call lands one grid step above 0.002. The expected levels are computed here from the karras
formula itself (Karras et al. 2022, eq. 5), not from scorekit's schedule code.
"""

from __future__ import annotations

import pytest
import torch

from scorekit.denoiser import EDMPrecond, EpsPred, NetDenoiser, data_scale
from scorekit.process import DiscreteProcess
from scorekit.samplers import default_sigma_max, sample


def _karras(n: int, lo: float, hi: float, rho: float = 7.0) -> list[float]:
    """``n + 1`` karras levels from ``hi`` to ``lo`` (eq. 5), then 0."""
    a, b = hi ** (1 / rho), lo ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


class _Recorder:
    """A denoiser that records the sigmas it is called at and returns zeros (data at the origin)."""

    def __init__(self, sigma_data=None):
        self.seen: list[float] = []
        if sigma_data is not None:
            self.sigma_data = sigma_data

    def __call__(self, x, sigma):
        self.seen.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return torch.zeros_like(x)


@pytest.mark.parametrize(
    ("sigma_data", "first"), [(None, 80.0), (0.5, 10.0), (1.0, 20.0), (7.0, 80.0)]
)
def test_first_sigma_follows_the_declared_data_scale(sigma_data, first):
    den = _Recorder(sigma_data)
    assert default_sigma_max(den) == first
    sample(den, (3, 2), nfe=5, sampler="euler")
    assert den.seen[0] == pytest.approx(first, rel=1e-6)


@pytest.mark.parametrize("nfe", [5, 10, 20])
def test_last_call_lands_one_grid_step_above_0_002(nfe):
    den = _Recorder(0.5)
    sample(den, (3, 2), nfe=nfe, sampler="euler", dtype=torch.float64)
    want = _karras(nfe + 1, 0.002, 10.0)[:nfe]  # the n + 1 nonzero levels without the last
    assert den.seen == pytest.approx(want, rel=1e-9)
    assert len(den.seen) == nfe


def test_explicit_sigma_min_is_the_last_call():
    den = _Recorder(0.5)
    sample(den, (3, 2), nfe=5, sampler="euler", sigma_min=0.002, dtype=torch.float64)
    assert den.seen == pytest.approx(_karras(5, 0.002, 10.0)[:5], rel=1e-9)


def test_data_scale_of_wrapped_networks():
    net = lambda x, c: x  # noqa: E731
    assert data_scale(NetDenoiser(net, EDMPrecond(0.25))) == 0.25
    assert data_scale(NetDenoiser(net, EpsPred(DiscreteProcess.linear()))) is None
    assert data_scale(NetDenoiser(net, EpsPred(DiscreteProcess.linear()), sigma_data=0.8)) == 0.8
    assert data_scale(lambda x, s: x) is None
