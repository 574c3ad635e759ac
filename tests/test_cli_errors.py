"""Every failure a user can cause on the command line is one line on stderr and exit code 2.

The line names the option, what was found and what to do; ``--debug`` shows the traceback instead.
Outputs are checked before any work starts, and a failed write leaves neither the output nor a
temporary file behind. Each case printed a traceback (or did all the work first) before.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import scorekit.runs
from scorekit.cli import main

TINY = json.dumps({"hidden": 8, "depth": 1, "emb_dim": 8})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_errors") / "run"
    argv = ["train", "--data", "moons", "--out", str(out), "--steps", "2", "--batch", "16",
            "--net", TINY, "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out


def one_line(capsys, argv, *fragments):
    """Run ``scorekit argv``: exit code 2 and one line on stderr holding every fragment."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Counts the calls of the expensive steps; a refusal up front makes none."""
    calls = []
    for name in ("load_run", "generate"):
        real = getattr(scorekit.runs, name)

        def counting(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(scorekit.runs, name, counting)
    return calls


def sample(run, out, *more):
    return ["sample", "--run", str(run), "--n", "4", "--nfe", "4", "--sampler", "euler",
            "--no-progress", "--out", str(out), *more]  # fmt: skip


def likelihood(run, out, *more):
    return ["likelihood", "--run", str(run), "--data", "moons", "--limit", "4", "--out", str(out),
            "--no-ode", "--elbo", "--n-sigma", "4", *more]  # fmt: skip


def test_the_run_itself_samples(run, tmp_path):
    assert main(sample(run, tmp_path / "ok.npy")) == 0 and (tmp_path / "ok.npy").exists()


@pytest.mark.parametrize("command", [sample, likelihood])
def test_out_that_is_a_folder_is_refused_before_any_work(run, tmp_path, capsys, no_work, command):
    folder = tmp_path / ("x.npy" if command is sample else "x.csv")
    folder.mkdir()
    one_line(capsys, command(run, folder), "--out", "is a folder")
    assert no_work == [] and list(folder.iterdir()) == []


@pytest.mark.parametrize("command", [sample, likelihood])
def test_out_in_a_missing_folder_names_that_folder(run, tmp_path, capsys, no_work, command):
    out = tmp_path / "missing" / ("x.npy" if command is sample else "x.csv")
    line = one_line(capsys, command(run, out), "--out", str(tmp_path / "missing"), "does not exist")
    assert ".tmp" not in line and no_work == [] and not out.parent.exists()


def test_likelihood_out_must_be_csv(run, tmp_path, capsys, no_work):
    one_line(capsys, likelihood(run, tmp_path / "x.txt"), "--out", ".csv")
    assert no_work == [] and list(tmp_path.iterdir()) == []


def test_out_that_cannot_be_written_is_refused_before_any_work(run, tmp_path, capsys, no_work,
                                                               monkeypatch):  # fmt: skip
    # Root writes through permission bits, so a read-only folder is simulated where the file
    # system answers: creating any file there fails with EROFS.
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    one_line(capsys, sample(run, tmp_path / "x.npy"), "--out", "Read-only file system")
    assert no_work == [] and list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_no_file(run, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    line = one_line(capsys, sample(run, tmp_path / "x.npy"), "No space left on device",
                    "free some space", str(tmp_path / "x.npy"))  # fmt: skip
    assert ".tmp" not in line
    assert list(tmp_path.iterdir()) == []  # neither x.npy nor a temporary file


def test_atomic_write_errors_name_the_file_asked_for_not_its_temporary(tmp_path):
    from scorekit._util import atomic_write

    target = tmp_path / "missing" / "f.bin"
    with pytest.raises(FileNotFoundError) as err:
        atomic_write(target, b"x")
    assert err.value.filename == str(target) and ".tmp" not in str(err.value)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as err:
        atomic_write(tmp_path / "d", b"x")
    assert err.value.filename == str(tmp_path / "d") and os.listdir(tmp_path / "d") == []


@pytest.mark.parametrize(
    "more, fragments",
    [
        (["--device", "bogus"], ["--device", "'bogus'", "cpu"]),
        (["--threads", "-1"], ["--threads"]),
        (["--nfe", "0"], ["nfe", "0"]),
        (["--sampler", "eulerr"], ["sampler", "'eulerr'", "euler_ancestral"]),
        (["--schedule", "karas"], ["schedule", "'karas'", "karras"]),
        (["--batch", "0"], ["--batch", "0"]),
    ],
)
def test_bad_options_are_one_line_before_any_work(run, tmp_path, capsys, no_work, more, fragments):
    one_line(capsys, sample(run, tmp_path / "x.npy", *more), *fragments)
    assert no_work == [] and list(tmp_path.iterdir()) == []


def _rewrite(folder, name, tensors):
    """Replace a checkpoint file and its manifest entry, as an edit outside scorekit would."""
    save_file(tensors, folder / name)
    data = (folder / name).read_bytes()
    m = json.loads((folder / "manifest.json").read_text())
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def copy_of(run, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst, next((dst / "checkpoints").glob("step_*"))


def test_a_corrupt_safetensors_file_is_one_line(copy_of, tmp_path, capsys):
    dst, folder = copy_of
    junk = b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}"
    (folder / "ema.safetensors").write_bytes(junk)
    m = json.loads((folder / "manifest.json").read_text())
    m["files"]["ema.safetensors"] = {"bytes": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(m))
    one_line(capsys, sample(dst, tmp_path / "x.npy"), "ema.safetensors", "not a valid safetensors")
    assert not (tmp_path / "x.npy").exists()


def test_an_ode_failure_is_one_line_and_writes_nothing(copy_of, tmp_path, capsys):
    dst, folder = copy_of
    ema = load_file(folder / "ema.safetensors")
    _rewrite(
        folder, "ema.safetensors", {k: torch.full_like(v, float("nan")) for k, v in ema.items()}
    )
    out = tmp_path / "ll.csv"
    argv = ["likelihood", "--run", str(dst), "--data", "moons", "--limit", "2", "--out", str(out),
            "--divergence", "exact"]  # fmt: skip
    one_line(capsys, argv, "probability-flow ODE failed", "row 0")
    assert not out.exists()


def test_debug_shows_the_traceback(run, tmp_path, capsys):
    with pytest.raises(ValueError, match="bogus"):
        main(["--debug", *sample(run, tmp_path / "x.npy", "--device", "bogus")])
    with pytest.raises(ValueError, match="bogus"):
        main(sample(run, tmp_path / "x.npy", "--device", "bogus", "--debug"))


@pytest.mark.parametrize(
    "more, fragments",
    [
        (["--sampler", "eulr"], ["--sampler", "'eulr'"]),
        (["--sampler", "heun", "--nfe", "2"], ["--nfe 2", "heun"]),
        (["--sampler", "adaptive_ode"], ["--sampler adaptive_ode", "--nfe 10", "ipndm"]),
    ],
)
def test_demo_checks_sampler_and_nfe_before_training(tmp_path, capsys, more, fragments):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quick", "--ring-steps", "2", "--digits-steps", "2",
            "--no-progress", *more]  # fmt: skip
    one_line(capsys, argv, *fragments)
    assert not (out / "ring_run").exists()  # nothing was trained


def test_a_warning_is_one_line_too(run, tmp_path, capsys, monkeypatch):
    import warnings

    real = scorekit.runs.load_run

    def warning(*a, **k):
        warnings.warn(
            "checkpoint step_000000002 is corrupt;\n  using step_000000001",
            UserWarning,
            stacklevel=2,
        )
        return real(*a, **k)

    monkeypatch.setattr(scorekit.runs, "load_run", warning)
    assert main(sample(run, tmp_path / "x.npy")) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("scorekit sample: warning: checkpoint step_000000002 is corrupt; "
                      "using step_000000001")  # fmt: skip
