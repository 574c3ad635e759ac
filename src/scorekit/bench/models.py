"""``scorekit bench models``: a diffusers DDPM UNet sampled by diffusers' schedulers and by scorekit.

The model is ``scorekit.bench.digits_unet``'s ``UNet2DModel`` trained on the 8x8 digits with diffusers'
own DDPM recipe (eps-prediction, linear betas, 10 CPU-minutes; cached in ``--model-dir``). It is loaded
for scorekit through ``scorekit.models.from_diffusers`` (the public path a user takes); diffusers'
side runs diffusers' own loop (``set_timesteps``, ``scale_model_input``, the UNet, ``step``) as its
pipelines do.

Protocol (tuned vs held-out):
    * candidates: diffusers' DDIM (leading spacing as in its pipelines, trailing; clip_sample on, its
      default, and off), DPM-Solver++(2M) (uniform and Karras sigmas), UniPC (bh2, orders 2 and 3);
      scorekit's ``dpmpp_2m``, ``dpmpp_3m``, ``unipc`` (order 3), ``deis`` on the ``karras``,
      ``loglinear`` and ``uniform_t`` (uniform in the table's time, continuous) schedules from the
      table's ``sigma_max`` down to the table's ``sigma_min`` or to 0.1 / 0.3 (see ``SCOREKIT``),
      some with the x0 clip
      (``SCOREKIT``). Every candidate makes exactly the NFE of its row (the UNet's calls are counted).
    * tuning: each side's best candidate per NFE (lowest Fréchet distance) is chosen on ``--tune-n``
      samples of seed ``--tune-seed`` scored against as many training digits;
    * report: the chosen candidates are re-sampled with a fresh seed (``--seed``) from the same
      starting noise for both sides and scored against the held-out digits (never trained on).
    * scores: the 1-NN two-sample test (leave-one-out accuracy of a 1-nearest-neighbour classifier
      between samples and reference; 0.5 = indistinguishable, 1 = fully separable; Lopez-Paz & Oquab
      2017) and the Fréchet distance of pixel-space Gaussians (``scorekit.metrics.frechet_distance``),
      both at equal sample and reference counts, on samples clamped to [-1, 1] (as diffusers'
      pipelines clamp images before writing pixels).
    * overhead: seconds of one scorekit sampling run around the UNet against the UNet's own calls on
      the same inputs (interleaved, best of ``--repeats``, one process): ``ours / model - 1``; and,
      free of the timing noise of a busy machine, the loop alone (the UNet replaced by a stub that
      returns at once) as a fraction of the UNet's calls.

References:
    Lopez-Paz & Oquab, "Revisiting Classifier Two-Sample Tests", ICLR 2017 (1-NN test).
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule...", NeurIPS 2017 (Fréchet distance).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from scorekit._util import atomic_write, atomic_write_json
from scorekit.metrics import frechet_distance

__all__ = ["add_arguments", "benchmark", "nn1_accuracy", "run"]

NFES = (5, 10, 20)
DPMPP = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "final_sigmas_type": "zero"}
#: (label, diffusers scheduler class, config overrides); "-clip" keeps DDIM's default clip_sample=True
DIFFUSERS = [
    ("ddim-leading-clip", "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("ddim-trailing-clip", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("ddim-trailing", "DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {**DPMPP, "solver_order": 2}),
    ("dpmpp_2m-karras", "DPMSolverMultistepScheduler",
     {**DPMPP, "solver_order": 2, "use_karras_sigmas": True}),
    ("unipc-2", "UniPCMultistepScheduler", {"solver_order": 2}),
    ("unipc-3", "UniPCMultistepScheduler", {"solver_order": 3}),
]  # fmt: skip
#: scorekit candidates: (sampler, options, schedule, sigma_max, last positive sigma, x0 clip);
#: "table" is the table's end. Ending above the table's sigma_min (the last step then returns the
#: posterior mean at that noise level) is what diffusers' multistep schedulers do with their default
#: spacing (their last model call is at timestep ~1000/n), so scorekit's side may choose it too.
SCOREKIT = [
    ("dpmpp_2m", {}, "karras", "table", "table", False),
    ("dpmpp_2m", {}, "karras", "table", 0.1, False),
    ("dpmpp_2m", {}, "karras", "table", 0.3, False),
    ("dpmpp_2m", {}, "uniform_t", "table", "table", False),
    ("dpmpp_2m", {}, "uniform_t", "table", 0.1, False),
    ("dpmpp_2m", {}, "uniform_t", "table", 0.3, False),
    ("dpmpp_3m", {}, "karras", "table", 0.1, False),
    ("dpmpp_3m", {}, "karras", "table", 0.3, False),
    ("unipc", {"order": 3}, "karras", "table", 0.1, False),
    ("unipc", {"order": 3}, "karras", "table", 0.3, False),
    ("dpmpp_2m", {}, "karras", "table", 0.1, True),
    ("unipc", {"order": 3}, "karras", "table", 0.3, True),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model-dir", default="runs/ddpm-unet",
      help="the digits UNet folder (trained here if missing; scorekit.bench.digits_unet)")  # fmt: skip
    a("--minutes", type=float, default=10.0, help="CPU-minutes to train the UNet if it is missing")
    a(
        "--n",
        type=int,
        default=0,
        help="reported samples per side (default: the held-out set's size)",
    )
    a("--tune-n", type=int, default=128, help="samples per candidate while tuning (default 128)")
    a("--seed", type=int, default=1, help="the reported (held-out) seed")
    a("--tune-seed", type=int, default=0, help="the seed candidates are chosen on")
    a("--repeats", type=int, default=5, help="timing repeats for the overhead (best of)")
    a("--threads", type=int, default=1)
    a("--quick", action="store_true", help="fewer candidates (a smoke run)")
    a("--out", default="bench-models", help="folder for report.md and results.json")


def nn1_accuracy(x: Tensor, y: Tensor) -> float:
    """Leave-one-out 1-NN accuracy between sample sets ``x`` ``[N, ...]`` and ``y`` ``[M, ...]``.

    Each point is classified by its nearest other point (Euclidean) as coming from ``x`` or ``y``;
    0.5 means the sets are indistinguishable (at ``N = M``), 1 fully separable.
    """
    a, b = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    z = torch.cat([a, b])
    d = torch.cdist(z, z)
    d.fill_diagonal_(float("inf"))
    nearest = d.argmin(1)
    label = torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    return float((label[nearest] == label).double().mean())


def _score(x: Tensor, ref: Tensor) -> dict:
    """Both scores of samples ``x`` against ``ref``, on images clamped to [-1, 1] as diffusers'
    pipelines clamp them before writing pixels (a few out-of-range pixels would otherwise dominate
    the Fréchet distance)."""
    x = x.clamp(-1, 1)
    return {"nn1": nn1_accuracy(x, ref), "fd": frechet_distance(x.reshape(len(x), -1).double(),
                                                                ref.reshape(len(ref), -1).double())}  # fmt: skip


class _Calls:
    """Counts the UNet's forward calls (one call = one network evaluation of the whole batch)."""

    def __init__(self, unet):
        self.n = 0
        self._handle = unet.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def close(self) -> int:
        self._handle.remove()
        return self.n


_UNETS: dict[str, object] = {}


def _unet(folder: Path):
    """The UNet of ``folder`` (loaded once, shared by both sides), eval mode."""
    if str(folder) not in _UNETS:
        from scorekit.models import from_diffusers

        _UNETS[str(folder)] = from_diffusers(folder, clip_sample=False).model
    return _UNETS[str(folder)]


def diffusers_sample(
    folder: Path, cls_name: str, cfg: dict, z: Tensor, nfe: int
) -> tuple[Tensor, int]:
    """diffusers' own loop (``nfe`` steps) from ``x_T = z * init_noise_sigma``: ``(x0, UNet calls)``."""
    import diffusers

    base = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    keep = {k: v for k, v in base.items() if not k.startswith("_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = getattr(diffusers, cls_name).from_config({**keep, **cfg})
    unet = _unet(folder)
    calls = _Calls(unet)
    sched.set_timesteps(nfe)
    sample = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(sched.scale_model_input(sample, t), t).sample
            sample = sched.step(eps, t, sample).prev_sample
    return sample, calls.close()


def _scorekit_denoiser(folder: Path, clip: bool):
    """``from_diffusers(folder)`` around the very same UNet module as diffusers' side (cached)."""
    from scorekit.models import from_diffusers

    key = f"{folder}|clip={clip}"
    if key not in _UNETS:
        den = from_diffusers(folder, clip_sample=clip)
        den.model = _unet(folder)
        _UNETS[key] = den
    return _UNETS[key]


def scorekit_sample(folder: Path, cand: dict, z: Tensor, nfe: int) -> tuple[Tensor, int]:
    """scorekit's sampler on ``from_diffusers(folder)`` from ``sigma_max * z``: ``(x0, UNet calls)``."""
    from scorekit.samplers import sample
    from scorekit.schedules import uniform_t

    den = _scorekit_denoiser(folder, cand["clip"])
    calls = _Calls(den.model)
    hi = den.sigma_max if cand["sigma_max"] == "table" else float(cand["sigma_max"])
    lo = den.sigma_min if cand["sigma_min"] == "table" else float(cand["sigma_min"])
    schedule = cand["schedule"]
    if schedule == "uniform_t":  # uniform in the table's own time (DDIM-like), continuous
        schedule = partial(uniform_t, process=den.mapping.process)
    with torch.no_grad():
        x = sample(den, tuple(z.shape), nfe=nfe, sampler=cand["sampler"], schedule=schedule,
                   sigma_min=lo, sigma_max=hi, noise=z, **cand["options"])  # fmt: skip
    return x, calls.close()


def _candidates(quick: bool) -> tuple[list[dict], list[dict]]:
    theirs = [{"label": lab, "cls": c, "cfg": cfg} for lab, c, cfg in DIFFUSERS]
    ours = [{"label": f"{sampler}{opts.get('order', '')}-{sched}-{hi}-to-{lo}" + ("-clip" if clip else ""),
             "sampler": sampler, "options": opts, "schedule": sched, "sigma_max": hi, "sigma_min": lo,
             "clip": clip} for sampler, opts, sched, hi, lo, clip in SCOREKIT]  # fmt: skip
    if quick:
        theirs, ours = theirs[::3], ours[::4]
    return theirs, ours


def _noise(n: int, seed: int) -> Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _one(folder: Path, side: str, cand: dict, z: Tensor, nfe: int, ref: Tensor, log) -> dict:
    """One candidate at one NFE, scored against ``ref`` (its UNet calls checked to be ``nfe``)."""
    t0 = time.perf_counter()
    if side == "diffusers":
        x, calls = diffusers_sample(folder, cand["cls"], cand["cfg"], z, nfe)
    else:
        x, calls = scorekit_sample(folder, cand, z, nfe)
    if calls != nfe:
        raise AssertionError(f"{side} {cand['label']}: {calls} UNet calls, asked {nfe}")
    s = _score(x, ref) if bool(torch.isfinite(x).all()) else {"nn1": 1.0, "fd": float("inf")}
    log(f"  {side:9s} {cand['label']:34s} NFE {nfe:2d}  1-NN {s['nn1']:.3f}  FD {s['fd']:.3f}")
    return {"side": side, "label": cand["label"], "nfe": nfe, **s,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _sweep(folder: Path, theirs, ours, z: Tensor, ref: Tensor, log) -> list[dict]:
    """Every candidate of both sides at every NFE."""
    return [_one(folder, side, c, z, nfe, ref, log)
            for side, cands in (("diffusers", theirs), ("scorekit", ours))
            for c in cands for nfe in NFES]  # fmt: skip


def _best(rows: list[dict], side: str, nfe: int) -> dict:
    """The candidate with the lowest Fréchet distance (the less noisy of the two scores)."""
    return min((r for r in rows if r["side"] == side and r["nfe"] == nfe), key=lambda r: r["fd"])


def overhead(folder: Path, *, batch: int, nfe: int, repeats: int) -> dict:
    """Seconds of scorekit's ``dpmpp_2m`` run around the UNet vs the UNet's own ``nfe`` calls on the
    inputs that run fed it (recorded, then replayed), interleaved, best of ``repeats``."""
    from scorekit.samplers import sample

    den = _scorekit_denoiser(folder, False)
    unet = den.model
    z = _noise(batch, 123)
    fed = []
    handle = unet.register_forward_hook(lambda m, a, o: fed.append((a[0].clone(), a[1].clone())))
    kw = {"nfe": nfe, "sampler": "dpmpp_2m", "sigma_min": den.sigma_min, "sigma_max": den.sigma_max,
          "noise": z}  # fmt: skip
    with torch.no_grad():
        sample(den, tuple(z.shape), **kw)
    handle.remove()
    t_ours, t_model = [], []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample(den, tuple(z.shape), **kw)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for x, t in fed:
                unet(x, t)
            t_model.append(time.perf_counter() - t0)
    ours, model = min(t_ours), min(t_model)
    # The loop alone: the same run with the UNet replaced by a stub that returns zeros at once, so
    # what is timed is scorekit's own work (scalings, t(sigma) on the table, the sampler's update).
    den.model = _Stub()
    t_loop = []
    try:
        with torch.no_grad():
            for _ in range(4 * repeats):
                t0 = time.perf_counter()
                sample(den, tuple(z.shape), **kw)
                t_loop.append(time.perf_counter() - t0)
    finally:
        den.model = unet
    loop = min(t_loop)
    return {"batch": batch, "nfe": nfe, "scorekit_s": ours, "model_s": model,
            "overhead": ours / model - 1, "loop_s": loop, "loop_fraction": loop / model}  # fmt: skip


class _Stub(torch.nn.Module):
    """A model that costs nothing: zeros of the input's shape (for timing the loop alone)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))  # the denoiser reads the model's dtype

    def forward(self, x, t, **kw):
        return (torch.zeros_like(x),)


def benchmark(args: argparse.Namespace, log=print) -> dict:
    """Train or load the UNet, tune each side on ``tune_seed`` vs training digits, report on ``seed``
    vs held-out digits, measure the overhead; returns the results dict."""
    from scorekit.bench.digits_unet import heldout_digits, train_ddpm_unet, training_digits

    folder = train_ddpm_unet(args.model_dir, minutes=args.minutes, threads=args.threads)
    held = heldout_digits()
    n = min(args.n or len(held), len(held))
    held = held[:n]  # equal sample and reference counts (both scores are compared at equal counts)
    g = torch.Generator().manual_seed(args.tune_seed)
    train = training_digits()
    tune_ref = train[torch.randperm(len(train), generator=g)[: args.tune_n]]
    theirs, ours = _candidates(args.quick)
    log(f"tuning: {args.tune_n} samples of seed {args.tune_seed} against as many training digits")
    z_tune = _noise(args.tune_n, 10_000 + args.tune_seed)
    tuning = _sweep(folder, theirs, ours, z_tune, tune_ref, log)
    chosen = {side: {nfe: _best(tuning, side, nfe)["label"] for nfe in NFES}
              for side in ("diffusers", "scorekit")}  # fmt: skip
    log(f"reporting on seed {args.seed} against {len(held)} held-out digits")
    z = _noise(n, 10_000 + args.seed)
    labels = {
        "diffusers": {c["label"]: c for c in theirs},
        "scorekit": {c["label"]: c for c in ours},
    }
    report = [_one(folder, side, labels[side][chosen[side][nfe]], z, nfe, held, log)
              for side in ("diffusers", "scorekit") for nfe in NFES]  # fmt: skip
    # training digits vs held-out, at the same counts: what a perfect sampler of the training set scores
    floor = _score(train[torch.randperm(len(train), generator=g)[:n]], held[:n])
    over = overhead(folder, batch=64, nfe=10, repeats=args.repeats)
    log(f"overhead: scorekit {over['scorekit_s']:.3f} s vs the UNet's own calls {over['model_s']:.3f} s "
        f"({100 * over['overhead']:+.1f} %)")  # fmt: skip
    return {"n": n, "seed": args.seed, "tune_seed": args.tune_seed, "tuning": tuning,
            "chosen": chosen, "report": report, "data_floor": floor, "overhead": over,
            "training": json.loads((Path(folder) / "training.json").read_text())}  # fmt: skip


def table(res: dict) -> str:
    """The report table (markdown): each side's chosen candidate per NFE on the held-out seed."""
    get = {(r["side"], r["nfe"]): r for r in res["report"]}
    lines = [
        "| NFE | diffusers (chosen) | 1-NN | FD | scorekit (chosen) | 1-NN | FD |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for nfe in NFES:
        d, s = get[("diffusers", nfe)], get[("scorekit", nfe)]
        lines.append(f"| {nfe} | {d['label']} | {d['nn1']:.3f} | {d['fd']:.3f} | {s['label']} | "
                     f"{s['nn1']:.3f} | {s['fd']:.3f} |")  # fmt: skip
    f = res["data_floor"]
    lines.append(f"| data | training digits vs held-out | {f['nn1']:.3f} | {f['fd']:.3f} | | | |")
    s10, d20 = get[("scorekit", 10)], get[("diffusers", 20)]
    goal = s10["fd"] <= d20["fd"] and s10["nn1"] <= d20["nn1"] + 0.02
    o = res["overhead"]
    lines += [
        "",
        f"Goal (scorekit at 10 NFE at least as good as diffusers at 20): {'met' if goal else 'NOT met'} "
        f"(FD {s10['fd']:.3f} vs {d20['fd']:.3f}; 1-NN {s10['nn1']:.3f} vs {d20['nn1']:.3f}, "
        "1-NN within its noise of 0.02).",
        f"Overhead of scorekit's loop around the UNet (dpmpp_2m, NFE {o['nfe']}, batch {o['batch']}): "
        f"{100 * o['overhead']:+.1f} % of the UNet's own calls ({o['scorekit_s']:.3f} s vs "
        f"{o['model_s']:.3f} s, best of the repeats, one process); the loop alone (the UNet replaced "
        f"by a stub) costs {1e3 * o['loop_s']:.1f} ms, {100 * o['loop_fraction']:.2f} % of the UNet's "
        "calls.",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = benchmark(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    atomic_write_json(out / "results.json", res)
    text = table(res)
    atomic_write(out / "report.md", (text + "\n").encode())
    print(text)
    return 0
