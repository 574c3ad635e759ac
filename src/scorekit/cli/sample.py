"""``scorekit sample``: draw samples from a trained run and write them as ``.npy`` or ``.png``.

    scorekit sample --run runs/digits --n 64 --nfe 15 --out digits.png
    scorekit sample --run runs/ring --n 10000 --nfe 10 --sampler dpmpp_2m --out ring.npy
    scorekit sample --run runs/digits_cond --n 64 --nfe 20 --label 3 --guidance 2 --out threes.png
    scorekit sample --run runs/digits_cond --n 64 --label 3 --guidance apg --scale 4 --out threes.png
    scorekit sample --diffusers my_pipeline --subfolder unet --n 16 --nfe 10 --sampler dpmpp_2m --out x.png
    torchrun --nproc_per_node 2 $(which scorekit) sample --run runs/ring --n 100000 --nfe 10 --out r.npy

``.npy`` holds the samples decoded to the data's own units and layout (e.g. digits as ``[N, 8, 8]``
pixels 0..16); ``.png`` a grid of images or a scatter plot of 2-D points. Sample ``i`` depends only
on ``(--seed, i)``, so the same command gives the same samples on any number of processes.
"""

from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from scorekit.cli import add_model_source, guide


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    add_model_source(parser)  # --run RUN_DIR or --diffusers PATH [--subfolder unet]
    a(
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        required=True,
        help="number of samples (use --num-samples under torchrun)",
    )
    a("--nfe", type=int, default=None, help="denoiser calls per sample (default 20)")
    a(
        "--sampler",
        default="dpmpp_2m",
        help="sampler name (see scorekit.samplers.REGISTRY; default dpmpp_2m: bounded and among the "
        "best on trained networks, docs/choosing-a-sampler.md)",
    )
    a("--schedule", default="karras", help="noise schedule name (default karras)")
    a("--seed", type=int, default=0)
    guide.add_arguments(parser)  # --label, --guidance RULE|w, --scale, ... (scorekit.cli.guide)
    a("--weights", choices=("ema", "model"), default="ema")
    a("--batch", type=int, default=1000, help="samples per denoiser batch")
    a("--device", default="cpu")
    a("--out", required=True, metavar="FILE", help="output .npy (samples in data units) or .png")
    a("--no-progress", action="store_true")
    a("--threads", default="auto", help="torch CPU threads per process: auto (default: all cores, "
      "or half if other work holds a core at start; see scorekit.threads) or a whole number")  # fmt: skip
    a("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from scorekit._util import atomic_write, check_int
    from scorekit.cli import check_output, check_sampling, load_model_source
    from scorekit.runs import decode, generate, picture
    from scorekit.samplers import ADAPTIVE
    from scorekit.threads import start_threads
    from scorekit.train.distributed import setup, teardown

    start_threads(args.threads)  # a bad value is a one-line error before any work
    # Everything the user gave is checked before the run is loaded and the samples are drawn.
    suffix = check_output(args.out, suffixes=(".npy", ".png")).suffix.lower()
    check_int("--n", args.n)
    check_int("--batch", args.batch)
    adaptive = args.sampler in ADAPTIVE
    nfe = args.nfe if args.nfe is not None else (None if adaptive else 20)
    check_sampling(args.sampler, nfe, args.schedule)
    guide.check_arguments(args)
    dist = setup(args.device)
    try:
        denoiser, info = load_model_source(args, weights=args.weights, device=dist.device)
        denoiser, counted = guide.build(args, denoiser, info, device=dist.device)
        if args.guidance == "svdd":  # its own sampler: candidates per step (scorekit.cli.guide)
            x = guide.svdd_generate(args, denoiser, counted, info, nfe=nfe, dist=dist)
        else:
            x = generate(
                denoiser, info, args.n, batch=args.batch, dist=dist, progress=not args.no_progress,
                nfe=nfe, sampler=args.sampler, schedule=args.schedule, seed=args.seed,
                device=dist.device,
            )  # fmt: skip
    finally:
        teardown()
    if x is None:  # not rank 0
        return 0
    if not bool(np.isfinite(x.numpy()).all()):
        raise FloatingPointError("some samples are not finite; try more --nfe or another --sampler")
    if suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, decode(x, info), allow_pickle=False)
        atomic_write(args.out, buf.getvalue())
    else:
        title = (
            f"{info['name']}: {'svdd' if args.guidance == 'svdd' else args.sampler}, NFE {nfe}"
            + (f", label {args.label}" if args.label is not None else "")
            + (f", guidance {args.guidance}" if args.guidance is not None else "")
        )
        picture(args.out, x, info, title=title)
    print(
        f"wrote {args.n} samples to {args.out}{guide.nfe_line(counted, len(x))}",
        file=sys.stderr if suffix == ".npy" else sys.stdout,
    )
    return 0
