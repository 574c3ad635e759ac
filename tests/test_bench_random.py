"""``scorekit bench samplers --suite random``: its problems, its tuning/held-out split and its table,
recomputed here from the written results (the held-out ratios from the per-problem errors, a
diffusers best and a scorekit error rerun from scratch)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from scorekit.bench.samplers import add_arguments, run
from scorekit.bench.samplers.random_suite import (
    BLOCK_B,
    BLOCK_C,
    _key,
    build,
    candidates,
    choice_of,
    data_flow,
    run_suite,
    select,
    specs,
)
from scorekit.pfode import pf_ode_reference
from scorekit.process import DiscreteProcess
from scorekit.samplers import AUTO, AUTO_TELEPORT, sample


def test_problems_are_seeded_split_and_unit_scale():
    a, b = specs(20, 0, False), specs(20, 0, False)
    assert a == b and specs(20, 1, False) != a  # fixed per seed
    assert [s.part for s in a[:4]] == ["tuning", "held-out", "tuning", "held-out"]
    assert {s.dim for s in a} <= {2, 4, 8, 16, 32, 64, 128, 256}
    assert all(2 <= s.components <= 64 and 0.5 <= s.separation <= 8 for s in a)
    assert {s.covariance for s in a} == {"iso", "full"}
    for s in a[:6]:
        gm = build(s)
        assert gm.dim == s.dim and gm.k == s.components
        torch.testing.assert_close(
            gm.mean, torch.zeros(s.dim, dtype=torch.float64), atol=1e-10, rtol=0
        )
        assert float(gm.covariance.diagonal().mean()) == pytest.approx(1.0, rel=1e-10)


def test_block_b_is_new_problems_of_the_same_family():
    a, ab = specs(20, 0, False), specs(20, 0, False, block_b=True)
    assert ab[:20] == a and ab == specs(20, 0, False, block_b=True)  # block a unchanged, seeded
    b = ab[20:]
    assert [s.part for s in b[:4]] == ["tuning-b", "held-out-b", "tuning-b", "held-out-b"]
    assert [s.index for s in b] == list(range(BLOCK_B, BLOCK_B + 20))
    # new seeds, also against a longer block a (every problem index below BLOCK_B)
    assert not {s.seed for s in b} & {s.seed for s in specs(200, 0, False)}
    assert {s.dim for s in b} <= {2, 4, 8, 16, 32, 64, 128, 256}
    assert all(2 <= s.components <= 64 and 0.5 <= s.separation <= 8 for s in b)
    gb, ga = build(b[1]), build(a[1])
    assert gb.dim != ga.dim or not torch.equal(gb.means, ga.means)
    with pytest.raises(ValueError, match=r"--problems: got 1001 with block b; allowed: at most"):
        specs(1001, 0, False, block_b=True)
    with pytest.raises(ValueError, match=r"--part: got 'b'; allowed: held-out, held-out-b"):
        run_suite(out=Path("unused"), quick=True, part="b")


def test_the_selection_never_picks_a_gaussian_candidate():
    """The selection never picks a candidate with the Gaussian beyond the teleport (``/gj``,
    ``gdpm3*``: turned down by the trained-network check), even when it scores best; the fitted
    row's start (``teleport=None``) also skips the extrapolated end (``/x2``): the fits wrap the
    plain sampler."""
    errs = {"unipc2/tele4/karras/0.2": 0.5, "unipc2/tele4/karras/0.2/gj": 0.1,
            "gdpm3/tele4/karras/0.2": 0.2, "unipc2/tele4/karras/0.2/x2": 0.3,
            "unipc2/loglinear/0.1": 0.9, "unipc2/loglinear/0.1/x2": 0.7}  # fmt: skip
    tuning = [{"scorekit": {k: {4: e} for k, e in errs.items()}, "diffusers": {4: ("x", 1.0)}}]
    assert select(tuning, [4], teleport=None)[4]["config"] == "unipc2/tele4/karras/0.2"
    assert select(tuning, [4], teleport=True)[4]["config"] == "unipc2/tele4/karras/0.2/x2"
    assert select(tuning, [4], teleport=False)[4]["config"] == "unipc2/loglinear/0.1/x2"


def test_block_c_is_held_out_only_with_new_seeds():
    abc = specs(20, 0, False, block_b=True, block_c=True)
    assert abc[:40] == specs(20, 0, False, block_b=True)  # blocks a and b unchanged
    c = abc[40:]
    assert [s.index for s in c] == list(range(BLOCK_C + 1, BLOCK_C + 20, 2))
    assert {s.part for s in c} == {"held-out-c"}  # no tuning problem: the tuning part stays a + b
    assert not {s.seed for s in c} & {s.seed for s in specs(BLOCK_B, 0, False, block_b=True)}
    assert all(2 <= s.components <= 64 and 0.5 <= s.separation <= 8 for s in c)


@pytest.mark.peer
@pytest.mark.slow
def test_quick_suite_table_is_recomputable_from_its_rows(tmp_path):
    pytest.importorskip("diffusers")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--suite", "random", "--quick", "--fit", "4", "--part", "held-out-b"]
    assert run(parser.parse_args([*args, "--out", str(tmp_path)])) == 0
    res = json.loads((tmp_path / "random" / "results.json").read_text())
    assert (tmp_path / "random" / "table.txt").read_text().startswith("held-out-b (fresh)")
    tuning, held, held_b = (res[k] for k in ("tuning_problems", "held_out_problems",
                                             "held_out_b_problems"))  # fmt: skip
    assert [p["spec"]["part"] for p in tuning] == ["tuning", "tuning-b"]
    assert {p["spec"]["part"] for p in held} == {"held-out"}
    assert {p["spec"]["part"] for p in held_b} == {"held-out-b"}
    seeds = [{p["spec"]["seed"] for p in ps} for ps in (tuning, held, held_b)]
    assert sum(map(len, seeds)) == len(set().union(*seeds)) == 4  # the parts are disjoint
    for table, probs in (("held_out", held), ("held_out_b", held_b)):
        for part in ("stats", "no_stats"):  # the fitted row is checked below
            for row in res[table][part]:
                nfe, key = str(row["nfe"]), row["config"]
                ratios = [p["scorekit"][key][nfe] / p["diffusers"][nfe][1] for p in probs]
                assert row["median"] == pytest.approx(statistics.median(ratios))
                assert row["worst"] == pytest.approx(max(ratios))
                assert key == res["chosen"][part][nfe]["config"]
                if part == "no_stats":
                    assert "/tele" not in key
    # the selection from the tuning records: the lowest max(median / 0.5, worst / 0.8) per NFE,
    # among the candidates without the Gaussian beyond the teleport (keys /gj, gdpm3*)
    for nfe, c in res["chosen"]["stats"].items():
        score = {
            k: max(statistics.median(r) / 0.5, max(r) / 0.8)
            for k in tuning[0]["scorekit"]
            if not (k.endswith("/gj") or k.startswith("gdpm"))
            for r in [[p["scorekit"][k][nfe] / p["diffusers"][nfe][1] for p in tuning]]
        }
        assert score[c["config"]] == pytest.approx(min(score.values()))  # fmt: skip
    # the fitted row (on the reported part, held-out-b): per problem the fit with the lower
    # calibration error, its evaluation error
    ((fit_row,),) = [res["held_out_b"]["fitted"]]
    assert "fitted" not in res["held_out"] and "fitted" not in held[0]
    f = held_b[0]["fitted"]["4"]
    kind = min(("optimized", "bespoke"), key=lambda k: f[k]["calibration"])
    assert f["chosen"] == kind and f["error"] == f[kind]["error"]
    assert fit_row["median"] == pytest.approx(f["error"] / held_b[0]["diffusers"]["4"][1])
    # One held-out error rerun from scratch: its noise, the exact ODE solution, and the chosen
    # teleport config run through sample(sampler="auto") with the Choice the key names.
    p = held[0]
    spec = specs(2, 0, True)[p["spec"]["index"]]
    gm = build(spec)
    sig_max = DiscreteProcess.linear().sigma_max
    z = torch.randn(
        16, gm.dim, generator=torch.Generator().manual_seed(spec.seed + 2), dtype=torch.float64
    )
    ref = pf_ode_reference(gm, sig_max * z, sig_max, 0.0, rtol=1e-6, atol=1e-6)
    row = res["held_out"]["stats"][0]
    (cand,) = [c for c in candidates(True) if _key(c) == row["config"]]
    choice = choice_of(cand)
    flow = data_flow(spec, gm)  # the suite's statistics: mean and covariance of sampled rows
    tele = choice.start == "teleport"
    with patch.dict(AUTO_TELEPORT if tele else AUTO, {row["nfe"]: choice}):
        out = sample(gm, (16, gm.dim), nfe=row["nfe"], sampler="auto", noise=z, sigma_max=sig_max,
                     gaussian=flow if tele else None, dtype=torch.float64)  # fmt: skip
    err = float((out - ref).square().mean().sqrt())
    assert err == pytest.approx(p["scorekit"][row["config"]][str(row["nfe"])], rel=1e-6)
    # Rerun from the same seed, the tuning records and diffusers' bests reused: the same choices,
    # and the held-out-b errors (computed again) equal.
    again = run_suite(out=tmp_path / "again", quick=True, part="held-out-b", log=lambda _: None,
                      reuse_tuning=str(tmp_path / "random"),
                      reuse_diffusers=str(tmp_path / "random"))  # fmt: skip
    assert [p.get("reused") for p in again["tuning_problems"]] == [True, True]
    assert json.loads(json.dumps(again["chosen"])) == {k: v for k, v in res["chosen"].items()
                                                       if k != "teleport"}  # fmt: skip
    for p, q in zip(again["held_out_b_problems"], held_b, strict=True):
        for key, errs in p["scorekit"].items():
            for nfe, e in errs.items():
                assert e == pytest.approx(q["scorekit"][key][str(nfe)], rel=1e-9)


def test_a_fit_nfe_outside_the_suite_is_one_line_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"--fit: NFE \[10\] not in this suite's NFEs \[4, 8\]"):
        run_suite(out=tmp_path / "r", quick=True, fit_nfes=[10])
    assert not (tmp_path / "r").exists()
