"""The default posterior sampler (TDS, ``particles=None``) spends an NFE budget: counted, not declared.

``posterior_samples`` picks TDS's particles from the budget (``budget_options``). The denoiser below
records the rows of every call, so the steps (calls), the particles (rows per call and sample) and the
cost per sample are read off the run itself, not from the library's NFE formulas.
"""

from __future__ import annotations

import pytest
import torch

from scorekit.analytic import target
from scorekit.inverse import (
    Matrix,
    budget_options,
    nfe,
    posterior_samples,
    steps_for_budget,
    tds,
)
from scorekit.schedules import karras

F64 = torch.float64
RING = target("ring8")
OBSERVE_X = torch.tensor([[1.0, 0.0]], dtype=F64)
KW = {"sigma_y": 0.1, "solver": "tds", "sigma_min": 2e-3, "sigma_max": 80.0, "seed": 1}


class Rows:
    """Records the number of rows of each denoiser call."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, x, sigma):
        self.calls.append(x.shape[0])
        return RING(x, sigma)


def _run(budget: int, samples: int = 1, **options) -> tuple[int, int]:
    """(steps, particles) of one default TDS run at ``budget`` NFE per sample, counted."""
    den = Rows()
    y = torch.tensor([[0.4]], dtype=F64)
    posterior_samples(den, y, Matrix(OBSERVE_X), n=samples, nfe=budget, **KW, **options)
    rows = set(den.calls)
    assert len(rows) == 1 and rows.pop() % samples == 0  # every call: particles x samples rows
    return len(den.calls), den.calls[0] // samples


def test_default_spends_most_of_every_budget_from_20_to_100():
    """Cost per sample ``N K`` (counted) within ``[0.8 budget, budget]`` for every budget 20..100, and
    more particles only with enough steps (the measured rule: 4 from 12 steps, 6 from 16). The twist
    and the variance step do not enter the choice (``particles`` stays None); the ones without backward
    passes keep the 81 runs cheap (the defaults run below)."""
    for budget in range(20, 101):
        steps, k = _run(budget, twist="pigdm", variance="ddpm")
        assert 0.8 * budget <= steps * k <= budget, (budget, steps, k)
        assert k in (2, 4, 6) and (k < 4 or steps >= 12) and (k < 6 or steps >= 16), (budget, k)
        # the declared cost of that run agrees with the count
        o = budget_options(tds, budget, {})
        assert o["particles"] == k
        assert nfe("tds", karras(steps, 2e-3, 80.0), **o) == steps * k
        assert steps_for_budget(tds, budget, 2e-3, 80.0, {}) == steps


@pytest.mark.parametrize("budget, steps, particles", [(20, 10, 2), (50, 12, 4), (100, 16, 6)])
def test_the_documented_budgets_run_the_measured_choices(budget, steps, particles):
    """docs/inverse-problems.md's held-out figures were measured at 2 x 10 (20 NFE), 4 x 12 (50) and
    6 x 16 (100); two samples per measurement, so each call holds ``2 K`` rows."""
    assert _run(budget, samples=2) == (steps, particles)


def test_given_particles_are_kept_and_fill_the_budget():
    assert _run(50, particles=3) == (16, 3)  # 3 x 16 = 48 <= 50 < 3 x 17
    assert budget_options(tds, 50, {"particles": 5}) == {"particles": 5}
    assert budget_options(tds, 50, {"particles": None})["particles"] == 4


def test_a_budget_below_one_step_is_one_line():
    y = torch.tensor([[0.4]], dtype=F64)
    for bad in (1, 0):
        with pytest.raises(ValueError, match=f"nfe={bad} is too small for tds"):
            posterior_samples(RING, y, Matrix(OBSERVE_X), n=1, nfe=bad, **KW)


@pytest.mark.parametrize("budget, steps, particles", [(30, 15, 2), (47, 23, 2), (95, 23, 4)])
def test_budgets_just_short_of_a_jump_are_spent_with_the_defaults(budget, steps, particles):
    """The reviewer's cases: with particles chosen from the steps these ran 2 x 11 = 22 (30, 47) and
    4 x 15 = 60 (95) network evaluations; full default options here."""
    assert _run(budget) == (steps, particles)
