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
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from scorekit._util import atomic_write, atomic_write_json

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_json",
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


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match its manifest."""


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

    Older checkpoints beyond the newest ``keep`` are deleted after the manifest is in place.
    Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    folder = _step_dir(run_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MANIFEST).unlink(missing_ok=True)  # a rewrite is incomplete until its new manifest
    sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
    files: dict[str, dict[str, Any]] = {}
    blobs = {f"{name}.safetensors": st_save(_contiguous(group)) for name, group in tensors.items()}
    blobs["state.json"] = (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()
    for fname, data in blobs.items():
        atomic_write(folder / fname, data)
        files[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if sleep:
            time.sleep(sleep)
    atomic_write_json(folder / _MANIFEST, {"step": step, "files": files})
    for old in _complete_steps(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(_step_dir(run_dir, old), ignore_errors=True)
    return folder


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
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        out = {}
        for fname, meta in manifest["files"].items():
            data = (folder / fname).read_bytes()
            if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CheckpointError(f"{folder / fname} does not match its manifest")
            out[fname] = data
        return out
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"incomplete checkpoint {folder}: {e}") from e


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete, verified checkpoint folder of ``run_dir``, or ``None``."""
    run_dir = Path(run_dir)
    for step in reversed(_complete_steps(run_dir)):
        folder = _step_dir(run_dir, step)
        try:
            _read_verified(folder)
        except CheckpointError:
            continue
        return folder
    return None


def load(folder: str | os.PathLike) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Read a checkpoint folder: ``(tensor groups, state)``. Verifies sizes and hashes; runs no code."""
    blobs = _read_verified(Path(folder))
    state = json.loads(blobs.pop("state.json"))
    tensors = {fname.removesuffix(".safetensors"): st_load(data) for fname, data in blobs.items()}
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
