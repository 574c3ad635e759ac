"""``scorekit bench samplers --quick``: the files it writes, and its fresh-noise re-check recomputed here."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from scorekit.analytic import target
from scorekit.bench.samplers import SCOREKIT_SAMPLERS, add_arguments, run
from scorekit.process import DiscreteProcess
from scorekit.samplers import REGISTRY
from scorekit.schedules import pf_ode_reference


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_quick_bench_writes_tables_and_its_fresh_check_is_reproducible(tmp_path, capsys):
    out = tmp_path / "b"
    args = _args("--quick", "--targets", "ring8", "--nfe", "10", "--fresh", "1",
                 "--fresh-rows", "64", "--out", str(out))  # fmt: skip
    assert run(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "table.txt").exists() and (out / "error_vs_nfe.png").stat().st_size > 0
    (row,) = res["fresh"]["ring8"]
    assert row["seed"] == 101 and row["rows"] == 64 and row["target_nfe"] == 10
    # Recompute the fresh check's scorekit error from scratch: its noise, the exact ODE solution,
    # the winning config's sampler and sigmas from the main run's rows.
    best = min(
        (r for r in res["rows"]["ring8"] if r["side"] == "scorekit"), key=lambda r: r["error"]
    )
    assert row["scorekit"] == best["config"] and not best["schedule"].startswith("teleport")
    name, opts = {lab: (n, o) for lab, n, o in SCOREKIT_SAMPLERS}[best["sampler"]]
    gm = target("ring8")
    sigma_max = DiscreteProcess.linear().sigma_max
    g = torch.Generator().manual_seed(101)
    x_t = sigma_max * torch.randn(64, 2, generator=g, dtype=torch.float64)
    ref = pf_ode_reference(gm, x_t, sigma_max, 0.0)
    x = REGISTRY[name](gm, x_t, torch.tensor(best["sigmas"], dtype=torch.float64), **opts)
    assert math.isclose(
        row["scorekit_error"], float((x - ref).square().mean().sqrt()), rel_tol=1e-6
    )
    assert math.isclose(row["ratio"], row["scorekit_error"] / row["diffusers_error"], rel_tol=1e-12)
    assert "fresh noise set" in capsys.readouterr().out


def test_bench_rejects_a_negative_fresh_count(tmp_path):
    with pytest.raises(ValueError, match="--fresh"):
        run(_args("--quick", "--fresh", "-1", "--out", str(tmp_path)))
