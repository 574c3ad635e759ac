"""``scorekit bench guidance`` charges each rule what it actually ran: the network evaluations per
sample it reports equal the rule's cost formula times the sampler's calls, computed here."""

from __future__ import annotations

import torch

from scorekit.bench.guidance import _measure
from scorekit.guidance import class_target
from scorekit.schedules import karras


def test_bench_guidance_reports_the_cost_formulas():
    t, n, steps = class_target("ring6"), 64, 6
    exact = t.tilted_sample(0, 2.0, n, torch.Generator().manual_seed(0))
    want = {
        "cfg": 2 * steps,  # dpmpp_2m makes N calls, each guided call costs 2
        "apg": 2 * steps,
        "tcfg": 2 * steps,
        "classifier": 2 * steps,  # 1 denoiser + 1 classifier evaluation per call
        "cfg_ddpm": 2 * steps,
        "fk_smc": 2 * steps,
        "fk_smc_64": 2 * steps,
        "cfg_pc_1": (steps - 1) * 3 + 2,
        "cfg_pc_4": (steps - 1) * 9 + 2,
    }
    for rule, nfe in want.items():
        row = _measure(t, rule, 2.0, n, steps, 0, exact)
        assert row["nfe_per_sample"] == nfe, (rule, row)
        assert row["sw2"] > 0
    # rules that skip work are charged less than CFG, never more
    for rule in ("cfg_interval", "adaptive"):
        row = _measure(t, rule, 2.0, n, steps, 0, exact)
        assert steps <= row["nfe_per_sample"] <= 2 * steps, (rule, row)
    # a guidance interval charges exactly the rows inside it: 1 + 1 for the steps with
    # 0.3 < sigma <= 5, 1 for the others
    sig = karras(steps, 0.002, 80.0, dtype=torch.float64)[:-1]
    inside = int(((sig > 0.3) & (sig <= 5.0)).sum())
    assert _measure(t, "cfg_interval", 2.0, n, steps, 0, exact)["nfe_per_sample"] == steps + inside
