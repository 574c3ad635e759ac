"""``scorekit bench samplers``: the files it writes, its fresh-noise re-check and bespoke start
recomputed here, its step counts and settings, and its one-line answer without diffusers.

Only the tests that drive diffusers need it (``peer``, skipped without it); the rest always run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from scorekit.analytic import target
from scorekit.bench.samplers import SCOREKIT_SAMPLERS, Config, add_arguments, run
from scorekit.bench.samplers.candidates import bespoke_fit, steps_within
from scorekit.bench.samplers.fresh import fresh_check
from scorekit.pfode import pf_ode_reference
from scorekit.process import DiscreteProcess
from scorekit.samplers import BespokeSolver
from scorekit.samplers.accelerators import GaussianFlow, with_teleport
from scorekit.samplers.registry import get_sampler, nfe
from scorekit.schedules import karras


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.peer
def test_quick_bench_writes_tables_and_its_fresh_check_is_reproducible(tmp_path, capsys):
    pytest.importorskip("diffusers")
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
    x = get_sampler(name)(gm, x_t, torch.tensor(best["sigmas"], dtype=torch.float64), **opts)
    assert math.isclose(
        row["scorekit_error"], float((x - ref).square().mean().sqrt()), rel_tol=1e-6
    )
    assert math.isclose(row["ratio"], row["scorekit_error"] / row["diffusers_error"], rel_tol=1e-12)
    assert "fresh noise set" in capsys.readouterr().out


def test_bench_rejects_a_negative_fresh_count(tmp_path):
    with pytest.raises(ValueError, match="--fresh"):
        run(_args("--quick", "--fresh", "-1", "--out", str(tmp_path)))


def _bespoke_rows(smax: float) -> tuple[list[dict], list[float]]:
    good = [smax, 8.0, 1.5, 0.3, 0.05, 0.0]
    bad = [smax, 40.0, 30.0, 20.0, 10.0, 0.0]
    rows = [
        {"target_nfe": 4, "schedule": "teleport+optimized", "sampler": "dpmpp_2m", "sigmas": bad},
        {"target_nfe": 4, "schedule": "teleport+optimized", "sampler": "ipndm", "sigmas": good},
        {"target_nfe": 4, "schedule": "karras", "sampler": "euler", "sigmas": good},
        {"target_nfe": 4, "schedule": "teleport+optimized", "sampler": "heun", "sigmas": good},
    ]
    return rows, good


def test_bespoke_variant_starts_from_the_best_candidate_on_calibration_noise(tmp_path):
    # bespoke_fit picks, among this NFE's teleport rows with a linear sampler, the one with the
    # lowest error on the calibration noise (recomputed here), fits it, and caches the solver.
    gm = target("ring8")
    flow = GaussianFlow.from_mixture(gm)
    smax = DiscreteProcess.linear().sigma_max
    rows, good = _bespoke_rows(smax)
    args = _args("--out", str(tmp_path), "--bespoke-rows", "128", "--bespoke-iterations", "20")
    config = Config.from_args(args)
    label, solver = bespoke_fit(gm, "ring8", 4, rows, flow, smax, config, lambda m: None)
    assert label == "ipndm" and solver.nfe == 4 and solver.teleport
    # the same calibration noise as the bench: seed + 1
    g = torch.Generator().manual_seed(1)
    x_c = smax * torch.randn(128, 2, generator=g, dtype=torch.float64)
    ref_c = pf_ode_reference(gm, x_c, smax, 0.0, rtol=1e-10, atol=1e-10)
    start = with_teleport("ipndm", flow)(gm, x_c.clone(), torch.tensor(good, dtype=torch.float64))
    base_rms = float((start - ref_c).square().mean().sqrt())
    assert math.isclose(solver.calibration_rms[0], base_rms, rel_tol=1e-9)
    fitted = solver(gm, x_c.clone(), gaussian=flow)
    assert math.isclose(
        solver.calibration_rms[1], float((fitted - ref_c).square().mean().sqrt()), rel_tol=1e-6
    )
    assert solver.calibration_rms[1] <= base_rms
    again = bespoke_fit(gm, "ring8", 4, rows, flow, smax, config, lambda m: None)[1]
    assert torch.equal(again.coefficients, solver.coefficients)  # from the cache
    cached = json.loads((tmp_path / "bespoke_solvers.json").read_text())
    assert len(cached) == 1


@pytest.mark.peer
def test_fresh_check_reruns_a_bespoke_winner_from_its_coefficients(tmp_path):
    pytest.importorskip("diffusers")
    gm = target("ring8")
    flow = GaussianFlow.from_mixture(gm)
    smax = DiscreteProcess.linear().sigma_max
    rows, _ = _bespoke_rows(smax)
    config = Config.from_args(
        _args("--out", str(tmp_path), "--bespoke-rows", "128", "--bespoke-iterations", "5")
    )
    _, solver = bespoke_fit(gm, "ring8", 4, rows, flow, smax, config, lambda m: None)
    best = {"config": "ipndm/teleport+bespoke", "sampler": "ipndm", "schedule": "teleport+bespoke",
            "sigmas": [smax, *solver.sigmas.tolist()], "bespoke": solver.to_dict()}  # fmt: skip
    summary = {4: {"scorekit": best}}
    fresh_args = _args("--quick", "--fresh", "1", "--fresh-rows", "32", "--out", str(tmp_path))
    _, (frow,) = fresh_check("ring8", summary, Config.from_args(fresh_args), lambda m: None)
    g = torch.Generator().manual_seed(101)
    x_f = smax * torch.randn(32, 2, generator=g, dtype=torch.float64)
    ref_f = pf_ode_reference(gm, x_f, smax, 0.0)
    want = float((BespokeSolver.from_dict(best["bespoke"])(gm, x_f, gaussian=flow) - ref_f)
                 .square().mean().sqrt())  # fmt: skip
    assert math.isclose(frow["scorekit_error"], want, rel_tol=1e-6)


@pytest.mark.parametrize(("label", "name", "opts"), SCOREKIT_SAMPLERS)
def test_steps_within_gives_the_largest_nfe_not_above_the_budget(label, name, opts):
    # heun and friends make 2n - 1 or 3n - 2 calls: the bench takes the most steps that fit.
    for budget in range(4, 25):
        n = steps_within(name, opts, budget)
        assert nfe(name, karras(n, 0.5, 1.0), **opts) <= budget
        assert nfe(name, karras(n + 1, 0.5, 1.0), **opts) > budget


def test_config_is_built_once_and_quick_shrinks_the_search(tmp_path):
    args = _args("--quick", "--nfe", "10", "5", "--optimize-top", "3", "--out", str(tmp_path))
    config = Config.from_args(args)
    assert config.nfe == config.bespoke_nfe == (5, 10)
    assert config.optimize_top == 1 and config.iterations == 4 and config.no_teleport
    assert config.batches["ring8"] == 100 and config.select_only == {}
    assert args.optimize_top == 3 and not args.no_teleport  # the parsed arguments are left alone
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    assert json.loads(json.dumps(config.to_dict()))["out"] == str(tmp_path)


def test_without_diffusers_the_command_names_the_extra_in_one_line(tmp_path):
    # A fresh interpreter in which ``import diffusers`` fails: the package still imports, its
    # options parse, and the command answers with the extra to install instead of a traceback.
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from scorekit.cli import main\n"
        f"sys.exit(main(['bench', 'samplers', '--quick', '--out', {str(tmp_path / 'b')!r}]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().count("\n") == 0 and "pip install 'scorekit[test]'" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "b").exists()
