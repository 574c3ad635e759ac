"""``scorekit bench likelihood``: accuracy and cost of the ODE likelihood and the ELBO; OOD AUROC.

Part 1, exact targets (always). Gaussian mixtures with a closed-form noised density
(``ring8`` 2-D, a 16-D 4-component mixture, ``gmm64`` 64-D), exact denoisers, float64, 64 points
each drawn from the target. For ``sigma_min = 0.01``, ``sigma_max = 100`` we report, per dimension,
the mean absolute error of the ODE log-likelihood against ``log p_{sigma_min}(x)`` (exact divergence
and Hutchinson with 4 Rademacher probes), the Hutchinson standard error, the NFE of dopri5 at the
default ``rtol = atol = 1e-5`` and the wall time per example; and for the ELBO (64 stratified
points) the mean gap ``log p - ELBO`` per dimension and its standard error. For an exact denoiser
the continuous-time bound is tight, so the gap must be zero within its standard error.

Part 2, digits (when a run is given or ``runs/digits_lik`` exists; see ``--run``). The held-out split
of scikit-learn's digits (the run's own ``holdout``, seed as the run), pixels as integer levels
0..16, uniformly dequantised in centred bins, bits/dim in the data's units (levels) for the ODE
likelihood (Hutchinson) and the ELBO, with NFE and time per example. OOD: the multiscale score-norm
detector fitted on the training split, scored on held-out digits against noise-corrupted digits
(Gaussian noise of std 0.2 and 0.5 in model units, i.e. 1.6 and 4 levels) and pixel-shuffled digits
(each image's 64 pixels randomly permuted), and the harder faint noise (std 0.05, 0.1) and
upside-down digits; AUROC of the detector and of ``-log p`` from the ODE
(on ``--n-ood`` examples per set, one probe, ``rtol = atol = 1e-3``: a ranking needs no more).
The dequantised ELBO is also given at ``sigma_min = 0.01`` and ``0.05``: ``p_{sigma_min}`` is a valid
density for any ``sigma_min``, and a model trained on the 17 level values is smoother at larger ones.

Baselines on the same held-out levels: uniform over 17 levels (log2 17 = 4.09 bits/dim),
independent per-pixel histograms, and the full-covariance Gaussian fitted to the dequantised
training split.

Times are wall-clock on whatever machine runs the bench (shared CPUs vary); the ratio ELBO/ODE time
per example is measured in the same process and is the comparable figure.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from scorekit._util import atomic_write_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="bench_out/likelihood", help="output folder (JSON)")
    a("--run", default=None, help="digits training run (default runs/digits_lik if it exists)")
    a("--n-test", type=int, default=128, help="held-out digits for bits/dim (default 128)")
    a("--n-ood", type=int, default=32, help="examples per set for the likelihood OOD score")
    a("--probes", type=int, default=2, help="Hutchinson probes on digits (default 2)")
    a("--quick", action="store_true", help="exact targets only, small batches")
    a("--seed", type=int, default=0)


def _mixture16():
    from scorekit.analytic import GaussianMixture

    g = torch.Generator().manual_seed(0)
    k, d = 4, 16
    means = torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) / math.sqrt(2 * d)
    covs = 0.2 * (a @ a.mT + 0.2 * torch.eye(d, dtype=torch.float64))
    return GaussianMixture(means - means.mean(0), covs)


def _exact_targets(n: int, seed: int) -> list[dict]:
    from scorekit.analytic import target
    from scorekit.likelihood import elbo, log_likelihood

    smin, smax = 0.01, 100.0
    rows = []
    for name, gm in (
        ("ring8", target("ring8")),
        ("mix16", _mixture16()),
        ("gmm64", target("gmm64")),
    ):
        x = gm.sample(n, torch.Generator().manual_seed(seed))
        exact = gm.log_prob(x, smin)
        d = gm.dim
        row = {"target": name, "d": d, "n": n}
        for div in ("exact", "hutchinson"):
            t0 = time.perf_counter()
            lp, info = log_likelihood(
                gm, x, sigma_min=smin, sigma_max=smax, divergence=div, n_probes=4,
                generator=torch.Generator().manual_seed(seed + 1), return_info=True,
            )  # fmt: skip
            dt = (time.perf_counter() - t0) / n
            row[div] = {
                "mean_abs_err_nats_per_dim": float((lp - exact).abs().mean() / d),
                "max_abs_err_nats_per_dim": float((lp - exact).abs().max() / d),
                "mean_stderr_nats_per_dim": float(info.stderr.mean() / d),
                "nfe": info.nfe,
                "ms_per_example": 1e3 * dt,
            }
        t0 = time.perf_counter()
        b, ei = elbo(gm, x, sigma_min=smin, sigma_max=smax, n_sigma=64,
                     generator=torch.Generator().manual_seed(seed + 2), return_info=True)  # fmt: skip
        dt = (time.perf_counter() - t0) / n
        gap = exact - b
        row["elbo"] = {
            "mean_gap_nats_per_dim": float(gap.mean() / d),
            "stderr_of_mean_gap_per_dim": float(ei.stderr.square().sum().sqrt() / n / d),
            "mean_stderr_nats_per_dim": float(ei.stderr.mean() / d),
            "denoiser_calls_per_example": ei.nfe,
            "ms_per_example": 1e3 * dt,
        }
        rows.append(row)
    return rows


def _digits(run_dir: str, args) -> dict:
    from scorekit.data import Normalization
    from scorekit.likelihood import (
        OODDetector,
        auroc,
        bits_per_dim,
        dequantize,
        elbo,
        log_det_normalization,
        log_likelihood,
    )
    from scorekit.runs import load_levels, load_run

    den, info = load_run(run_dir)
    norm = Normalization.from_dict(info["normalization"])
    smin, smax = max(info["sigma_min"], 2e-3), min(info["sigma_max"], 80.0)
    d = math.prod(info["shape"])
    log_det = log_det_normalization(norm.scale[0], d)
    test = load_levels("digits", info, split="test").round()
    train = load_levels("digits", info, split="train").round()
    g = torch.Generator().manual_seed(args.seed)
    lv = test[: args.n_test]
    y = norm.encode(dequantize(lv, generator=g))
    out = {"run": run_dir, "step": info["step"], "sigma_min": smin, "sigma_max": smax,
           "n_test": int(lv.shape[0]), "n_train": int(train.shape[0])}  # fmt: skip
    out["baselines_bits_per_dim"] = _baselines(train, lv, norm, d, log_det, g)
    print(f"digits baselines: {out['baselines_bits_per_dim']}", flush=True)
    lps, ses, nfes, t_ode = [], [], [], 0.0
    for i in range(0, y.shape[0], 64):
        t0 = time.perf_counter()
        lp, li = log_likelihood(den, y[i : i + 64], sigma_min=smin, sigma_max=smax,
                                divergence="hutchinson", n_probes=args.probes, generator=g,
                                return_info=True)  # fmt: skip
        t_ode += time.perf_counter() - t0
        lps.append(lp.double())
        ses.append(li.stderr.double() if li.stderr is not None else torch.zeros_like(lp).double())
        nfes.append(li.nfe)
    lp = torch.cat(lps)
    bpd = bits_per_dim(lp, dim=d, log_det_jacobian=log_det)
    out["ode"] = {
        "bits_per_dim": float(bpd.mean()),
        "bits_per_dim_stderr_over_examples": float(bpd.std() / math.sqrt(len(bpd))),
        "hutchinson_stderr_bits_per_dim": float(torch.cat(ses).mean() / (d * math.log(2))),
        "nfe_per_batch_mean": sum(nfes) / len(nfes),
        "ms_per_example": 1e3 * t_ode / y.shape[0],
        "probes": args.probes,
    }
    print(f"digits ODE: {out['ode']}", flush=True)
    t0 = time.perf_counter()
    b, ei = elbo(den, y, sigma_min=smin, sigma_max=smax, n_sigma=64, generator=g,
                 return_info=True)  # fmt: skip
    t_elbo = time.perf_counter() - t0
    bb = bits_per_dim(b.double(), dim=d, log_det_jacobian=log_det)
    out["elbo"] = {
        "bits_per_dim": float(bb.mean()),
        "bits_per_dim_stderr_over_examples": float(bb.std() / math.sqrt(len(bb))),
        "mc_stderr_bits_per_dim": float(ei.stderr.double().mean() / (d * math.log(2))),
        "denoiser_calls_per_example": ei.nfe,
        "ms_per_example": 1e3 * t_elbo / y.shape[0],
        "time_ratio_elbo_over_ode": t_elbo / t_ode,
    }
    # the dequantised bound depends on the density's smoothing level; the ELBO is cheap to sweep
    out["elbo_bits_per_dim_vs_sigma_min"] = {}
    for s_lo in (0.01, 0.05):
        bs = elbo(den, y, sigma_min=s_lo, sigma_max=smax, n_sigma=64, generator=g)
        bs = bits_per_dim(bs.double(), dim=d, log_det_jacobian=log_det)
        out["elbo_bits_per_dim_vs_sigma_min"][str(s_lo)] = float(bs.mean())
    print(f"digits ELBO: {out['elbo']} {out['elbo_bits_per_dim_vs_sigma_min']}", flush=True)

    # OOD: fit on the training split, score held-out digits against corrupted ones
    x_train, x_test = norm.encode(train), norm.encode(test)
    gen = torch.Generator().manual_seed(args.seed + 7)
    sets = {
        "noise_0.2": (x_test + 0.2 * torch.randn(x_test.shape, generator=gen)),
        "noise_0.5": (x_test + 0.5 * torch.randn(x_test.shape, generator=gen)),
    }
    flat = x_test.reshape(x_test.shape[0], -1)
    perm = torch.stack([torch.randperm(flat.shape[1], generator=gen) for _ in range(len(flat))])
    sets["shuffled"] = torch.gather(flat, 1, perm).reshape(x_test.shape)
    # harder cases: faint noise (0.4 and 0.8 levels) and upside-down digits
    sets["noise_0.05"] = x_test + 0.05 * torch.randn(x_test.shape, generator=gen)
    sets["noise_0.1"] = x_test + 0.1 * torch.randn(x_test.shape, generator=gen)
    sets["vflip"] = torch.flip(x_test, dims=[-2])
    t0 = time.perf_counter()
    det = OODDetector(den, sigmas=torch.logspace(-2, 1, 10), n_components=4, seed=args.seed)
    det.fit(x_train)
    s_in = det.score(x_test)
    out["ood"] = {"detector_sigmas": det.sigmas.tolist(), "n_in": int(x_test.shape[0])}
    # control: training digits against held-out ones should be near chance (0.5)
    out["ood"]["auroc_detector_train_vs_test"] = auroc(s_in, det.score(x_train[: len(x_test)]))
    for name, xo in sets.items():
        out["ood"][f"auroc_detector_{name}"] = auroc(s_in, det.score(xo))
    out["ood"]["detector_seconds"] = time.perf_counter() - t0
    m = args.n_ood

    def nll(x):  # a ranking score: a loose tolerance and one probe are enough
        return -log_likelihood(den, x[:m], sigma_min=smin, sigma_max=smax, rtol=1e-3, atol=1e-3,
                               divergence="hutchinson", n_probes=1, generator=g)  # fmt: skip

    ll_in = nll(x_test)
    for name, xo in sets.items():
        out["ood"][f"auroc_likelihood_{name}"] = auroc(ll_in, nll(xo))
    print(f"digits OOD: {out['ood']}", flush=True)
    return out


def _baselines(train, test, norm, d, log_det, g) -> dict:
    """Reference bits/dim on the same held-out levels: uniform over the 17 levels, independent
    per-pixel histograms (add-one smoothing), and the full-covariance Gaussian of the training data
    (exact log-density, the same dequantisation)."""
    from scorekit.analytic import gaussian_approximation
    from scorekit.likelihood import bits_per_dim, dequantize

    bins = 17
    tr = train.reshape(train.shape[0], -1).long()
    te = test.reshape(test.shape[0], -1).long()
    counts = torch.stack([torch.bincount(tr[:, j], minlength=bins) for j in range(d)]) + 1.0
    logp = (counts / counts.sum(1, keepdim=True)).log()  # [d, bins]
    hist = -logp.gather(1, te.T).sum(0) / (d * math.log(2))
    gauss = gaussian_approximation(norm.encode(dequantize(train, generator=g)).double())
    y = norm.encode(dequantize(test, generator=g)).double()
    gbpd = bits_per_dim(gauss.log_prob(y), dim=d, log_det_jacobian=log_det)
    return {"uniform_17_levels": math.log2(bins), "per_pixel_histogram": float(hist.mean()),
            "gaussian_full_covariance_dequantised": float(gbpd.mean())}  # fmt: skip


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def run(args: argparse.Namespace) -> int:
    for name in ("n_test", "n_ood", "probes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    result: dict = {"exact_targets": _exact_targets(16 if args.quick else 64, args.seed)}
    print("exact targets (sigma_min=0.01, sigma_max=100, dopri5 rtol=atol=1e-5):")
    print(f"  {'target':<7}{'d':>4}  {'ODE exact err/dim':>18}{'NFE':>5}{'ms/ex':>8}  "
          f"{'Hutch err/dim':>14}{'se/dim':>9}{'ms/ex':>8}  {'ELBO gap/dim':>13}{'se':>9}{'ms/ex':>8}")  # fmt: skip
    for r in result["exact_targets"]:
        e, h, b = r["exact"], r["hutchinson"], r["elbo"]
        print(f"  {r['target']:<7}{r['d']:>4}  {e['mean_abs_err_nats_per_dim']:>18.2e}{e['nfe']:>5}"
              f"{e['ms_per_example']:>8.2f}  {h['mean_abs_err_nats_per_dim']:>14.2e}"
              f"{h['mean_stderr_nats_per_dim']:>9.2e}{h['ms_per_example']:>8.2f}  "
              f"{b['mean_gap_nats_per_dim']:>13.2e}{b['stderr_of_mean_gap_per_dim']:>9.1e}"
              f"{b['ms_per_example']:>8.2f}")  # fmt: skip
    run_dir = args.run or ("runs/digits_lik" if Path("runs/digits_lik").exists() else None)
    if run_dir and not args.quick:
        result["digits"] = _digits(run_dir, args)
    elif not args.quick:
        print("no digits run (train one: scorekit train --data digits --holdout 0.2 "
              "--out runs/digits_lik --minutes 10); skipping part 2")  # fmt: skip
    out = Path(args.out) / "likelihood.json"
    _write_json(out, result)
    print(f"wrote {out}")
    return 0
