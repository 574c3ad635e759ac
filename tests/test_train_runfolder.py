"""The training run folder (issue 11): a run is never silently replaced, retention keeps the current
run's checkpoints, two trainings never share a folder, resume restores the run's configuration, bad
numbers are refused and non-finite training stops, a corrupt checkpoint is named. Each test failed on
the code before its fix."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scorekit.cli import main
from scorekit.runs import load_run
from scorekit.train import checkpoint as ckpt

TINY = json.dumps({"hidden": 16, "depth": 1, "emb_dim": 16})


def _train(out: Path, *extra: str) -> int:
    return main(["train", "--data", "moons", "--out", str(out), "--batch", "32", "--net", TINY,
                 "--log-every", "2", "--no-progress", *extra])  # fmt: skip


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.latest(folder))[0]["model"]


# -- 1. a run folder is never silently replaced -------------------------------------------------


def test_fresh_run_into_a_run_folder_is_refused_and_leaves_it_alone(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "4", "--ckpt-every", "2") == 0
    before = _files(run)
    capsys.readouterr()
    assert _train(run, "--steps", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err
    assert _files(run) == before  # not a byte changed


def test_overwrite_deletes_the_old_run_and_trains_a_new_one(tmp_path, capsys):
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    assert _train(old, "--steps", "12", "--ckpt-every", "6", "--seed", "1") == 0
    (old / "notes.txt").write_text("mine")  # not a run file: kept
    assert _train(fresh, "--steps", "4", "--ckpt-every", "2") == 0
    capsys.readouterr()
    assert _train(old, "--steps", "4", "--ckpt-every", "2", "--overwrite") == 0
    assert "deleted" in capsys.readouterr().err
    # Only the new run's checkpoints and log rows; its weights are those of the same run made afresh.
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == [
        "step_000000002",
        "step_000000004",
    ]
    assert [json.loads(r)["step"] for r in (old / "log.jsonl").read_text().splitlines()] == [2, 4]
    a, b = _weights(old), _weights(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (old / "notes.txt").read_text() == "mine"
    den_old, _ = load_run(old)
    den_new, _ = load_run(fresh)
    x, s = torch.zeros(3, 2), torch.ones(3)
    assert torch.equal(den_old(x, s), den_new(x, s))


def test_retention_keeps_the_newest_checkpoints_of_the_current_run(tmp_path):
    groups = {"model": {"w": torch.zeros(2)}}
    for step in (100, 200):  # an older, longer run's checkpoints
        ckpt.save(tmp_path, step, groups, {"step": step}, keep=2)
    for step in (10, 20, 30):  # the current run
        ckpt.save(tmp_path, step, groups, {"step": step}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_000000020", "step_000000030",
    ]  # fmt: skip
    assert ckpt.latest(tmp_path).name == "step_000000030"


def test_demo_into_an_existing_report_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["report.json"]


# -- 2. one training per run folder ---------------------------------------------------------------


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from scorekit.cli import main; sys.exit(main())",
            "train", "--data", "moons", "--out", str(out), "--batch", "32", "--net", TINY,
            "--log-every", "2", "--no-progress", *extra]  # fmt: skip


def test_a_second_training_into_a_busy_folder_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", ckpt.SLEEP_ENV: "0.3"}
    first = subprocess.Popen(_cli(run, "--steps", "8", "--ckpt-every", "2"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        t0 = time.monotonic()
        while not (run / "checkpoints").exists():  # the first one is training
            assert first.poll() is None and time.monotonic() - t0 < 60
            time.sleep(0.02)
        capsys.readouterr()
        assert _train(run, "--steps", "8", "--ckpt-every", "2", "--resume") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {first.pid}" in err
    finally:
        _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    # The first run is whole: its log has each row once and its last checkpoint is its last step.
    assert [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()] == [
        2,
        4,
        6,
        8,
    ]
    assert ckpt.latest(run).name == "step_000000008"
    assert not (run / "train.lock").exists()


def test_the_lock_is_held_while_training_and_released_on_an_exception(tmp_path, monkeypatch):
    from scorekit.train import TrainConfig, train

    seen = []

    def failing_save(run_dir, step, *a, **k):
        seen.append(json.loads((Path(run_dir) / "train.lock").read_text()))
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ckpt, "save", failing_save)
    cfg = TrainConfig(data="moons", out=str(tmp_path / "run"), steps=4, batch=32, ckpt_every=2,
                      net=json.loads(TINY))  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, progress=False)
    assert seen and seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not (tmp_path / "run" / "train.lock").exists()


def test_a_stale_lock_of_a_killed_training_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    run.mkdir()
    (run / "train.lock").write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                                "started": "2026-01-01T00:00:00Z"}))  # fmt: skip
    assert _train(run, "--steps", "2") == 0
    assert f"pid {gone.pid}" in capsys.readouterr().err
    assert ckpt.latest(run).name == "step_000000002" and not (run / "train.lock").exists()


# -- 3. --resume restores the run's configuration -------------------------------------------------

SETTINGS = ("--batch", "16", "--lr", "1e-3", "--seed", "2", "--ckpt-every", "3", "--log-every", "3",
            "--ema", "0.9")  # fmt: skip


def _resume(run: Path, *extra: str) -> int:
    return main(["train", "--out", str(run), "--resume", "--no-progress", *extra])


def _log_steps(run: Path) -> list[int]:
    return [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()]


def test_resume_restores_every_setting_of_the_run(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert _train(run, "--steps", "6", *SETTINGS) == 0
    assert _resume(run, "--steps", "12") == 0  # nothing else repeated
    assert _train(straight, "--steps", "12", *SETTINGS) == 0
    assert _log_steps(run) == _log_steps(straight) == [3, 6, 9, 12]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000000009",
        "step_000000012",
    ]
    a, b = (ckpt.load(ckpt.latest(r))[0] for r in (run, straight))
    for group in ("model", "ema", "optim"):
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group


def test_resume_overrides_the_cadence_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "6", *SETTINGS) == 0
    capsys.readouterr()
    assert _resume(run, "--steps", "10", "--log-every", "2") == 0
    err = capsys.readouterr().err
    assert "--log-every" in err and "--ckpt-every" not in err
    assert _log_steps(run) == [3, 6, 8, 10]


@pytest.mark.parametrize("option", [("--lr", "0.01"), ("--batch", "64"), ("--seed", "3"),
                                    ("--param", "eps"), ("--net", json.dumps({"hidden": 32}))])  # fmt: skip
def test_resume_refuses_an_option_that_changes_the_model_or_data(tmp_path, capsys, option):
    run = tmp_path / "run"
    assert _train(run, "--steps", "3", *SETTINGS) == 0
    before = _files(run)
    capsys.readouterr()
    assert _resume(run, "--steps", "6", *option) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option[0] in err
    assert _files(run) == before


def test_resume_refuses_a_changed_data_file(tmp_path, capsys):
    import numpy as np

    data, run = tmp_path / "pts.npy", tmp_path / "run"
    np.save(data, np.random.default_rng(0).standard_normal((200, 2)).astype(np.float32))
    common = ["train", "--data", str(data), "--out", str(run), "--batch", "16", "--net", TINY,
              "--ckpt-every", "3", "--no-progress"]  # fmt: skip
    assert main([*common, "--steps", "3"]) == 0
    original = np.load(data)
    x = original.copy()
    x[17, 1] += 0.5  # one number changed, same shape
    np.save(data, x)
    capsys.readouterr()
    assert main([*common, "--steps", "6", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    (line,) = [ln for ln in err.splitlines() if "error" in ln]
    assert "--data" in line and "SHA-256" in line
    assert ckpt.latest(run).name == "step_000000003"
    np.save(data, original)  # the original content again: resumes
    assert main([*common, "--steps", "6", "--resume"]) == 0


# -- 4. non-finite numbers: refused up front, stopped in training ----------------------------------


@pytest.mark.parametrize("option,value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--grad-clip", "nan"), ("--grad-clip", "inf"),
    ("--weight-decay", "nan"), ("--ema", "inf"), ("--minutes", "inf"), ("--minutes", "nan"),
    ("--warmup", "-1"), ("--label-dropout", "nan"), ("--sample-every", "-2"),
])  # fmt: skip
def test_non_finite_or_out_of_range_options_are_refused_up_front(tmp_path, capsys, option, value):
    run = tmp_path / "run"
    assert _train(run, "--steps", "2", option, value) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and option in err and value in err
    assert not (run / "checkpoints").exists() and not (run / "config.json").exists()


def _tiny_cfg(out: Path, **kw):
    from scorekit.train import TrainConfig

    base = {"data": "moons", "out": str(out), "batch": 32, "net": json.loads(TINY), "log_every": 10}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_non_finite_gradients_stop_training_at_their_step(tmp_path, monkeypatch, grad_clip):
    from scorekit.train import loop, train

    real, calls = loop.denoising_loss, []

    def poisoned(model, *a, **k):
        loss = real(model, *a, **k)
        calls.append(None)
        # Step 7: a finite loss whose gradient is NaN (d sqrt(u)/du = inf at u = 0).
        if len(calls) == 7:
            loss = loss + torch.sqrt(0 * next(model.parameters()).sum())
        return loss

    monkeypatch.setattr(loop, "denoising_loss", poisoned)
    cfg = _tiny_cfg(tmp_path / "run", steps=20, ckpt_every=5, grad_clip=grad_clip)
    with pytest.raises(FloatingPointError, match=r"step 7\b"):
        train(cfg, progress=False)
    # The last good checkpoint, nothing after it.
    assert ckpt.latest(cfg.out).name == "step_000000005"
    monkeypatch.setattr(loop, "denoising_loss", real)
    train(_tiny_cfg(tmp_path / "clean", steps=5, ckpt_every=5, grad_clip=grad_clip), progress=False)
    a, b = _weights(Path(cfg.out)), _weights(tmp_path / "clean")
    assert all(torch.equal(a[k], b[k]) for k in a)  # and it is the clean run's step 5


def test_a_diverging_loss_is_reported_with_its_step_and_loss(tmp_path):
    from scorekit.train import train

    # The case: the default network at --lr 10 (its loss went 60, 430, 90 ... at steps 10, 20, 30).
    cfg = _tiny_cfg(tmp_path / "run", steps=300, lr=10.0, ckpt_every=100, net={}, batch=128)
    with pytest.raises(FloatingPointError, match=r"diverged at step (\d+).* loss [0-9.e+]+") as e:
        train(cfg, progress=False)
    step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert step < 300
    folder = ckpt.latest(cfg.out)
    assert folder is None or int(folder.name[5:]) < step  # nothing saved from the diverged steps


# -- 5. zero is an error, not "the default" -------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["train", "--data", "moons", "--steps", "0"],
    ["demo", "--quick", "--ring-steps", "0"],
    ["demo", "--quick", "--digits-minutes", "0"],
    ["demo", "--quick", "--digits-steps", "0"],
    ["demo", "--quick", "--ring-steps", "-3"],
])  # fmt: skip
def test_zero_or_negative_lengths_are_an_error(tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[-2] in err and argv[-1] in err
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written


# -- 6. a corrupt newest checkpoint is named; partial step folders are cleaned up ------------------


def test_a_corrupt_newest_checkpoint_is_named_on_load_and_on_resume(tmp_path, capsys):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert _train(run, "--steps", "6", *SETTINGS) == 0
    newest = run / "checkpoints" / "step_000000006"
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])  # truncated
    with pytest.warns(ckpt.CheckpointWarning) as got:
        load_run(run)
    (msg,) = [str(w.message) for w in got]
    assert str(model) in msg and "step_000000003" in msg
    capsys.readouterr()
    assert _resume(run, "--steps", "9") == 0
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "corrupt" in ln]
    assert str(model) in line and "step_000000003" in line
    # Resumed from step 3, it continues exactly as an uninterrupted run.
    assert _train(straight, "--steps", "9", *SETTINGS) == 0
    a, b = (ckpt.load(ckpt.latest(r))[0] for r in (run, straight))
    for group in ("model", "ema", "optim"):
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group


def test_partial_step_folders_are_cleaned_up_on_resume_and_on_save(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "3", *SETTINGS) == 0
    partial = run / "checkpoints" / "step_000000004"  # a write killed before its manifest
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 64)
    assert _resume(run, "--steps", "6") == 0
    assert str(partial) in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000000003",
        "step_000000006",
    ]
    groups = {"model": {"w": torch.zeros(2)}}
    (run / "checkpoints" / "step_000000007").mkdir()
    ckpt.save(run, 9, groups, {"step": 9}, keep=5)
    assert not (run / "checkpoints" / "step_000000007").exists()
