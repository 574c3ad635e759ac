"""Checkpoints that are complete or absent, and that load without running code.

A checkpoint is a folder ``RUN_DIR/checkpoints/step_000001000/`` holding tensor groups as safetensors
files (``model``, ``ema``, ``optim``) and a JSON state (config, normalisation, step, RNG states,
data-order state). Every file is written atomically (temporary file, ``fsync``, ``os.replace``,
directory ``fsync``), and ``manifest.json`` is written last with each file's size and SHA-256. A
folder without a valid manifest, or whose files do not match it, is ignored by ``latest``, so a
process killed at any moment (even half-way through a write) leaves the previous checkpoint in
charge. Loading uses ``safetensors`` and ``json`` only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from scorekit._util import atomic_write, atomic_write_json

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "atomic_write",
    "atomic_write_json",
    "clean_partial",
    "latest",
    "load",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "rng_from_json",
    "rng_to_json",
    "save",
]

#: Test hook: seconds to sleep between the files of a checkpoint (so a test can kill mid-write).
SLEEP_ENV = "SCOREKIT_TEST_CKPT_SLEEP"
_DIR = "checkpoints"
_MANIFEST = "manifest.json"
#: Largest checkpoint file loading reads (the Adam state of ``nets.MAX_PARAMETERS`` parameters
#: fits); a manifest or file claiming more is refused before anything is read.
MAX_FILE_BYTES = 16 << 30
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_FILES = 16
#: The names a manifest may list: plain names inside the checkpoint folder, never a path.
_FILE_NAME = re.compile(r"state\.json|[A-Za-z0-9_][A-Za-z0-9_-]{0,63}\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match its manifest."""


class CheckpointWarning(UserWarning):
    """``latest`` skipped a corrupt checkpoint for an older one."""


def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / _DIR / f"step_{step:09d}"


def save(
    run_dir: str | os.PathLike,
    step: int,
    tensors: dict[str, dict[str, Tensor]],
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step``: one safetensors file per group of ``tensors``, ``state.json``, manifest.

    After the manifest is in place, checkpoints beyond the newest ``keep`` of this run are deleted
    (see ``_retain``).
    Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    clean_partial(run_dir, but=step)  # left by a killed write
    folder = _step_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MANIFEST).unlink(missing_ok=True)  # a rewrite is incomplete until its new manifest
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    files: dict[str, dict[str, Any]] = {}
    blobs = {f"{name}.safetensors": st_save(_contiguous(group)) for name, group in tensors.items()}
    blobs["state.json"] = (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()
    try:
        for fname, data in blobs.items():
            atomic_write(folder / fname, data)
            files[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            if sleep:
                time.sleep(sleep)
        atomic_write_json(folder / _MANIFEST, {"step": step, "files": files})
    except BaseException:  # a full disk, say: no partial folder left behind; older checkpoints stay
        shutil.rmtree(folder, ignore_errors=True)
        raise
    _retain(run_dir, step, keep)
    return folder


def _retain(run_dir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints of the current run: those at or below ``step``,
    since a run's steps only grow. A checkpoint above ``step`` belongs to another run or to a future
    abandoned by resuming from an older checkpoint (the newer was corrupt): it is deleted, so that
    ``latest`` can never prefer it to the run being saved. ``keep <= 0`` deletes nothing."""
    if keep <= 0:
        return
    steps = _complete_steps(run_dir)
    mine = [s for s in steps if s <= step]
    for old in [s for s in steps if s > step] + mine[:-keep]:
        shutil.rmtree(_step_dir(run_dir, old), ignore_errors=True)


def _contiguous(group: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses shared or strided storage; clone detaches views from their owners.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in group.items()}


def _complete_steps(run_dir: Path) -> list[int]:
    steps = []
    for p in (run_dir / _DIR).glob("step_*"):
        if (p / _MANIFEST).is_file() and p.name[5:].isdigit():
            steps.append(int(p.name[5:]))
    return sorted(steps)


def _read_verified(folder: Path) -> dict[str, bytes]:
    """The files listed in ``folder``'s manifest, each checked against its size and SHA-256.

    A manifest is data someone else may have written: its names must be plain file names inside
    ``folder`` (no ``/``, no ``..``, no dot-files; ``state.json`` and ``NAME.safetensors`` only), each
    a regular file (not a link, FIFO or device), of the size the manifest gives, at most
    ``MAX_FILE_BYTES``; all of that is checked before a byte is read.
    """
    try:
        manifest = json.loads(_read_regular(folder / _MANIFEST, None, _MAX_MANIFEST_BYTES))
        out = {}
        for fname, (size, digest) in _manifest_files(folder, manifest).items():
            data = _read_regular(folder / fname, size, MAX_FILE_BYTES)
            if hashlib.sha256(data).hexdigest() != digest:
                raise CheckpointError(f"{folder / fname} does not match its manifest (SHA-256)")
            out[fname] = data
        return out
    except (OSError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"incomplete checkpoint {folder}: {e}") from e


def _manifest_files(folder: Path, manifest: Any) -> dict[str, tuple[int, str]]:
    """``{name: (bytes, sha256)}`` from a manifest, or a one-line CheckpointError naming what is wrong."""
    where = folder / _MANIFEST
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "state.json" not in files or len(files) > _MAX_FILES:
        raise CheckpointError(
            f"{where}: expected a 'files' table naming state.json (at most {_MAX_FILES} files)"
        )
    out = {}
    for fname, meta in files.items():
        if not _FILE_NAME.fullmatch(fname):
            raise CheckpointError(
                f"{where} names the file {fname!r}; allowed: state.json or NAME.safetensors, a "
                "plain name inside the checkpoint folder"
            )
        size = meta.get("bytes") if isinstance(meta, dict) else None
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_BYTES:
            raise CheckpointError(
                f"{where}: {fname} has size {size!r}; allowed: 0 to {MAX_FILE_BYTES} bytes"
            )
        if not isinstance(digest, str) or not re.fullmatch("[0-9a-f]{64}", digest):
            raise CheckpointError(f"{where}: {fname} has no valid sha256 (64 hex digits)")
        out[fname] = (size, digest)
    return out


def _read_regular(path: Path, size: int | None, limit: int) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO or device) of ``size``
    bytes (any if ``None``) and at most ``limit``, all checked before reading."""
    kind = _kind(os.lstat(path).st_mode)
    if kind == "regular file":
        # O_NOFOLLOW and O_NONBLOCK: a name swapped for a link or FIFO after lstat fails or returns
        # at once instead of escaping the folder or blocking; fstat then checks what was opened.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        with open(os.open(path, flags | getattr(os, "O_BINARY", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            kind = _kind(st.st_mode)
            if kind == "regular file":
                if st.st_size > limit or (size is not None and st.st_size != size):
                    want = f"{size} (its manifest)" if size is not None else f"at most {limit}"
                    raise CheckpointError(f"{path} has {st.st_size} bytes; expected {want}")
                data = f.read(st.st_size + 1)
                if len(data) != st.st_size:
                    raise CheckpointError(f"{path} changed size while it was read")
                return data
    raise CheckpointError(f"{path} is a {kind}; a checkpoint holds only regular files")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISLNK, "symbolic link"),
                       (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO")):  # fmt: skip
        if test(mode):
            return name
    return "device or socket"


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete, verified checkpoint folder of ``run_dir``, or ``None``.

    A newer checkpoint with a manifest that fails verification (truncated, tampered) is skipped with a
    ``CheckpointWarning`` naming it, what is wrong, and the checkpoint used instead.
    """
    run_dir = Path(run_dir)
    corrupt = []
    for step in reversed(_complete_steps(run_dir)):
        folder = _step_dir(run_dir, step)
        try:
            _read_verified(folder)
        except CheckpointError as e:
            corrupt.append(str(e))
            continue
        break
    else:
        folder = None
    if corrupt:
        used = f"using {folder} instead" if folder else "no other complete checkpoint"
        warnings.warn(
            f"skipped corrupt checkpoint: {'; '.join(corrupt)}; {used}",
            CheckpointWarning,
            stacklevel=2,
        )
    return folder


def clean_partial(run_dir: str | os.PathLike, *, but: int | None = None) -> list[Path]:
    """Delete the step folders of ``run_dir`` without a manifest (writes killed half-way), except step
    ``but``; return what was deleted. Folders with a manifest, valid or not, are left alone."""
    gone = []
    for p in sorted((Path(run_dir) / _DIR).glob("step_*")):
        if p.name[5:].isdigit() and int(p.name[5:]) != but and not (p / _MANIFEST).exists():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def load(folder: str | os.PathLike) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Read a checkpoint folder: ``(tensor groups, state)``. Verifies sizes and hashes; runs no code.

    Raises:
        CheckpointError: (a ValueError) naming the file and what is wrong with it.
    """
    folder = Path(folder)
    blobs = _read_verified(folder)
    try:
        state = json.loads(blobs.pop("state.json"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{folder / 'state.json'} is not valid JSON: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{folder / 'state.json'} holds {type(state).__name__}, not an object"
        )
    tensors = {}
    for fname, data in blobs.items():
        try:
            tensors[fname.removesuffix(".safetensors")] = st_load(data)
        except SafetensorError as e:
            raise CheckpointError(
                f"{folder / fname} is not a valid safetensors file: {e}"
            ) from None
    return tensors, state


# -- optimiser and RNG state as tensors + JSON ---------------------------------------------------


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    """Split ``opt.state_dict()`` into tensors ``{"<param id>.<key>": t}`` and JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if not isinstance(val, Tensor):
                raise TypeError(
                    f"optimizer state {pid}.{key} is {type(val).__name__}, not a tensor"
                )
            tensors[f"{pid}.{key}"] = val
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, groups


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict]
) -> None:
    """Inverse of ``optimizer_to_tensors``: load the state into ``opt``."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, val in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_to_json(state: Tensor) -> str:
    """A generator state (a uint8 tensor) as base64 text."""
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def rng_from_json(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()
