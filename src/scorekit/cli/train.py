"""``scorekit train``: train a denoiser on a built-in data set or your own file; also under torchrun.

scorekit train --data digits --out runs/digits --minutes 10
scorekit train --data ring --out runs/ring --steps 2000 --process flow --param flow
torchrun --nproc_per_node 2 $(which scorekit) train --data moons --out runs/m --steps 1000
scorekit train --out runs/digits --resume --steps 20000     # continue exactly where it stopped
scorekit train --data digits --cond --guidance-free 2 --init runs/digits-cond --out runs/gf --steps 300

``--resume`` restores the run's whole configuration; an option given again may change the run length,
cadence or device (a note is printed) and is refused if it would change the model or the data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scorekit.denoiser import PARAMETERIZATIONS
from scorekit.process import PROCESSES
from scorekit.train.loss import WEIGHTINGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a(
        "--data",
        help="built-in name (moons, swiss_roll, ring, checkerboard, pinwheel, digits) or a .npy/.csv/image folder",
    )
    a(
        "--out",
        required=True,
        metavar="RUN_DIR",
        help="run folder: config, log, checkpoints, pictures",
    )
    a("--steps", type=int, help="stop after this many optimiser steps")
    a("--minutes", type=float, help="stop after this much training time (summed over resumes)")
    a("--batch", type=int, help="global batch size, split across processes (default 256)")
    a("--lr", type=float, help="peak AdamW learning rate (default 2e-3)")
    a("--warmup", type=int, help="linear learning-rate warm-up steps (default 100)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    a("--grad-clip", type=float, help="clip the gradient norm to this (0: off; default 1)")
    a(
        "--process",
        choices=sorted(PROCESSES),
        help="forward process: noise levels drawn in training (default edm)",
    )
    a("--param", choices=sorted(PARAMETERIZATIONS), help="what the network predicts (default edm)")
    a(
        "--weighting",
        choices=sorted(WEIGHTINGS),
        help="loss weighting w(sigma) (default: the one matching --param)",
    )
    a("--cond", action="store_true", default=None, help="class-conditional (needs labels)")
    a(
        "--label-dropout",
        type=float,
        help="probability of dropping a label to -1 for classifier-free guidance (default 0.1)",
    )
    a("--guidance-free", type=float, help="learn the CFG denoiser of this scale (> 1) directly: "
      "guided samples in one call per step (Tang et al. 2025; needs --cond)")  # fmt: skip
    a("--init", metavar="RUN_DIR", help="fine-tune: start the weights from another run's EMA (its "
      "newest checkpoint, or a checkpoint folder); fresh optimiser and step 0 (scorekit.train.warmstart)")  # fmt: skip
    a(
        "--ema",
        type=float,
        help="EMA: decay per step if < 1, else half-life in examples, capped at 5%% of the examples seen (default 500000)",
    )
    a("--holdout", type=float, help="fraction of the data kept out of training (default 0)")
    a("--net", type=json.loads, help="JSON overriding the network config, e.g. '{\"hidden\": 128}'")
    a("--ckpt-every", type=int, help="steps between checkpoints (default 500)")
    a("--sample-every", type=int, help="steps between sample pictures (0: off; default 0)")
    a("--log-every", type=int, help="steps between log lines (default 50)")
    a(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in RUN_DIR",
    )
    a(
        "--overwrite",
        action="store_true",
        help="RUN_DIR holds a run: delete its config, log, checkpoints and pictures, and start afresh",
    )
    a("--seed", type=int, help="seed of data order, noise and initial weights (default 0)")
    a("--device", help="cpu or cuda (default cpu)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--threads", default="auto", help="torch CPU threads per process: auto (default: all cores, "
      "dropping to half while another process competes for them; see scorekit.threads) or a "
      "whole number to pin (bitwise-reproducible training)")  # fmt: skip
    a("--debug", action="store_true", help="show tracebacks")


def config_from_args(args: argparse.Namespace):
    """A ``TrainConfig`` from the options given (unset options keep the defaults)."""
    from scorekit.train.loop import TrainConfig

    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k in TrainConfig.__dataclass_fields__ and k != "net"
    }
    if args.net is not None:
        if not isinstance(args.net, dict):
            raise ValueError(f"--net must be a JSON object, got {args.net!r}")
        given["net"] = args.net
    return TrainConfig(**given), given


def _saved_config(out: Path) -> dict | None:
    """The configuration of the run in ``out`` (``config.json``, else its newest checkpoint), or None."""
    from scorekit.train import checkpoint as ckpt

    path = out / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"--resume: {path} is not a run configuration ({e}); --overwrite to start afresh"
            ) from None
    folder = ckpt.latest(out)
    return None if folder is None else ckpt.load(folder)[1]["config"]


def run(args: argparse.Namespace) -> int:
    from scorekit.threads import parse_threads
    from scorekit.train.distributed import teardown
    from scorekit.train.loop import train

    threads = parse_threads(args.threads)
    cfg, given = config_from_args(args)
    saved = _saved_config(Path(args.out)) if args.resume else None
    if saved is not None:
        # The run's whole configuration, with the options given again on top: train() prints a
        # note for each cadence/length/device change and refuses a change of the model or data.
        cfg = type(cfg).from_dict({**saved, **given, "out": args.out})
    elif args.data is None:
        raise ValueError("--data is required (unless --resume finds a run in --out)")
    try:
        result = train(
            cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
            threads=threads,
        )  # fmt: skip
    finally:
        teardown()
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.steps_per_second == 0:  # --resume of a run already at its length: say so
        print(f"the run in {result.run_dir} is already at step {result.step}; nothing to train "
              "(give a larger --steps or --minutes with --resume)")  # fmt: skip
        return 0
    last = f"{result.log[-1]['loss']:.4f}" if result.log else "none this session"
    print(
        f"trained to step {result.step} ({result.steps_per_second:.1f} steps/s this session), "
        f"last logged loss {last}; run folder: {result.run_dir}"
    )
    return 0
