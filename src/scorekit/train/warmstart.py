"""Warm start (``scorekit train --init RUN``): a new run whose weights start from another run's.

This is fine-tuning: the new run has its own folder, log, optimiser (fresh AdamW moments, warm-up
from step 0) and step count, and only the weights come from the other run. They are taken from the
other run's **EMA** (the weights its samples come from), and the new run's EMA starts from them too.
A typical use: a conditional run continued with another loss, e.g. ``--guidance-free 2`` from a
plain ``--cond`` run (Tang et al. 2025 fine-tune pretrained models the same way).

``--init`` names a run folder (its newest complete checkpoint) or one checkpoint folder
(``RUN/checkpoints/step_000001000``). The network configuration is the other run's: ``--net`` may
not change it, and the data must have the same shape (each difference is a one-line error). The
checkpoint is read by ``scorekit.train.checkpoint.load``: sizes and hashes verified, no code run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from scorekit.train import checkpoint as ckpt


def check_init(init: Any) -> None:
    """``--init`` is ``None`` or a non-empty folder name, or a one-line error."""
    if init is not None and not (isinstance(init, str) and init):
        raise ValueError(f"--init must name a run or checkpoint folder; got {init!r}")


def init_checkpoint(path: str) -> Path:
    """The checkpoint folder ``--init`` names: ``path`` itself when it is one, else the newest complete
    checkpoint of the run folder ``path``."""
    p = Path(path)
    if (p / "state.json").is_file() or p.name.startswith("step_"):
        return p
    if not p.is_dir():
        raise ValueError(f"--init: {path!r} is not a folder; allowed: a run folder or one of its "
                         "checkpoints (RUN/checkpoints/step_N)")  # fmt: skip
    folder = ckpt.latest(p)
    if folder is None:
        raise ValueError(f"--init: {path!r} holds no complete checkpoint; allowed: a run folder "
                         "with one (train it first) or a checkpoint folder")  # fmt: skip
    return folder


def init_weights(
    cfg: Any, net_cfg: dict[str, Any], shape: list[int]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(network config, EMA weights)`` of the run ``cfg.init`` names, checked against this run.

    Args:
        cfg: this run's ``TrainConfig`` (its ``init``, ``net`` overrides, ``process`` and ``param``
            must agree with the other run's: the weights mean a denoiser only in their own
            parameterisation).
        net_cfg: the network configuration this run would build without ``--init``.
        shape: this run's data shape.
    """
    folder = init_checkpoint(cfg.init)
    try:
        tensors, state = ckpt.load(folder)
    except (ValueError, OSError) as e:
        raise ValueError(f"--init: {folder} is not a readable checkpoint ({e})") from None
    theirs, data = state.get("net"), state.get("data", {})
    their_cfg = state.get("config", {}) if isinstance(state.get("config"), dict) else {}
    for key in ("process", "param"):
        if key in their_cfg and their_cfg[key] != getattr(cfg, key):
            raise ValueError(f"--init: {folder} was trained with --{key} {their_cfg[key]}, this run "
                             f"has --{key} {getattr(cfg, key)}; allowed: the same --{key} (the "
                             "weights mean a denoiser only in their own parameterisation)")  # fmt: skip
    if not isinstance(theirs, dict) or "ema" not in tensors:
        raise ValueError(f"--init: {folder} is not a denoiser checkpoint of scorekit train "
                         "(no network config or EMA weights)")  # fmt: skip
    if list(data.get("shape", [])) != list(shape):
        raise ValueError(f"--init: {folder} was trained on data of shape {data.get('shape')}, this "
                         f"run's data has shape {list(shape)}; allowed: a run on data of this shape")  # fmt: skip
    clash = {k: v for k, v in cfg.net.items() if theirs.get(k) != v}
    if clash:
        raise ValueError(f"--init: --net {clash} differs from the network of {folder} "
                         f"({ {k: theirs.get(k) for k in clash} }); allowed: no --net, or its values")  # fmt: skip
    if theirs.get("num_classes", 0) != net_cfg.get("num_classes", 0):
        raise ValueError(f"--init: {folder} has num_classes={theirs.get('num_classes', 0)}, this run "
                         f"needs {net_cfg.get('num_classes', 0)} (--cond on a labelled data set "
                         "needs a conditional run to start from, and vice versa)")  # fmt: skip
    return dict(theirs), tensors["ema"]
