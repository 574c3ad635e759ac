"""Minority guidance on digits with a trained minority classifier (``scorekit bench guidance --digits
RUN --minority-run CLS``): how rare the samples are, and what that costs in fidelity, per scale.

``CLS`` is ``scorekit train-classifier --minority-of RUN --levels L``: a noise-conditional classifier
of the minority levels of RUN's training digits (Um et al., "Don't Play Favorites: Minority Guidance
for Diffusion Models", ICLR 2024; ``scorekit.guidance.minority_score`` / ``minority_levels``). RUN's
label-dropped branch (its own denoiser for an unconditional run) is sampled with
``classifier_guidance`` towards the top level ``L - 1`` at each scale of ``--minority-scales``
(``0``: unguided), ipndm with ``--minority-calls`` sampler calls, ``--minority-n`` samples, seed
``--minority-seed`` (held out: seed 0 was looked at first; seeds 1 and 2 in docs/guidance.md).

Per scale: the samples' mean minority score (the labels' own score: RUN's denoiser, the
classifier's sigma and draws, higher is rarer), the fraction above the top level's lower edge (20%
of the real digits by construction with ``L = 5``), FD-digits to all held-out digits (floor: as
many training digits) and to the held-out digits of the top level (floor: up to 4x as many training
top-level digits), network and classifier evaluations per sample (counted). A PNG grid of the
first 100 samples per scale, ``minority_w{scale}.png``, and ``guidance_minority.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scorekit import guidance as G
from scorekit._util import atomic_write_json
from scorekit.bench.guidance_digits import _judge
from scorekit.data import holdout_mask, load
from scorekit.metrics import frechet_distance
from scorekit.runs import draw, load_run, picture

__all__ = ["run_minority"]


def _branch(den, info: dict, counts: dict):
    """The run's label-dropped branch (its denoiser when unconditional), counting rows."""

    def d(x, sigma):
        counts["net"] += x.shape[0]
        if not info["num_classes"]:
            return den(x, sigma)
        return den(x, sigma, class_labels=torch.full((x.shape[0],), -1))

    return d


def _rare_reference(den, info: dict, lab: dict, judge) -> tuple:
    """FD features of the held-out top-level digits and the FD floor of training top-level ones."""
    ds = load("digits")
    scores = G.minority_score(_branch(den, info, {"net": 0}), ds.x, sigma=lab["sigma"],
                              draws=lab["draws"], seed=0)  # fmt: skip
    levels = torch.searchsorted(torch.tensor(lab["edges"], dtype=scores.dtype), scores)
    top = lab["levels"] - 1
    cfg = info["config"]
    test = holdout_mask(ds, holdout=float(cfg.get("holdout", 0.2)), seed=int(cfg.get("seed", 0)))
    rare_test, rare_train = ds.x[test & (levels == top)], ds.x[~test & (levels == top)]
    with torch.no_grad():
        feats = judge.fd_net.features(rare_test.float())
        floor = frechet_distance(
            judge.fd_net.features(rare_train[: 4 * len(rare_test)].float()), feats
        )
    return feats, floor, len(rare_test)


def run_minority(args) -> list[dict]:
    """The per-scale table (printed), the PNG grids and ``guidance_minority.json`` in ``--out``."""
    from scorekit.train.classifier import load_classifier

    rec = json.loads((Path(args.minority_run) / "classifier.json").read_text())
    lab = rec.get("labels")
    if not lab or "edges" not in lab:
        raise ValueError(f"--minority-run: {args.minority_run} is not a minority classifier (no "
                         "minority levels in classifier.json); allowed: the output of scorekit "
                         "train-classifier --minority-of RUN --levels L")  # fmt: skip
    den, info = load_run(args.digits)
    clf = load_classifier(args.minority_run, info)
    top, n, seed = lab["levels"] - 1, args.minority_n, args.minority_seed
    counts = {"net": 0, "clf": 0}
    u = _branch(den, info, counts)

    def log_p(x, sigma):
        counts["clf"] += x.shape[0]
        return F.log_softmax(clf(x, sigma), 1)[:, top].to(x.dtype)

    judge = _judge(info)
    rare_feats, rare_floor, n_rare = _rare_reference(den, info, lab, judge)
    sub = np.random.default_rng(0).permutation(len(judge.train_pixels))[:n]
    floor = frechet_distance(judge.train_feats[sub], judge.test_feats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"minority guidance on {args.digits} with {args.minority_run} (L = {lab['levels']}, "
          f"score sigma {lab['sigma']:.3g}, {lab['draws']} draws, top edge {lab['edges'][-1]:.2f}); "
          f"{n} samples, ipndm {args.minority_calls} calls, seed {seed} (held out)")  # fmt: skip
    print(f"FD floors: all held-out digits {floor:.2f}; the {n_rare} held-out top-level digits "
          f"{rare_floor:.2f}")  # fmt: skip
    print("| w | mean minority score | above top edge | FD-digits | FD to held-out top level "
          "| evaluations per sample (network + classifier) |\n|---|---|---|---|---|---|")  # fmt: skip
    rows = []
    for w in args.minority_scales:
        counts.update(net=0, clf=0)
        d = u if w == 0 else G.classifier_guidance(u, log_p, w)
        x = draw(d, info, n, nfe=args.minority_calls, sampler="ipndm", seed=seed)
        ne, nc = counts["net"] / n, counts["clf"] / n
        with torch.no_grad():
            feats = judge.fd_net.features(x.float())
        sc = G.minority_score(u, x, sigma=lab["sigma"], draws=lab["draws"], seed=1000 + seed)
        r = {"scale": w, "minority_score": float(sc.mean()),
             "above_top_edge": float((sc > lab["edges"][-1]).double().mean()),
             "fd": frechet_distance(feats, judge.test_feats), "fd_floor": floor,
             "fd_rare": frechet_distance(feats, rare_feats), "fd_rare_floor": rare_floor,
             "nfe_per_sample": ne, "classifier_per_sample": nc}  # fmt: skip
        rows.append(r)
        picture(out / f"minority_w{w:g}.png", x[:100], info,
                title=f"minority guidance, w = {w:g} (top level {top})")  # fmt: skip
        print(f"| {w:g} | {r['minority_score']:.2f} | {r['above_top_edge']:.3f} | {r['fd']:.2f} | "
              f"{r['fd_rare']:.2f} | {ne:.1f} + {nc:.1f} |", flush=True)  # fmt: skip
    result = {"run": str(args.digits), "classifier": str(args.minority_run), "seed": seed,
              "n": n, "sampler_calls": args.minority_calls, "rows": rows}  # fmt: skip
    atomic_write_json(out / "guidance_minority.json", result)
    print(f"wrote {out / 'guidance_minority.json'} and minority_w*.png")
    return rows
