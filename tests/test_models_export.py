"""``scorekit export``: a run written as safetensors + JSON + model card, loaded back bit for bit
without running code (pickle and torch.load are made to fail while it loads)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from scorekit.cli import main
from scorekit.models import load_exported
from scorekit.runs import load_run
from scorekit.train import checkpoint as ckpt

TINY = json.dumps({"hidden": 16, "depth": 1, "emb_dim": 16})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    argv = ["train", "--data", "moons", "--out", str(out), "--batch", "32", "--net", TINY,
            "--steps", "6", "--log-every", "2", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_export_round_trips_bit_for_bit_and_never_unpickles(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]

    def refuse(*a, **k):
        raise AssertionError("loading an export must not unpickle")

    with monkeypatch.context() as m:
        m.setattr(pickle, "loads", refuse)
        m.setattr(pickle, "load", refuse)
        m.setattr(torch, "load", refuse)
        exported, info = load_exported(out)
    original, run_info = load_run(run)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    sigma = torch.logspace(-2, 1.5, 64)
    with torch.no_grad():
        assert torch.equal(exported(x, sigma), original(x, sigma))
    for key in ("shape", "kind", "process", "param", "sigma_min", "sigma_max", "sigma_data",
                "normalization", "num_classes"):  # fmt: skip
        assert info[key] == run_info[key], key
    step = ckpt.load(ckpt.latest(run))[1]["step"]
    card = (out / "README.md").read_text()
    assert f"| training steps | {step} |" in card and "load_exported" in card
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["loss"]
    assert json.loads((out / "config.json").read_text())["training"]["last_loss"] == last


def test_export_refusals(run, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2  # not empty
    assert main(["export", "--run", str(run), "--out", str(out), "--overwrite"]) == 0
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        load_exported(out)
    with pytest.raises(FileNotFoundError, match="not a scorekit export"):
        load_exported(tmp_path)
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
