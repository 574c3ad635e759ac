"""``scorekit bench samplers --suite random``: its problems, its tuning/held-out split and its table,
recomputed here from the written results (the held-out ratios from the per-problem errors, a
diffusers best and a scorekit error rerun from scratch)."""

from __future__ import annotations

import argparse
import json
import statistics
from unittest.mock import patch

import pytest
import torch

from scorekit.bench.samplers import add_arguments, run
from scorekit.bench.samplers.random_suite import (
    _key,
    build,
    candidates,
    choice_of,
    data_flow,
    run_suite,
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


@pytest.mark.peer
@pytest.mark.slow
def test_quick_suite_table_is_recomputable_from_its_rows(tmp_path):
    pytest.importorskip("diffusers")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--suite", "random", "--quick", "--fit", "4", "--out", str(tmp_path)]
    assert run(parser.parse_args(args)) == 0
    res = json.loads((tmp_path / "random" / "results.json").read_text())
    assert (tmp_path / "random" / "table.txt").read_text().startswith("held-out")
    tuning, held = res["tuning_problems"], res["held_out_problems"]
    assert {p["spec"]["part"] for p in tuning} == {"tuning"}
    assert {p["spec"]["part"] for p in held} == {"held-out"}
    for part in ("stats", "no_stats"):
        for row in res["held_out"][part]:
            nfe, key = str(row["nfe"]), row["config"]
            ratios = [p["scorekit"][key][nfe] / p["diffusers"][nfe][1] for p in held]
            assert row["median"] == pytest.approx(statistics.median(ratios))
            assert row["worst"] == pytest.approx(max(ratios))
            assert key == res["chosen"][part][nfe]["config"]
            if part == "no_stats":
                assert "/tele" not in key
    # the fitted row: per problem the fit with the lower calibration error, its evaluation error
    ((fit_row,),) = [res["held_out"]["fitted"]]
    f = held[0]["fitted"]["4"]
    kind = min(("optimized", "bespoke"), key=lambda k: f[k]["calibration"])
    assert f["chosen"] == kind and f["error"] == f[kind]["error"]
    assert fit_row["median"] == pytest.approx(f["error"] / held[0]["diffusers"]["4"][1])
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


def test_a_fit_nfe_outside_the_suite_is_one_line_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"--fit: NFE \[10\] not in this suite's NFEs \[4, 8\]"):
        run_suite(out=tmp_path / "r", quick=True, fit_nfes=[10])
    assert not (tmp_path / "r").exists()
