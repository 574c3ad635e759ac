"""``scorekit export``: write a training run as a self-contained, documented folder.

    scorekit export --run runs/digits --out exported/digits
    python -c "from scorekit.models import load_exported; d, info = load_exported('exported/digits')"

The folder holds ``model.safetensors`` (the run's EMA weights, or ``--weights model``),
``config.json`` (network, process, parameterisation, data layout, training figures) and a
``README.md`` model card; see ``scorekit.models.export`` for the layout. Loading reads JSON and
safetensors only, and gives the run's denoiser bit for bit.

A run whose network is a diffusers class (``scorekit train --net '{"type": "diffusers-unet2d"}'``)
also gets ``DIR/diffusers/``, a diffusers pipeline folder (``unet/``, ``scheduler/`` with an
``EDMEulerScheduler``, ``model_index.json``; see ``scorekit.models.diffusers_export``), loadable by
``scorekit.models.from_diffusers`` and by diffusers itself; ``--diffusers-pipeline`` demands it
(an error when the run cannot have one). scorekit's own networks are not diffusers classes, and a
diffusers folder whose model needs scorekit's code to load would have to run that code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from scorekit.cli import add_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    add_run_dir(parser)
    a("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    a("--weights", choices=("ema", "model"), default="ema", help="which weights (default ema)")
    a("--overwrite", action="store_true", help="write into a folder that already holds files")
    a("--diffusers-pipeline", action="store_true", help="also write DIR/diffusers/, a diffusers "
      "pipeline folder (default: when the run's network is a diffusers class and the run is EDM)")  # fmt: skip
    a("--debug", action="store_true", help="show tracebacks")


def _last_loss(run: Path) -> float | None:
    """The last loss in the run's log.jsonl, if any."""
    log = run / "log.jsonl"
    if not log.is_file():
        return None
    last = None
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("loss"), (int, float)):
            last = float(row["loss"])
    return last


def run(args: argparse.Namespace) -> int:
    from scorekit.models.export import save_exported
    from scorekit.runs import load_run
    from scorekit.train import checkpoint as ckpt

    run_dir = Path(args.run)
    folder = ckpt.latest(run_dir)
    if folder is None:
        raise FileNotFoundError(f"--run {run_dir}: no complete checkpoint (is it a training run?)")
    _, info = load_run(run_dir, weights=args.weights)  # validates the checkpoint as sampling would
    tensors, state = ckpt.load(folder)
    if args.diffusers_pipeline:  # refused before anything is written
        from scorekit.models.diffusers_export import check_pipeline

        check_pipeline(state["net"], info["process"], info["param"])
    training = {
        "step": int(state["step"]),
        "elapsed_s": float(state.get("elapsed", 0.0)) or None,
        "first_loss": state.get("first_loss"),
        "last_loss": _last_loss(run_dir),
        "data_sha256": state["data"].get("sha256"),
        "config": info["config"],
    }
    out = save_exported(
        args.out, net_config=state["net"], weights=tensors[args.weights], data=info,
        process=info["process"], param=info["param"], sigma_data=info["sigma_data"],
        training=training, which=args.weights, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"scorekit export: wrote {out}/ (model.safetensors, config.json, README.md) from "
          f"{folder.name} of {run_dir}", file=sys.stdout)  # fmt: skip
    _pipeline(args, out, state, tensors[args.weights], info)
    return 0


def _pipeline(args: argparse.Namespace, out: Path, state: dict, weights: dict, info: dict) -> None:
    """``out/diffusers/`` when asked, or by default when the run's network is a diffusers class."""
    from scorekit.models.diffusers_export import DIFFUSERS_NETS, save_diffusers_pipeline

    auto = state["net"].get("type") in DIFFUSERS_NETS and info["process"] == info["param"] == "edm"
    if not (args.diffusers_pipeline or auto):
        return
    target = out / "diffusers"
    if target.exists() and args.overwrite:
        shutil.rmtree(target)
    save_diffusers_pipeline(target, net_config=state["net"], weights=weights,
                            process=info["process"], param=info["param"],
                            sigma_data=info["sigma_data"])  # fmt: skip
    print(f"scorekit export: wrote {target}/ (a diffusers pipeline: unet/, scheduler/, "
          "model_index.json)", file=sys.stdout)  # fmt: skip
