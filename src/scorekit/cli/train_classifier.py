"""``scorekit train-classifier``: a noise-conditional classifier ``p(y | x, sigma)`` for classifier guidance.

    scorekit train-classifier --data digits --out runs/digits-clf --steps 2000 --holdout 0.2
    scorekit train-classifier --data digits --out runs/digits-dlsm --dlsm runs/digits-cond
    scorekit sample --run runs/digits-cond --label 3 --guidance classifier --scale 2 \\
        --classifier runs/digits-clf --out threes.png

A minority classifier (Um et al., "Don't Play Favorites: Minority Guidance for Diffusion Models",
ICLR 2024): ``--minority-of RUN --levels L`` labels every row of RUN's data (``--data`` defaults to
it) with its minority level, the ``1/L``-quantile bin of its Tweedie reconstruction loss
``|D(x0 + s z, s) - x0|^2`` under RUN's unconditional (label-dropped) denoiser, averaged over
``--minority-draws`` noise draws at ``s = --minority-sigma`` (``scorekit.guidance.minority_score``),
and trains the same classifier on those levels (the held-out rows stay the data's own split):

    scorekit train-classifier --minority-of runs/digits-cond --levels 5 --out runs/digits-minority
    scorekit sample --run runs/digits-cond --guidance classifier --classifier runs/digits-minority \
        --label 4 --scale 2 --out rare.png

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
    a("--data", help="a labelled built-in data set (digits, moons, ...) or file (with "
      "--minority-of: any data set; default the run's)")  # fmt: skip
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
    a("--minority-of", metavar="RUN_DIR", help="train on minority levels of this run's data")
    a("--levels", type=int, help="--minority-of: number of levels L (default 5)")
    a("--minority-sigma", type=float, help="--minority-of: the noise level s of the minority "
      "score (default 12.4 sigma_data: the authors' t = 600/1000 of ADM's linear schedule, "
      "sigma 6.2 for data of sigma_data 0.5)")  # fmt: skip
    a("--minority-draws", type=int, help="--minority-of: noise draws per point (5)")
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
    if args.data is None and args.minority_of is None:
        raise ValueError("--data is required (or --minority-of RUN_DIR, whose data is the default)")
    labels = label_info = None
    if args.minority_of is not None:
        labels, label_info, args.data = minority_labels(args)
    elif (args.levels, args.minority_sigma, args.minority_draws) != (None, None, None):
        raise ValueError(
            "--levels / --minority-sigma / --minority-draws need --minority-of RUN_DIR"
        )
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
        labels=labels, label_info=label_info,
    )  # fmt: skip
    acc = record["heldout_accuracy"]
    print(f"trained {record['train']['steps']} steps in {record['train']['seconds']:.0f} s; "
          f"held-out accuracy by sigma: {json.dumps(acc)}; wrote {args.out}")  # fmt: skip
    return 0


def unconditional(run_dir: str):
    """``(D_u, info)``: a run's denoiser with the label dropped (conditional runs) or as it is."""
    import torch

    from scorekit.runs import load_run

    den, info = load_run(run_dir)
    if not info["num_classes"]:
        return den, info
    return (lambda x, s: den(x, s, class_labels=torch.full((x.shape[0],), -1))), info


def minority_labels(args: argparse.Namespace) -> tuple:
    """``(levels [N], label_info, data name)``: the minority level of every row (``--minority-of``)."""
    from scorekit import data as sdata
    from scorekit._util import check_int, check_number
    from scorekit.guidance import minority_levels, minority_score

    levels = check_int("--levels", 5 if args.levels is None else args.levels, least=2, most=1000)
    draws = check_int("--minority-draws", 5 if args.minority_draws is None else args.minority_draws,
                      most=10_000)  # fmt: skip
    den, info = unconditional(args.minority_of)
    name = args.data if args.data is not None else info["config"]["data"]
    ds = sdata.load(name, seed=args.seed)
    if list(ds.shape) != list(info["shape"]) or ds.normalization.to_dict() != info["normalization"]:
        raise ValueError(f"--data {name}: its shape / normalisation is not --minority-of "
                         f"{args.minority_of}'s (shape {info['shape']})")  # fmt: skip
    sd = float(info["sigma_data"])
    s = 12.4 * sd if args.minority_sigma is None else args.minority_sigma
    s = check_number("--minority-sigma", s, low=0, low_ok=False)
    scores = minority_score(den, ds.x, sigma=s, draws=draws, seed=args.seed)
    labels, edges = minority_levels(scores, levels)
    return labels, {"kind": "minority", "run": str(args.minority_of), "sigma": s, "draws": draws,
                    "levels": levels, "edges": [float(e) for e in edges]}, name  # fmt: skip
