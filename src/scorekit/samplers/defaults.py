"""``sampler="auto"``: the sampler, schedule and last sigma chosen per NFE by the random-mixture suite.

``scorekit bench samplers --suite random`` chooses, for each NFE, the candidate (sampler, schedule,
last nonzero sigma) with the lowest ``max(median / 0.5, worst / 0.8)`` of its error ratio to
diffusers' best configuration on the suite's **tuning** problems; ``AUTO`` holds those choices, and
``docs/choosing-a-sampler.md`` their **held-out** ratios. The suite starts at sigma_max = 157.4 (the
DDPM linear table) on unit-scale data; the last sigmas are in data units.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from scorekit.process import DiscreteProcess
from scorekit.schedules import get_schedule, uniform_t

__all__ = ["AUTO", "auto_config"]

#: NFE -> (registry name, options, schedule name, last nonzero sigma), from the tuning part of
#: ``scorekit bench samplers --suite random`` (seed 0, 20 problems, 64 rows each). They were tuned
#: before ``long_step`` (``samplers.common.LONG_STEP``) existed, so the picks that have it keep the
#: published update on every step (``long_step=None``), as tuned.
AUTO: dict[int, tuple[str, dict, str, float]] = {
    3: ("dpmpp_3m", {"long_step": None}, "loglinear", 0.01),
    4: ("dpmpp_3m", {"long_step": None}, "uniform_t", 0.25),
    5: ("deis", {"order": 3}, "uniform_t", 0.25),
    6: ("deis", {"order": 3}, "uniform_t", 0.25),
    8: ("unipc", {"order": 2}, "loglinear", 0.1),
    10: ("dpmpp_2m", {}, "loglinear", 0.1),
    15: ("unipc", {"order": 3}, "loglinear", 0.05),
    20: ("unipc", {"order": 3}, "loglinear", 0.05),
}


def _uniform_t_ddpm(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``uniform_t`` on DDPM's linear table (what the suite used), its range clipped to the table's."""
    table = DiscreteProcess.linear()
    lo, hi = max(sigma_min, table.sigma_min), min(sigma_max, table.sigma_max)
    return uniform_t(n, lo, hi, process=table)


def auto_config(nfe: int) -> tuple[str, dict, Callable, float]:
    """``(sampler, options, schedule function, sigma_min)`` of ``AUTO`` at the largest listed NFE
    not above ``nfe`` (the smallest listed one below 3)."""
    key = max([k for k in AUTO if k <= nfe], default=min(AUTO))
    name, opts, sched, lo = AUTO[key]
    fn = _uniform_t_ddpm if sched == "uniform_t" else get_schedule(sched)
    return name, dict(opts), fn, lo
