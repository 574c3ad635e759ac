"""``scorekit train-classifier``: a noise-conditional classifier ``p(y | x, sigma)`` for classifier guidance.

    scorekit train-classifier --data digits --out runs/digits-clf --steps 2000 --holdout 0.2
    scorekit train-classifier --data digits --out runs/digits-dlsm --dlsm runs/digits-cond
    scorekit sample --run runs/digits-cond --label 3 --guidance classifier --scale 2 \\
        --classifier runs/digits-clf --out threes.png

``--dlsm RUN`` adds the denoising-likelihood-score-matching loss with RUN's unconditional denoiser (the
label-dropped branch of a conditional run), so that the classifier's *gradient* matches the score
difference that guidance needs (``scorekit.train.classifier``). The held-out accuracy per noise level
is printed and stored in ``classifier.json``.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--data", required=True, help="a labelled built-in data set (digits, moons, ...) or file")
    a("--out", required=True, metavar="CLS_DIR", help="folder for classifier.safetensors + .json")
    a("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    a("--minutes", type=float, help="stop after this much time")
    a("--holdout", type=float, default=0.2, help="fraction held out for the accuracy (default 0.2)")
    a("--batch", type=int, default=256)
    a("--lr", type=float, default=2e-3)
    a("--hidden", type=int, default=256)
    a("--depth", type=int, default=3)
    a("--dlsm", metavar="RUN_DIR", help="add the DLSM loss with this run's unconditional denoiser")
    a("--dlsm-weight", type=float, default=1.0, help="lambda of CE + lambda DLSM (default 1)")
    a("--seed", type=int, default=0)
    a("--threads", default="auto", help="torch CPU threads: auto or a whole number")
    a("--no-progress", action="store_true")
    a("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    import torch

    from scorekit._util import check_int, check_number
    from scorekit.threads import start_threads
    from scorekit.train.classifier import train_classifier

    start_threads(args.threads)
    check_int("--steps", args.steps)
    check_int("--batch", args.batch)
    check_number("--holdout", args.holdout, low=0, high=1, high_ok=False)
    check_number("--dlsm-weight", args.dlsm_weight, low=0)
    if args.minutes is not None:
        check_number("--minutes", args.minutes, low=0, low_ok=False)
    uncond = None
    if args.dlsm is not None:
        from scorekit.runs import load_run

        den, info = load_run(args.dlsm)
        if info["num_classes"]:
            uncond = lambda x, s: den(x, s, class_labels=torch.full((x.shape[0],), -1))  # noqa: E731
        else:
            uncond = den
    record = train_classifier(
        args.data, args.out, steps=args.steps, minutes=args.minutes, holdout=args.holdout,
        batch=args.batch, lr=args.lr, hidden=args.hidden, depth=args.depth, uncond=uncond,
        dlsm_weight=args.dlsm_weight, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    acc = record["heldout_accuracy"]
    print(f"trained {record['train']['steps']} steps in {record['train']['seconds']:.0f} s; "
          f"held-out accuracy by sigma: {json.dumps(acc)}; wrote {args.out}")  # fmt: skip
    return 0
