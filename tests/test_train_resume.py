"""Kill -9 and resume: a `scorekit train` subprocess killed at any moment (mid-training, or half-way
through writing a checkpoint) and resumed ends with exactly the weights, EMA and optimiser state of an
uninterrupted run of the same length (bitwise on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scorekit.train import checkpoint as ckpt

STEPS, EVERY = 600, 200
TINY = {"hidden": 16, "depth": 1, "emb_dim": 16}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "import sys; from scorekit.cli import main; sys.exit(main())", "train", "--data", "moons", "--out", str(out),
        "--steps", str(STEPS), "--batch", "64", "--net", json.dumps(TINY), "--ckpt-every",
        str(EVERY), "--log-every", "10", "--ema", "0.99", "--no-progress", *extra,
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env.pop(ckpt.SLEEP_ENV, None)
    env.update(extra)
    return env


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(
                f"training finished (rc={proc.returncode}) before the kill point was reached"
            )
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.005)


def _logged_past(run: Path, step: int):
    def cond():
        try:
            lines = (run / "log.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(json.loads(ln)["step"] >= step for ln in lines[-3:] if ln.endswith("}"))

    return cond


def _writing(run: Path, step: int):
    folder = run / "checkpoints" / f"step_{step:09d}"

    def cond():
        return (folder / "model.safetensors").exists() and not (folder / "manifest.json").exists()

    return cond


def _final(run: Path) -> dict:
    folder = ckpt.latest(run)
    assert folder.name == f"step_{STEPS:09d}"
    return ckpt.load(folder)[0]


def _assert_same(a: dict, b: dict) -> None:
    for group in ("model", "ema", "optim"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}.{k} differs"


def _resume(run: Path) -> None:
    out = subprocess.run(
        _cmd(run, "--resume"), env=_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, STEPS + 1, 10))  # no gap, no duplicate rows


def _reference(out: Path) -> dict:
    """The uninterrupted run, in this process on one thread (as the subprocesses are)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from scorekit.cli import main

        assert main(_cmd(out)[3:]) == 0
    finally:
        torch.set_num_threads(threads)
    return _final(out)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise(tmp_path):
    run = tmp_path / "run"
    # 1. Killed while writing its second checkpoint (the test hook sleeps between its files).
    p = subprocess.Popen(_cmd(run), env=_env(**{ckpt.SLEEP_ENV: "0.4"}), stderr=subprocess.DEVNULL)
    _wait_for(_writing(run, 2 * EVERY), p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt.latest(run).name == f"step_{EVERY:09d}"  # the torn checkpoint is ignored

    # 2. Resumed, then killed mid-training some steps after a checkpoint: those steps are lost.
    p = subprocess.Popen(_cmd(run, "--resume"), env=_env(), stderr=subprocess.DEVNULL)
    _wait_for(_logged_past(run, 2 * EVERY + 50), p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert EVERY < int(ckpt.latest(run).name[5:]) < STEPS

    # 3. Resumed to the end: the same weights, EMA and optimiser state as the uninterrupted run.
    _resume(run)
    _assert_same(_final(run), _reference(tmp_path / "ref"))
