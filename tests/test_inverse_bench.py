"""``scorekit bench inverse`` runs end to end on a tiny configuration (the numbers are the bench's job)."""

from __future__ import annotations

import argparse
import json

import pytest

from scorekit.bench import inverse as bench


def _args(tmp_path, **kw):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--out", str(tmp_path), "--n", "40", "--nfe", "6,10", "--problems", "ring8-observe-x"]
    argv.append("--no-plot")  # matplotlib's import alone can take seconds on a busy machine
    return parser.parse_args(argv + [f"--{k}={v}" if v != "" else f"--{k}" for k, v in kw.items()])


def test_bench_writes_one_row_per_solver_and_budget(tmp_path):
    assert bench.run(_args(tmp_path, solvers="ddrm,daps,tds", particles=1)) == 0
    result = json.loads((tmp_path / "inverse.json").read_text())
    (prob,) = result["problems"]
    assert [(r["solver"], r["nfe"]) for r in prob["rows"]] == [
        ("ddrm", 6), ("daps", 6), ("tds", 6), ("ddrm", 10), ("daps", 10), ("tds", 10),
    ]  # fmt: skip
    assert all(0 <= r["coverage90"] <= 1 and r["sw2"] > 0 for r in prob["rows"])
    assert not (tmp_path / "inverse.png").exists()


def test_bench_rejects_an_unknown_solver(tmp_path):
    with pytest.raises(ValueError, match="unknown solver 'nope'; allowed"):
        bench.run(_args(tmp_path, solvers="nope"))


def test_peers_absent_are_skipped_with_a_clear_message(tmp_path, capsys):
    """deepinv and azula are not installed here: --peers records one skipped row per peer saying so."""
    from scorekit.bench import inverse_peers

    missing = [lib for lib, v in inverse_peers.available().items() if v is None]
    if not missing:
        pytest.skip("deepinv and azula are installed: the peer rows are measured instead")
    assert bench.run(_args(tmp_path, solvers="ddrm", peers="")) == 0
    rows = json.loads((tmp_path / "inverse.json").read_text())["problems"][0]["rows"]
    skipped = [r for r in rows if "skipped" in r]
    assert {r["solver"].split("-")[0] for r in skipped} == set(missing)
    assert all("is not installed (pip install" in r["skipped"] for r in skipped)
    assert (
        "skipped: deepinv is not installed" in capsys.readouterr().out or "deepinv" not in missing
    )


def test_azula_noise_mapping_reproduces_the_prior():
    """The azula adapter's sigma mapping (VE schedule, ``D(x_t / alpha, sigma / alpha)``) checked as its
    docstring asks: with ``A = 0`` azula's MMPS + DDPM sampler must return ring8 prior samples: sliced
    W2 within 2x the exact-vs-exact floor and the spread about the nearest mode within 15% of the exact
    0.1 (a denoiser called at sigma^2, 2 sigma or sigma / 2 was measured at 0.29, 0.062 and 0.17)."""
    pytest.importorskip("azula")
    import torch

    from scorekit.analytic import target
    from scorekit.bench import inverse_peers

    ring = target("ring8")
    sw2, floor = inverse_peers.prior_check("azula-mmps", ring, n=400, nfe=40)
    assert sw2 < 2 * floor
    a, y = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    out = inverse_peers.run_peer("azula-mmps", ring, y, a, 1.0, 400, 40)
    mode = (out[:, None] - ring.means[None]).norm(dim=-1).argmin(1)
    assert abs(float((out - ring.means[mode]).std(0).mean()) - 0.1) < 0.015
