"""Fault injection: the promises of docs/reliability.md under kill -9, a full disk, a second training
and damaged checkpoints. Every check is on independent facts: bitwise equality with an uninterrupted
run, the files on disk, the exit status and the one line printed.

The kill points are random; the seed is printed in a failure's message and can be fixed with
``SCOREKIT_FAULT_SEED``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scorekit.cli import main
from scorekit.runs import load_run
from scorekit.train import checkpoint as ckpt

STEPS, EVERY = 200, 60
TINY = json.dumps({"hidden": 16, "depth": 1, "emb_dim": 16})
SEED = int(os.environ.get("SCOREKIT_FAULT_SEED", random.SystemRandom().randrange(10**6)))


def _args(out: Path, *extra: str) -> list[str]:
    return ["train", "--data", "moons", "--out", str(out), "--steps", str(STEPS), "--batch", "64",
            "--net", TINY, "--ckpt-every", str(EVERY), "--log-every", "10", "--ema", "0.99",
            "--threads", "1", "--no-progress", *extra]  # fmt: skip


def _popen(args: list[str], **env: str) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if not env:
        full.pop(ckpt.SLEEP_ENV, None)
    cmd = [sys.executable, "-c", "import sys; from scorekit.cli import main; sys.exit(main())"]
    return subprocess.Popen(
        [*cmd, *args], env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"seed {SEED}: training ended (rc={proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"seed {SEED}: {what} not reached in time")
        time.sleep(0.003)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _logged(run: Path) -> int:
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max([json.loads(ln)["step"] for ln in lines[-3:] if ln.endswith("}")], default=0)


def _tensors(run: Path) -> dict:
    return ckpt.load(ckpt.latest(run))[0]


def _assert_same(a: dict, b: dict, seed: int) -> None:
    for group in ("model", "ema", "optim"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"seed {seed}: {group}.{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run, in this process on one thread (as the subprocesses are)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(_args(out)) == 0
    assert ckpt.latest(out).name == f"step_{STEPS:09d}"
    return _tensors(out)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bitwise(tmp_path, reference):
    rng = random.Random(SEED)
    run = tmp_path / "run"
    # 1. Killed half-way through writing a checkpoint: after a random one of its files.
    at = rng.choice([EVERY, 2 * EVERY])
    after = rng.choice(["model.safetensors", "ema.safetensors", "optim.safetensors", "state.json"])
    folder = run / "checkpoints" / f"step_{at:09d}"
    p = _popen(_args(run), **{ckpt.SLEEP_ENV: "0.25"})
    _wait_for(lambda: (folder / after).exists() and not (folder / "manifest.json").exists(), p,
              f"the write of {after} at step {at}")  # fmt: skip
    _kill(p)
    assert (run / "train.lock").exists()  # a kill -9 leaves its lock behind ...
    latest = ckpt.latest(run)
    assert (latest.name if latest else None) == (f"step_{at - EVERY:09d}" if at > EVERY else None)
    # 2. Resumed (the stale lock is taken over), then killed at a random step between checkpoints.
    kill_at = rng.randrange(at + 10, STEPS - 10)
    p = _popen(_args(run, "--resume"))
    _wait_for(lambda: _logged(run) >= kill_at, p, f"step {kill_at}")
    _kill(p)
    # 3. Resumed to the end: the partial checkpoint folder is gone, the log has each row once, and
    # weights, EMA and optimiser state are bitwise those of the uninterrupted run.
    p = _popen(_args(run, "--resume"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, f"seed {SEED}: {err}"
    assert all((f / "manifest.json").exists() for f in (run / "checkpoints").iterdir()), SEED
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, STEPS + 1, 10)), SEED
    assert not (run / "train.lock").exists()
    _assert_same(_tensors(run), reference, SEED)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = ckpt.atomic_write

    def full_disk(path, data):
        if Path(path).parent.name == "step_000000006" and Path(path).name == "ema.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", full_disk)
    args = ["train", "--data", "moons", "--out", str(run), "--steps", "9", "--ckpt-every", "3",
            "--batch", "32", "--net", TINY, "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and "step 3" in err
    # The previous checkpoint is the newest and loads; no partial step folder, no lock left behind.
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000000003"]
    assert ckpt.load(ckpt.latest(run))[1]["step"] == 3
    load_run(run)
    assert not (run / "train.lock").exists()
    # With space again, --resume continues to the end.
    monkeypatch.setattr(ckpt, "atomic_write", real)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert ckpt.latest(run).name == "step_000000009"


@pytest.mark.slow
def test_two_trainings_started_together_one_refused_naming_the_other(tmp_path):
    # Both fresh, into one empty folder, at the same moment: the lock's O_EXCL creation lets exactly
    # one through; the other exits 2 with one line naming the winner's pid.
    run = tmp_path / "run"
    args = ["train", "--data", "moons", "--out", str(run), "--steps", "4", "--ckpt-every", "2",
            "--log-every", "2", "--batch", "32", "--net", TINY, "--no-progress"]  # fmt: skip
    procs = [_popen(args, **{ckpt.SLEEP_ENV: "0.3"}) for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    rcs = sorted(p.returncode for p in procs)
    assert rcs == [0, 2], errs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    assert len(errs[loser].strip().splitlines()) == 1 and f"pid {procs[winner].pid}" in errs[loser]
    # The winner's run is whole: each log row once, its last checkpoint its last step, no lock left.
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4] and ckpt.latest(run).name == "step_000000004"
    assert not (run / "train.lock").exists()


@pytest.mark.parametrize("damage", ["truncate", "tamper"])
def test_a_damaged_checkpoint_is_named_and_the_one_before_is_used(tmp_path, damage):
    run = tmp_path / "run"
    args = ["train", "--data", "moons", "--out", str(run), "--steps", "4", "--ckpt-every", "2",
            "--batch", "32", "--net", TINY, "--no-progress"]  # fmt: skip
    assert main(args) == 0
    good = ckpt.load(run / "checkpoints" / "step_000000002")[0]
    path = run / "checkpoints" / "step_000000004" / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[-5] ^= 0x01  # one bit of a weight: same size, another SHA-256
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(path.parent)
    with pytest.warns(ckpt.CheckpointWarning) as got:
        denoiser, _ = load_run(run)
    (msg,) = [str(w.message) for w in got]
    assert str(path) in msg and "step_000000002" in msg
    # What was loaded is the step-2 EMA, bit for bit.
    loaded = denoiser.net.state_dict()
    assert loaded.keys() == good["ema"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in good["ema"].items())
