"""``scorekit bench inverse``: every posterior sampler against the exact posterior, at equal cost.

Problems (exact Gaussian-mixture priors, exact denoisers, float64; measurement noise ``sigma_y = 0.05``),
in two sets. ``--set tuning`` (the defaults of every solver, ``scorekit.inverse.DEFAULT`` included, were
chosen on it): ``--seed 0``, ``gmm64`` built with ``--target-seed 1`` (the library's tests use seed 0),
``d = 64``, 8x8 images; ``--set tuning-b`` is a second tuning set, the same priors measured with
``--seed 3`` (its ring8 measurement, ``y = 1.29``, weighs three modes 0.90 / 0.05 / 0.05, where seed 0's
splits two evenly). ``--set heldout`` (never used to choose anything): ``--seed 1``, target seed 2, a
mixture of the same recipe in ``d = 48`` (12 components) and 6x6 images:

* ``ring8-observe-x``: ``ring8`` (2-D), ``y = x_1 + 0.05 n``;
* ``gmm-inpaint``: ``d``-D mixture, a random half of the coordinates observed;
* ``gmm-project``: ``y = P x + 0.05 n`` with ``P`` ``[d / 4, d]`` Gaussian / 8;
* ``gmm-img-down2-blur``: the mixture as ``1 x s x s`` images, 2x average pooling after a circular
  Gaussian blur (``sigma = 0.8`` px), as a dense ``Matrix`` (so the SVD solvers apply).

The true ``x0`` and the noise come from ``--seed``. For each problem: one measurement ``y``, ``n``
samples of the exact posterior ``GaussianMixture.posterior`` as the reference, and the exact-vs-exact
floor (mean sliced W2 between the reference and 3 more exact sets of ``n``). For every solver and
budget (``karras`` sigmas, ``sigma_min = 2e-3``, ``sigma_max = 80``, the most steps whose cost fits):
sliced W2 of ``n`` samples to the reference (and its ratio to the floor), RMS error of the sample mean
against the exact posterior mean (per coordinate), the coverage of per-coordinate 90% intervals (the
fraction of exact posterior samples inside the solver's 5-95% sample quantiles, averaged over
coordinates; 0.90 is right), ``comp TV``: the total-variation distance between the frequencies of the
prior's mixture components the samples fall in (most responsible component at sigma = 1e-3) and those
of exact posterior samples (0: every mode weighed right), the measurement residual RMS ``|y - A x| /
sqrt(m)`` (about ``sigma_y`` for exact samples) and wall-clock seconds. The cost is per posterior
sample: ``NFE`` counts a call on ``K`` particles per sample as ``K`` (``scorekit.inverse.nfe``),
``VJP`` the backward passes through the denoiser likewise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np
import torch

from scorekit._util import atomic_write, atomic_write_json
from scorekit.analytic import GaussianMixture, target
from scorekit.inverse import (
    DEFAULT,
    REGISTRY,
    Blur,
    Compose,
    Downsample,
    Mask,
    Matrix,
    as_matrix,
    budget_options,
    nfe,
    steps_for_budget,
    vjps,
)
from scorekit.inverse.smc import auto_particles
from scorekit.metrics import sliced_wasserstein
from scorekit.schedules import karras

__all__ = ["DIGIT_TASKS", "add_arguments", "demo_section", "measurement_image", "panel", "run"]

F64 = torch.float64
PROBLEMS = ("ring8-observe-x", "gmm-inpaint", "gmm-project", "gmm-img-down2-blur")
#: set -> (seed, target seed, vector dimension, image side). Defaults were tuned on "tuning" and
#: "tuning-b" only.
SETS = {"tuning": (0, 1, 64, 8), "tuning-b": (3, 1, 64, 8), "heldout": (1, 2, 48, 6)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="bench_out/inverse", help="output folder (JSON)")
    a("--n", type=int, default=1000, help="samples per solver and per exact set (default 1000)")
    a("--nfe", default="20,50,100,200", help="NFE budgets, comma-separated")
    a("--solvers", default=",".join(REGISTRY), help="solvers, comma-separated")
    a("--problems", default=",".join(PROBLEMS), help="problems, comma-separated")
    a("--particles", type=int, default=None, help="TDS particles per sample (default: tds's own)")
    a("--set", default="tuning", choices=sorted(SETS), help="problem set (default tuning)")
    a("--device", default="cpu")
    a("--no-plot", action="store_true", help="skip the PNG (and the matplotlib import)")
    a("--peers", action="store_true",
      help="also run deepinv/azula posterior samplers (scorekit.bench.inverse_peers; skipped if absent)")  # fmt: skip


def _mixture(d: int, g: torch.Generator) -> GaussianMixture:
    """``target("gmm64")``'s recipe in ``d`` dimensions with ``d / 4`` components (unit scale)."""
    k = d // 4
    means = torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64) / (2 * d) ** 0.5
    scales = 0.05 + 0.25 * torch.rand(k, 1, 1, generator=g, dtype=F64)
    covs = scales * (a @ a.mT + 0.1 * torch.eye(d, dtype=F64))
    w = torch.rand(k, generator=g, dtype=F64) + 0.5
    gm = GaussianMixture(means, covs, w / w.sum())
    scale = gm.covariance.diagonal().mean().sqrt()
    return GaussianMixture((means - gm.mean) / scale, covs / scale**2, gm.weights)


def _problem(name: str, which: str, device) -> dict:
    """Prior, operator, dense matrix, one measurement ``y`` ``[m]`` and ``sigma_y`` of set ``which``."""
    seed, target_seed, d, side = SETS[which]
    g = torch.Generator().manual_seed(seed)
    sy = 0.05
    if name == "ring8-observe-x":
        gm, op = target("ring8"), Matrix(torch.tensor([[1.0, 0.0]], dtype=F64))
    elif name in PROBLEMS:
        d = side * side if name == "gmm-img-down2-blur" else d
        tg = torch.Generator().manual_seed(target_seed)
        gm = target("gmm64", seed=target_seed) if d == 64 else _mixture(d, tg)
        if name == "gmm-inpaint":
            mask = torch.zeros(d, dtype=F64)
            mask[torch.randperm(d, generator=g)[: d // 2]] = 1
            op = Mask(mask)
        elif name == "gmm-project":
            op = Matrix(torch.randn(d // 4, d, generator=g, dtype=F64) / 8)
        else:
            shape = [1, side, side]
            blur = Compose(Downsample(2, shape), Blur(shape, sigma=0.8))
            op = Matrix(as_matrix(blur), shape=shape)
    else:
        raise ValueError(f"unknown problem {name!r}; allowed: {list(PROBLEMS)}")
    A = as_matrix(op)
    x0 = gm.sample(1, g)
    y = x0 @ A.T + sy * torch.randn(1, A.shape[0], generator=g, dtype=F64)
    post = gm.posterior(A, y[0], sy)
    gm, post = gm.to(device=device), post.to(device=device)
    return {"name": name, "gm": gm, "op": op, "A": A.to(device), "y": y[0].to(device), "sy": sy,
            "post": post, "shape": op.in_shape, "seed": seed}  # fmt: skip


def _reference(p: dict, n: int, seed: int) -> tuple:
    """``n`` exact posterior samples and the exact-vs-exact floor (mean over 3 more sets)."""
    sets = [p["post"].sample(n, torch.Generator(p["y"].device).manual_seed(seed + 1000 + i)) for i in range(4)]  # fmt: skip
    floor = sum(sliced_wasserstein(sets[0], s) for s in sets[1:]) / 3
    return sets[0], floor, _metrics(p, sets[1], sets[0])


def _metrics(p: dict, x: torch.Tensor, ref: torch.Tensor) -> dict:
    x = x.reshape(x.shape[0], -1)
    lo, hi = torch.quantile(x, 0.05, dim=0), torch.quantile(x, 0.95, dim=0)
    inside = ((ref >= lo) & (ref <= hi)).double().mean()
    k = p["gm"].means.shape[0]
    comp = [torch.bincount(p["gm"].responsibilities(v, 1e-3).argmax(1), minlength=k) / len(v)
            for v in (x, ref)]  # fmt: skip
    resid = (p["y"][None] - x @ p["A"].T).square().mean().sqrt()
    return {
        "sw2": sliced_wasserstein(x, ref),
        "mean_rms": float((x.mean(0) - p["post"].mean).square().mean().sqrt()),
        "coverage90": float(inside),
        "comp_tv": float(0.5 * (comp[0] - comp[1]).abs().sum()),
        "residual_rms": float(resid),
    }


def _steps_for(name: str, budget: int, options: dict) -> int | None:
    """The largest number of steps whose NFE is at most ``budget`` (None if even 1 step is over)."""
    best = None
    for n in range(1, budget + 1):
        if nfe(name, karras(n, 2e-3, 80.0), **options) <= budget:
            best = n
        else:
            break
    return best


def _solve(p: dict, name: str, budget: int, n: int, particles: int | None) -> dict | None:
    options = {"particles": particles} if name == "tds" and particles is not None else {}
    options = budget_options(REGISTRY[name], budget, options)  # tds: particles from the budget
    seed = p["seed"]
    steps = _steps_for(name, budget, options)
    if steps is None:
        return None
    dev = p["y"].device
    sigmas = karras(steps, 2e-3, 80.0, dtype=F64, device=dev)
    g = torch.Generator(dev).manual_seed(seed)
    x = 80.0 * torch.randn(n, *p["shape"], generator=g, dtype=F64, device=dev)
    y = p["y"].expand(n, -1).reshape(n, *p["op"].out_shape)
    row = {"solver": name, "steps": steps, "nfe": nfe(name, sigmas, **options),
           "vjp": vjps(name, sigmas, **options), **options}  # fmt: skip
    if name == "tds":  # the particle count that ran (auto_particles when not given)
        row["particles"] = options.get("particles") or auto_particles(steps)
    t = time.perf_counter()
    try:
        out = REGISTRY[name](
            p["gm"], y, p["op"], x, sigmas, sigma_y=p["sy"], generator=g, **options
        )
    except FloatingPointError as err:  # a diverging solver is a result, not a crash
        return {**row, "error": str(err)}
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return {**row, "seconds": time.perf_counter() - t, "samples": out}


def _bench_problem(p: dict, args, budgets: list[int], solvers: list[str]) -> dict:
    ref, floor, exact_row = _reference(p, args.n, p["seed"])
    print(f"\n{p['name']} ({args.set}): d = {p['A'].shape[1]}, m = {p['A'].shape[0]}, sigma_y = {p['sy']}, "
          f"floor SW2 = {floor:.4f} (exact vs exact, n = {args.n})")  # fmt: skip
    print(f"  {'solver':<9}{'NFE':>5}{'VJP':>5}{'SW2/floor':>10}{'mean RMS':>10}{'cover90':>8}"
          f"{'compTV':>7}{'resid':>8}{'sec':>7}")  # fmt: skip
    e = exact_row
    print(f"  {'exact':<9}{'':>5}{'':>5}{e['sw2'] / floor:>10.2f}{e['mean_rms']:>10.4f}"
          f"{e['coverage90']:>8.3f}{e['comp_tv']:>7.3f}{e['residual_rms']:>8.4f}{'':>7}")  # fmt: skip
    rows = []
    for budget in budgets:
        for name in solvers:
            row = _solve(p, name, budget, args.n, args.particles)
            if row is None:
                continue
            if "samples" in row:
                row.update(_metrics(p, row.pop("samples"), ref))
            rows.append(row)
            if "error" in row:
                print(f"  {name:<9}{row['nfe']:>5}{row['vjp']:>5}  diverged: {row['error']}")
                continue
            print(f"  {name:<9}{row['nfe']:>5}{row['vjp']:>5}{row['sw2'] / floor:>10.2f}"
                  f"{row['mean_rms']:>10.4f}{row['coverage90']:>8.3f}{row['comp_tv']:>7.3f}"
                  f"{row['residual_rms']:>8.4f}"
                  f"{row['seconds']:>7.2f}", flush=True)  # fmt: skip
    if getattr(args, "peers", False):
        rows += _peer_rows(p, ref, budgets, args.n)
    return {"problem": p["name"], "set": args.set, "default": DEFAULT, "d": p["A"].shape[1], "m": p["A"].shape[0], "sigma_y": p["sy"],
            "floor_sw2": floor, "exact": exact_row, "rows": rows}  # fmt: skip


def _peer_rows(p: dict, ref: torch.Tensor, budgets: list[int], n: int) -> list[dict]:
    """deepinv/azula rows (``inverse_peers``), or one ``skipped`` row per peer naming what is missing."""
    from scorekit.bench import inverse_peers as peers

    have, rows = peers.available(), []
    for name, (lib, what) in peers.PEERS.items():
        if have[lib] is None:
            why = f"{lib} is not installed (pip install {lib}); {what} not run"
            print(f"  {name:<16} skipped: {why}")
            rows.append({"solver": name, "skipped": why})
            continue
        for budget in budgets:
            t = time.perf_counter()
            out = peers.run_peer(name, p["gm"], p["y"], p["A"], p["sy"], n, budget, seed=p["seed"])
            row = {"solver": name, "nfe": budget, "version": have[lib],
                   "seconds": time.perf_counter() - t, **_metrics(p, out, ref)}  # fmt: skip
            print(f"  {name:<16}{budget:>5} SW2 {row['sw2']:.4f} cover90 {row['coverage90']:.3f}")
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    budgets = [int(v) for v in args.nfe.split(",")]
    solvers = [s for s in args.solvers.split(",") if s]
    for s in solvers:
        if s not in REGISTRY:
            raise ValueError(f"unknown solver {s!r}; allowed: {sorted(REGISTRY)}")
    if args.n < 10 or min(budgets) < 1 or (args.particles is not None and args.particles < 1):
        raise ValueError("--n must be >= 10, NFE budgets >= 1 and --particles >= 1")
    torch.manual_seed(SETS[args.set][0])
    result = {"config": {k: v for k, v in vars(args).items() if not callable(v)}, "problems": []}
    for name in args.problems.split(","):
        p = _problem(name, args.set, torch.device(args.device))
        result["problems"].append(_bench_problem(p, args, budgets, solvers))
    out = Path(args.out) / "inverse.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    if not args.no_plot:
        plot(result, out.with_suffix(".png"))
    print(f"wrote {out}" + ("" if args.no_plot else f" and {out.with_suffix('.png')}"))
    return 0


def plot(result: dict, path: Path) -> None:
    """Error-vs-NFE PNG: sliced W2 / floor per solver, one panel per problem (log-log)."""
    from matplotlib.figure import Figure

    problems = result["problems"]
    fig = Figure(figsize=(4.2 * len(problems), 3.6))
    for j, prob in enumerate(problems):
        ax = fig.add_subplot(1, len(problems), j + 1)
        names = sorted({r["solver"] for r in prob["rows"]})
        for name in names:
            pts = [(r["nfe"], r["sw2"] / prob["floor_sw2"]) for r in prob["rows"]
                   if r["solver"] == name and "sw2" in r and "nfe" in r]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", title=prob["problem"], xlabel="NFE")
        if j == 0:
            ax.set_ylabel("sliced W2 / exact-vs-exact floor")
    fig.axes[-1].legend(fontsize=7, loc="upper right")
    fig.savefig(path, dpi=100, bbox_inches="tight")


# -- pictures of restorations (scorekit restore --out x.png, the demo's digits panels) --------------


def measurement_image(op, y: torch.Tensor) -> torch.Tensor:
    """A picture of measurements ``y`` ``[M, *op.out_shape]`` in the operator's input space ``[M,
    *op.in_shape]``: the observed pixels of a mask (NaN where missing), a downsampled image repeated
    up to full size, an image-shaped measurement (blur, noise) itself."""
    if isinstance(op, Mask):
        full = torch.full((y.shape[0], *op.in_shape), float("nan"), dtype=y.dtype)
        full.reshape(y.shape[0], -1)[:, op.mask.reshape(-1).bool()] = y.cpu()
        return full
    if isinstance(op, Downsample):
        f = op.factor
        return y.cpu().repeat_interleave(f, -2).repeat_interleave(f, -1)
    if tuple(op.out_shape) == tuple(op.in_shape):
        return y.cpu()
    raise ValueError(f"no picture for the measurement of {op!r}")


def panel(path, rows: list[dict], *, lo: float, hi: float, title: str = "") -> None:
    """A PNG, one row per measurement: ``truth`` (optional), ``measurement``, the ``samples`` and their
    ``mean``; each an ``[H, W]`` array in the data's units, shown on the fixed range ``[lo, hi]``."""
    from matplotlib.figure import Figure

    cols = max(len(r["samples"]) for r in rows) + 3
    fig = Figure(figsize=(0.9 * cols, 0.95 * len(rows) + 0.4))
    for i, r in enumerate(rows):
        cells = [("truth", r.get("truth")), ("measured", r["measurement"])]
        cells += [(f"sample {j + 1}", s) for j, s in enumerate(r["samples"])]
        cells += [("mean", r["mean"])]
        for j, (name, img) in enumerate(cells):
            ax = fig.add_subplot(len(rows), cols, i * cols + j + 1)
            ax.set_axis_off()
            if img is None:
                continue
            img = np.ma.masked_invalid(np.asarray(img, dtype=float))
            ax.imshow(img, cmap="gray_r", vmin=lo, vmax=hi, interpolation="nearest")
            if i == 0:
                ax.set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


# -- digits panels for scorekit demo ------------------------------------------------------------------

#: (operator spec, sigma_y in the model's units, where digit pixels 0..16 are [-1, 1]: 0.05 = 0.4 px)
DIGIT_TASKS = (("inpaint-left", 0.05), ("downsample-2", 0.05), ("blur-gauss:sigma=1", 0.05),
               ("denoise", 0.6))  # fmt: skip


def _digit_judge(info: dict):
    """A logistic regression on real digit pixels (the run's training split) and the held-out split."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from scorekit.bench.guidance_digits import pixels, real_digits

    train, test = real_digits(info)
    with threadpool_limits(
        limits=1
    ):  # BLAS threads on a busy machine: tens of seconds instead of one
        return LogisticRegression(max_iter=3000).fit(pixels(train), train.labels), test


def demo_section(run_dir, out_dir, *, quick: bool = False, solver: str = DEFAULT,
                 nfe: int | None = None, seed: int = 0) -> tuple[dict, str, list[Path]]:  # fmt: skip
    """Posterior samples of a trained digits run on four restorations, for ``scorekit demo``'s report.

    For each task of ``DIGIT_TASKS`` (inpaint the left half, 2x super-resolution, Gaussian blur, heavy
    denoising): ``k`` held-out digits (8, or 4 with ``quick``) are measured (noise from ``seed``), 8
    posterior samples are drawn per digit with ``solver`` at ``nfe`` network evaluations per sample
    (100, or 30 with ``quick``), and a logistic regression trained on real digit pixels (the run's
    training split, never on samples) classifies the samples, their mean and the true digits. A
    conditional run is used unconditionally (its null label). Returns ``(figures, markdown, pngs)``.
    """
    from scorekit.inverse import named, posterior_samples
    from scorekit.runs import decode, load_run, pixel_range

    den, info = load_run(run_dir)
    if tuple(info["shape"]) != (1, 8, 8):
        raise ValueError(
            f"{run_dir}: the digits panels need an 8x8 digits run; got shape {info['shape']}"
        )
    judge, test = _digit_judge(info)
    k, budget = (4, 30) if quick else (8, 100)
    budget = nfe or budget
    truth, labels = test.x[:k].float(), np.asarray(test.labels[:k])
    lo, hi = max(info["sigma_min"], 2e-3), min(info["sigma_max"], 80.0)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, pngs, lines = {}, [], []
    for spec, sy in DIGIT_TASKS:
        op = named(spec, info["shape"])
        g = torch.Generator().manual_seed(seed)
        y = op.forward(truth) + sy * torch.randn(k, *op.out_shape, generator=g)
        t = time.perf_counter()
        with torch.no_grad() if solver in _NO_GRAD else contextlib.nullcontext():
            x = posterior_samples(den, y, op, sigma_y=sy, n=8, nfe=budget, solver=solver,
                                  sigma_min=lo, sigma_max=hi, seed=seed)  # fmt: skip
        seconds = time.perf_counter() - t
        px = decode(x.reshape(k * 8, *info["shape"]), info).reshape(k, 8, 8, 8)
        mean = decode(x.mean(1), info).reshape(k, 8, 8)
        acc = lambda v, lab: float((judge.predict(v.reshape(len(v), -1)) == lab).mean())  # noqa: E731
        steps = steps_for_budget(REGISTRY[solver], budget, lo, hi, {})
        opts = budget_options(REGISTRY[solver], budget, {})  # what posterior_samples ran
        row = {"solver": solver, "sigma_y": sy, "nfe": budget, "steps": steps,
               "vjp": vjps(solver, karras(steps, lo, hi), **opts), "digits": k, "samples_per_digit": 8,
               "accuracy_samples": acc(px.reshape(k * 8, 64), np.repeat(labels, 8)),
               "accuracy_mean": acc(mean, labels),
               "accuracy_truth": acc(decode(truth, info).reshape(k, 64), labels),
               "seconds": seconds}  # fmt: skip
        figures[spec] = row
        view = decode(measurement_image(op, y).float(), info).reshape(k, 8, 8)
        rows = [{"truth": decode(truth[j : j + 1], info).reshape(8, 8), "measurement": view[j],
                 "samples": list(px[j]), "mean": mean[j]} for j in range(min(k, 4))]  # fmt: skip
        name = out_dir / f"inverse_{spec.split(':')[0]}.png"
        panel(name, rows, lo=pixel_range(info)[0], hi=pixel_range(info)[1],
              title=f"{spec}, sigma_y {sy} (model units): {solver}, {budget} NFE/sample")  # fmt: skip
        pngs.append(name)
        lines.append(f"| {spec} | {sy} | {row['accuracy_samples']:.2f} | {row['accuracy_mean']:.2f} "
                     f"| {row['accuracy_truth']:.2f} | {budget} | {row['vjp']} | {seconds:.0f} |")  # fmt: skip
    md = (
        f"### Inverse problems on digits ({solver}, {budget} network evaluations per sample)\n\n"
        f"{k} held-out digits per task, 8 posterior samples each, prior = the trained run "
        "(unconditional). Accuracy: a logistic regression trained on real digit pixels classifies "
        "the samples (right label = the measured digit's), their mean and the true digits.\n\n"
        "| task | sigma_y | acc. samples | acc. mean | acc. truth | NFE | VJP | seconds |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(lines)
        + "\n\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in pngs)
    )
    return figures, md, pngs


#: solvers that need no autograd through the denoiser (run under no_grad)
_NO_GRAD = {
    "ddrm",
    "ddnm",
    "diffpir",
    "dmps",
    "daps",
    "repaint",
    "pnp_gibbs",
    "red_diff",
    "flowdps",
}
