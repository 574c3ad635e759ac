"""``scorekit bench guidance`` charges each rule what it actually ran: the network evaluations per
sample it reports equal the rule's cost formula times the sampler's calls, computed here."""

from __future__ import annotations

import pytest
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


@pytest.mark.slow
def test_digits_demo_section_writes_a_grid_per_rule(tmp_path):
    import json

    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from scorekit.bench.guidance_digits import demo_section
    from scorekit.cli import main
    from scorekit.data import load, split

    net = json.dumps({"base_channels": 8, "num_res_blocks": 1, "attn_resolutions": []})
    run = tmp_path / "run"
    assert main(["train", "--data", "digits", "--cond", "--holdout", "0.2", "--out", str(run),
                 "--steps", "4", "--ckpt-every", "2", "--batch", "32", "--net", net, "--no-progress",
                 "--threads", "1"]) == 0  # fmt: skip
    figures, md, pngs = demo_section(run, tmp_path / "out", quick=True)
    rules = ["cond", "cfg", "apg", "tcfg", "cfg_interval", "adaptive", "autoguidance"]
    assert list(figures) == rules and len(pngs) == len(rules)
    for p in pngs:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| cfg | 2 |" in md and "guidance_apg.png" in md
    # Network evaluations at a budget of 20: 20 calls of one model, 10 calls of two.
    assert figures["cond"]["nfe_per_sample"] == 20 and figures["cfg"]["nfe_per_sample"] == 20
    assert figures["cfg_interval"]["nfe_per_sample"] < 20
    # The accuracy judge is logistic regression fitted on the run's training split: refitted here.
    ds = load("digits")
    train, test = split(ds, holdout=0.2, seed=0)
    pix = lambda d: d.normalization.decode(d.x).reshape(len(d.x), -1).double().numpy()  # noqa: E731
    with threadpool_limits(limits=1):
        ref = LogisticRegression(max_iter=3000).fit(pix(train) / 16, train.labels)
        assert f"{ref.score(pix(test) / 16, test.labels):.3f}" in md
