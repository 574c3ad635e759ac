"""``scorekit likelihood``: per-example log-likelihoods of a data file under a trained run.

Reads the data in its own units (a built-in name, ``.npy``, ``.csv`` or an image folder), maps it
into the run's model units with the run's normalisation, and writes one CSV row per example:
the probability-flow ODE log-likelihood in nats of the model-unit point (``--divergence``), its
Hutchinson standard error, optionally the ELBO (``--elbo``), and bits per dimension in the data's
units (``--bpd``; with ``--dequantize`` the data are treated as integer levels and uniformly
dequantised, so bits/dim bound ``-log2 P(levels) / d``; see ``scorekit.likelihood.discrete``).
The CSV is written atomically; a summary is printed.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time
from pathlib import Path

import torch

from scorekit._util import atomic_write
from scorekit.cli import add_model_source, check_output, load_model_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    add_model_source(parser)  # --run RUN_DIR or --diffusers PATH [--subfolder unet]
    a(
        "--data",
        required=True,
        help="built-in name (e.g. digits) or a .npy/.csv file or image folder",
    )
    a("--out", required=True, metavar="FILE.csv",
      help="per-example results (written atomically; its folder must exist)")  # fmt: skip
    a("--divergence", choices=("exact", "hutchinson"), default="hutchinson",
      help="divergence of the ODE drift: exact (d backward passes per step) or Hutchinson (default)")  # fmt: skip
    a("--probes", type=int, default=4, help="Hutchinson probes per example (default 4)")
    a("--probe", choices=("rademacher", "gaussian"), default="rademacher")
    a("--dequantize", action="store_true",
      help="data are integer levels: add U[-1/2, 1/2) noise and report a bound on log P(levels)")  # fmt: skip
    a("--bpd", action="store_true", help="also report bits per dimension (in the data's units)")
    a("--elbo", action="store_true", help="also report the variational bound (cheaper, lower)")
    a("--n-sigma", type=int, default=64, help="ELBO Monte Carlo points per example (default 64)")
    a("--no-ode", action="store_true", help="skip the ODE likelihood (with --elbo: ELBO only)")
    a("--split", choices=("all", "train", "test"), default="all",
      help="which part of a built-in data set: the run's holdout split or all (default all)")  # fmt: skip
    a("--holdout", type=float, default=None,
      help="holdout fraction for --split (default: the run's own holdout)")  # fmt: skip
    a("--limit", type=int, default=None, help="use only the first N examples")
    a("--sigma-min", type=float, default=None, help="default: the run's sigma_min (at least 2e-3)")
    a("--sigma-max", type=float, default=None, help="default: the run's sigma_max (at most 80)")
    a("--rtol", type=float, default=1e-5)
    a("--atol", type=float, default=1e-5)
    a("--batch", type=int, default=64, help="examples solved together (default 64)")
    a("--seed", type=int, default=0, help="seed of probes, dequantisation and ELBO noise")
    a("--device", default="cpu")
    a("--float64", action="store_true", help="solve in float64 (slower, tighter)")
    a("--debug", action="store_true", help="show tracebacks")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from scorekit.data import Normalization
    from scorekit.likelihood import bits_per_dim, dequantize, elbo, log_likelihood
    from scorekit.likelihood.discrete import log_det_normalization
    from scorekit.runs import load_levels

    out = check_output(args.out, suffixes=(".csv",))  # before any work, like every check below
    if args.no_ode and not args.elbo:
        raise ValueError("--no-ode leaves nothing to compute; add --elbo")
    for name in ("probes", "batch", "n_sigma"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.n_sigma % 2:
        raise ValueError(f"--n-sigma must be even (antithetic strata pairs); got {args.n_sigma}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1; got {args.limit}")
    denoiser, info = load_model_source(args, device=args.device)
    dtype = torch.float64 if args.float64 else torch.float32
    denoiser = denoiser.to(dtype)
    raw = load_levels(args.data, info, split=args.split, holdout=args.holdout)
    if args.limit is not None:
        raw = raw[: args.limit]
    norm = Normalization.from_dict(info["normalization"])
    if args.dequantize:
        off = (raw - raw.round()).abs().max()
        if off > 1e-4:
            raise ValueError(
                f"--dequantize needs integer levels; --data {args.data} has values {float(off):.3g} "
                "away from whole numbers"
            )
        raw = raw.round()
    sigma_min = args.sigma_min if args.sigma_min is not None else max(info["sigma_min"], 2e-3)
    sigma_max = args.sigma_max if args.sigma_max is not None else min(info["sigma_max"], 80.0)
    d = math.prod(info["shape"])
    scale = torch.tensor(norm.scale, dtype=torch.float64)
    log_det = log_det_normalization(scale if scale.numel() > 1 else float(scale), d)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    n = raw.shape[0]
    # the ELBO's control variate: one Gaussian for the whole file, so no row depends on its batch
    flat = norm.encode(raw).reshape(n, -1).to(device=args.device, dtype=dtype)
    var = flat.var(0, unbiased=False) if n > 1 else torch.ones_like(flat[0])
    reference = (flat.mean(0), var.clamp_min(sigma_min**2))

    cols: dict[str, list[float]] = {"ode_nats": [], "ode_stderr": [], "elbo_nats": [],
                                    "elbo_stderr": []}  # fmt: skip
    nfes, t_ode, t_elbo = [], 0.0, 0.0
    # disable=None: a bar on a terminal only, so a log or a one-line error stays clean
    batches = range(0, n, args.batch)
    for start in tqdm(batches, desc="likelihood", unit="batch", leave=False, disable=None):
        chunk = raw[start : start + args.batch]
        if args.dequantize:
            chunk = dequantize(chunk, generator=torch.Generator().manual_seed(args.seed + start))
        x = norm.encode(chunk).to(device=args.device, dtype=dtype)
        if not args.no_ode:
            t0 = time.perf_counter()
            lp, li = log_likelihood(
                denoiser, x, sigma_min=sigma_min, sigma_max=sigma_max, divergence=args.divergence,
                n_probes=args.probes, probe=args.probe, rtol=args.rtol, atol=args.atol,
                generator=gen, return_info=True,
            )  # fmt: skip
            t_ode += time.perf_counter() - t0
            nfes.append(li.nfe)
            cols["ode_nats"] += lp.double().tolist()
            se = li.stderr if li.stderr is not None else torch.full_like(lp, float("nan"))
            cols["ode_stderr"] += se.double().tolist()
        if args.elbo:
            t0 = time.perf_counter()
            b, ei = elbo(denoiser, x, sigma_min=sigma_min, sigma_max=sigma_max,
                         n_sigma=args.n_sigma, reference=reference, generator=gen,
                         return_info=True)  # fmt: skip
            t_elbo += time.perf_counter() - t0
            cols["elbo_nats"] += b.double().tolist()
            cols["elbo_stderr"] += ei.stderr.double().tolist()

    header, table = ["index"], [list(range(n))]
    for key in ("ode", "elbo"):
        if not cols[f"{key}_nats"]:
            continue
        vals = torch.tensor(cols[f"{key}_nats"], dtype=torch.float64)
        header += [
            f"{key}_nats" if key == "elbo" else "ode_log_likelihood_nats",
            f"{key}_stderr_nats",
        ]
        table += [cols[f"{key}_nats"], cols[f"{key}_stderr"]]
        if args.bpd:
            header.append(f"{key}_bits_per_dim")
            table.append(bits_per_dim(vals, dim=d, log_det_jacobian=log_det).tolist())
    rows = [list(r) for r in zip(*table, strict=True)]
    _write_csv(out, header, rows)

    what = "log P(levels) lower bound" if args.dequantize else "log-density"
    print(f"scorekit likelihood: {n} examples of {args.data} under {args.run or args.diffusers} "
          f"(sigma_min={sigma_min:g}, sigma_max={sigma_max:g}, d={d}); {what}")  # fmt: skip
    for key, label, t in (("ode", f"ODE ({args.divergence})", t_ode), ("elbo", "ELBO", t_elbo)):
        if not cols[f"{key}_nats"]:
            continue
        vals = torch.tensor(cols[f"{key}_nats"], dtype=torch.float64)
        sem = float(vals.std() / math.sqrt(n)) if n > 1 else float("nan")
        line = f"  {label:<18} mean {float(vals.mean()):.4f} nats  (std err {sem:.4f})"
        if args.bpd:
            bpd = bits_per_dim(vals, dim=d, log_det_jacobian=log_det)
            line += f"   {float(bpd.mean()):.4f} bits/dim"
        cost = (f"NFE {sum(nfes) / len(nfes):.0f} per batch" if key == "ode"
                else f"{2 * args.n_sigma} denoiser calls per example")  # fmt: skip
        line += f"   {cost}   {1e3 * t / n:.1f} ms/example"
        print(line)
    print(f"  wrote {args.out}")
    return 0
