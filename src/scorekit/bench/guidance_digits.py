"""Guidance on digits: class accuracy against sample quality, per rule and scale, at equal network
evaluations (``scorekit bench guidance --digits RUN``), and the guidance section of ``scorekit demo``.

The run is a class-conditional digits run (``scorekit train --data digits --cond --holdout 0.2``).
Every rule samples ``--per-class`` digits of each class 0-9 in one batch (per-row labels), with
``ipndm`` and a budget of ``--budget`` network evaluations per sample: a rule that calls the network
twice per sampler call gets half the sampler calls (``cfg`` etc.), a one-call rule (``cond``,
``guidance_free``, ``classifier``: the classifier's pass is small and counted apart) gets all of them.
Evaluations are counted, not assumed (adaptive guidance and a guidance interval make fewer).
``reward`` (gradient guidance of the label-dropped branch by ``log p(label | x0)`` of ``--classifier``
at sigma 0.01 on Tweedie's estimate) makes a forward and a backward pass through the network per
sampler call, charged as 2 against the budget; its ``nfe_per_sample`` counts the forwards.
``svdd`` / ``svdd@M`` (SVDD-PM, ``scorekit.guidance.svdd``: ``M`` DDPM candidates per step, default
4, kept by the same reward at temperature ``1 / w``, on the label-dropped branch) takes the most
DDPM steps ``N`` whose ``1 + M (N - 1)`` network evaluations fit the budget, on ``sample()``'s grid
with row ``i``'s noise from ``(seed, i)`` (``svdd@1`` is ``euler_ancestral``).

Judges, all fitted on the run's *training* split of the real digits only, and scored against its
*held-out* split (the same stratified split as the run's ``--holdout``):

- class accuracy: scikit-learn's logistic regression on pixels (data units 0..16, divided by 16); the fraction of
  generated digits it assigns to the class they were generated for;
- FD: the Fréchet distance of ``scorekit.train.quality.DigitsClassifier`` features (FD-digits)
  between the generated digits and the held-out digits, beside its floor (as many training digits
  against the held-out digits);
- MMD: a two-sample statistic (``scorekit.metrics.mmd``, Gaussian kernels) on pixels, generated
  against held-out, beside the same floor.

Scale selection is honest: the sweep uses seed 0 (tuning); each rule's best scale (highest accuracy
among the scales whose FD is within 1.25x of the rule's lowest) is measured again with seed 1
(held-out seeds) for the summary table and the pictures.

``--gf-run RUN``: a run of ``scorekit train --cond --guidance-free S`` on the same split, sampled
with one network call per step (its conditional branch, no CFG), against CFG of scale ``S`` on the
``--digits`` run (two calls per step) at equal sampler steps (half the evaluations) and at equal
evaluations (``compare_guidance_free``), with seed ``--gf-seed`` (default 2, held out).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from scorekit import data as sdata
from scorekit import guidance as G
from scorekit.metrics import frechet_distance, mmd
from scorekit.runs import decode, draw, load_run, picture
from scorekit.train.quality import fit_classifier

__all__ = [
    "DEFAULT_SCALES",
    "Judge",
    "Setup",
    "demo_section",
    "measure_rule",
    "run_digits",
    "setup",
]

#: Each rule's scale for pictures and the demo: the best scale of the measured sweep on the
#: 457-step digits run (docs/guidance.md; grid 2, 4: 4 for classifier guidance, 2 for the rest).
DEFAULT_SCALES = {"cond": 1.0, "cfg": 2.0, "cfg_interval": 2.0, "apg": 2.0, "tcfg": 2.0,
                  "adaptive": 2.0, "autoguidance": 2.0, "classifier": 4.0, "cads": 2.0,
                  "guidance_free": 1.0}  # fmt: skip
#: Network evaluations per sampler call of each rule (the budget is divided by it).
_CALLS = {"cond": 1, "cfg": 2, "cfg_interval": 2, "apg": 2, "tcfg": 2, "adaptive": 2,
          "autoguidance": 2, "classifier": 1, "cads": 2, "guidance_free": 1, "reward": 2,
          "adaptive_x0": 2}  # fmt: skip


@dataclass
class Judge:
    """The independent judges: logistic regression (accuracy) and the FD feature network."""

    logreg: Any
    fd_net: Any
    test_pixels: np.ndarray  # held-out digits, data units, [N, 64]
    test_feats: Tensor
    train_pixels: np.ndarray
    train_feats: Tensor
    accuracy_real: float  # logistic regression on the held-out real digits


@dataclass
class Setup:
    den: Any
    info: dict
    judge: Judge
    weak: Any = None
    clf: Any = None  # scorekit.train.classifier.NoisyClassifier
    gf: Any = None  # (denoiser, info) of a guidance-free run
    counts: dict = field(default_factory=lambda: {"net": 0, "clf": 0})


def real_digits(info: dict):
    """The run's own split of the real digits, ``(train, test)``, as its config made it."""
    frac = float(info["config"].get("holdout", 0.2)) or 0.2
    return sdata.split(sdata.load("digits"), holdout=frac, seed=int(info["config"].get("seed", 0)))


def pixels(ds) -> np.ndarray:
    """A digits data set's images as ``[N, 64]`` float64 pixels in data units (0..16)."""
    return ds.normalization.decode(ds.x).reshape(len(ds.x), -1).double().numpy()


def _judge(info: dict, seed: int = 0) -> Judge:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    train, test = real_digits(info)
    tr, te = pixels(train), pixels(test)
    ytr, yte = np.asarray(train.labels), np.asarray(test.labels)
    with threadpool_limits(limits=1):  # BLAS threads on a busy machine: 50 s instead of 1 s
        logreg = LogisticRegression(max_iter=3000).fit(tr / 16, ytr)
        acc = float((logreg.predict(te / 16) == yte).mean())
    net = fit_classifier(train.x.float(), torch.as_tensor(train.labels), epochs=40, seed=seed)
    with torch.no_grad():
        ftr, fte = net.features(train.x.float()), net.features(test.x.float())
    return Judge(logreg, net, te, fte, tr, ftr, acc)


def setup(run_dir, *, weak_step: int | None = None, classifier_dir=None, gf_run=None) -> Setup:
    """The run, its judges, and the optional weak checkpoint, noisy classifier and guidance-free run."""
    den, info = load_run(run_dir)
    if not info["num_classes"]:
        raise ValueError(
            f"{run_dir}: the guidance benchmark needs a class-conditional run (--cond)"
        )
    s = Setup(den, info, _judge(info))
    if weak_step is not None:
        from scorekit.train import checkpoint as ckpt

        folder = Path(run_dir) / "checkpoints" / f"step_{weak_step:09d}"
        tensors, state = ckpt.load(folder)
        from scorekit import nets
        from scorekit.denoiser import build_denoiser

        net = nets.build(state["net"])
        net.load_state_dict(tensors["ema"])
        cfg = state["config"]
        s.weak = build_denoiser(net, process=cfg["process"], param=cfg["param"],
                                sigma_data=state["data"]["sigma_data"]).eval().requires_grad_(False)  # fmt: skip
    if classifier_dir is not None:
        from scorekit.train.classifier import load_classifier

        s.clf = load_classifier(classifier_dir, info)
    if gf_run is not None:
        s.gf = load_run(gf_run)
        _check_gf(s.gf[1], info, gf_run)
    return s


def _check_gf(gf: dict, info: dict, where) -> None:
    """A ``--gf-run`` must be a guidance-free run of the same data split as the ``--digits`` run (the
    judges' held-out digits are held out of both)."""
    cfg, ref = gf["config"], info["config"]
    if not cfg.get("guidance_free"):
        raise ValueError(f"--gf-run: {where} was not trained with --guidance-free (its config has "
                         f"guidance_free={cfg.get('guidance_free')!r}); allowed: a run of "
                         "scorekit train --cond --guidance-free S")  # fmt: skip
    for key in ("data", "holdout", "seed"):
        if cfg.get(key) != ref.get(key):
            raise ValueError(f"--gf-run: {where} has {key}={cfg.get(key)!r}, the --digits run "
                             f"{ref.get(key)!r}; allowed: a run of the same data split")  # fmt: skip
    if list(gf["shape"]) != list(info["shape"]) or gf["num_classes"] != info["num_classes"]:
        raise ValueError(f"--gf-run: {where} makes shape {gf['shape']} with {gf['num_classes']} "
                         f"classes; allowed: the --digits run's {info['shape']} and "
                         f"{info['num_classes']}")  # fmt: skip


def _counted(s: Setup, model, labels: Tensor | int):
    """``model`` with per-row ``labels [B]``, or one label for every row (the unconditional branch,
    which adaptive guidance calls on a subset of the rows), counting the rows evaluated."""

    def d(x: Tensor, sigma: Tensor, **extra) -> Tensor:
        s.counts["net"] += x.shape[0]
        if extra:
            return model(x, sigma, **extra)
        lab = torch.full((x.shape[0],), labels) if isinstance(labels, int) else labels
        return model(x, sigma, class_labels=lab)

    return d


def _make(rule: str, s: Setup, w: float, labels: Tensor) -> Callable:
    """A fresh guided denoiser of ``rule`` at scale ``w`` for per-row ``labels``."""
    c, u = _counted(s, s.den, labels), _counted(s, s.den, -1)
    if rule == "cond":
        return c
    if rule == "guidance_free":
        return _counted(s, s.gf[0], labels)
    if rule == "autoguidance":
        return G.autoguidance(c, _counted(s, s.weak, labels), w)
    if rule == "classifier":

        def log_p(x: Tensor, sigma: Tensor) -> Tensor:
            s.counts["clf"] += x.shape[0]
            return F.log_softmax(s.clf(x, sigma), 1).gather(1, labels[:, None])[:, 0].to(x.dtype)

        return G.classifier_guidance(u, log_p, w)
    if rule == "reward":  # the classifier's log p(label | x0) at sigma 0.01 on Tweedie's estimate
        return G.reward_guidance(u, _reward(s, labels), w)
    if rule == "cads":
        emb = s.den.net.class_emb.embed(labels)
        noisy = G.cads(_counted(s, s.den, labels), emb, sigma_lo=0.5, sigma_hi=5.0,
                       key="class_embedding", generator=torch.Generator().manual_seed(0))  # fmt: skip
        return G.cfg(noisy, u, w)
    makers = {
        "cfg": lambda: G.cfg(c, u, w),
        "cfg_interval": lambda: G.cfg(c, u, w, interval=(0.3, 3.0)),
        "apg": lambda: G.apg(c, u, w),
        "tcfg": lambda: G.tcfg(c, u, w),
        "adaptive": lambda: G.adaptive_guidance(c, u, w, threshold=_threshold(rule)),
        "adaptive_x0": lambda: G.adaptive_guidance(c, u, w, threshold=_threshold(rule), frame="x0"),
    }
    return makers[rule.partition("@")[0]]()


def _reward(s: Setup, labels: Tensor) -> Callable[[Tensor], Tensor]:
    """``r(x0) = log p(label | x0)`` under ``--classifier`` at sigma 0.01 (its lowest trained
    level), per row; counts the classifier's rows. The reward of ``reward`` and ``svdd`` (whose
    ``M`` candidates come candidate-major: pass ``labels.repeat(M)``)."""

    def r(x0: Tensor) -> Tensor:
        s.counts["clf"] += x0.shape[0]
        logits = s.clf(x0, torch.full((x0.shape[0],), 0.01, dtype=x0.dtype))
        return F.log_softmax(logits, 1).gather(1, labels[:, None])[:, 0].to(x0.dtype)

    return r


def _candidates(rule: str) -> int:
    """``svdd`` (4) or ``svdd@M``: the number of candidates ``M >= 1``, or a one-line error."""
    text = rule.partition("@")[2] or "4"
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"--digit-rules: {rule!r} needs svdd@M with an integer M >= 1; got M={text!r}"
        )
    return int(text)


def _svdd_steps(rule: str, budget: int) -> tuple[int, int]:
    """``svdd`` (4 candidates) or ``svdd@M``: ``(M, N)``, the most DDPM steps ``N`` whose cost
    ``1 + M (N - 1)`` network evaluations fits the budget (at least 2 steps)."""
    m = _candidates(rule)
    return m, max(2, (budget - 1) // m + 1)


def _sample_svdd(s: Setup, rule: str, w: float, labels: Tensor, *, nfe: int, seed: int) -> Tensor:
    """SVDD-PM (``scorekit.guidance.svdd``) on the label-dropped branch with ``_reward``,
    temperature ``1 / w``, ``nfe`` DDPM steps on ``sample()``'s grid for the run, and row ``i``'s
    noise from the generator of ``(seed, i)``, as ``scorekit sample --guidance svdd`` draws them."""
    from scorekit.samplers import schedule_sigmas
    from scorekit.samplers.common import row_generators
    from scorekit.train.preview import sampling_range

    m = _candidates(rule)
    if not w > 0:
        raise ValueError(f"--digit-scales: svdd's temperature is 1 / w, so w must be > 0; got {w}")
    lo, hi = sampling_range(s.info["process"], s.info.get("sigma_data", 4.0))
    sig = torch.tensor(schedule_sigmas("karras", nfe, None if lo <= 0.002 else lo, hi),
                       dtype=torch.float64)  # fmt: skip
    gens = row_generators(seed, range(len(labels)))
    x = torch.stack([torch.randn(tuple(s.info["shape"]), generator=g) for g in gens])
    with torch.no_grad():
        return G.svdd(_counted(s, s.den, -1), _reward(s, labels.repeat(m)), x * sig[0].item(), sig,
                      generator=gens, candidates=m, alpha=1.0 / w)  # fmt: skip


def _threshold(rule: str) -> float:
    """``adaptive`` / ``adaptive_x0`` (0.999) or ``adaptive@T`` / ``adaptive_x0@T``: adaptive
    guidance's cosine threshold (``adaptive_x0``: the cosine of the denoised estimates)."""
    return float(rule.partition("@")[2] or 0.999)


def _quality(s: Setup, x: Tensor, labels: Tensor) -> dict:
    j = s.judge
    pix = decode(x, s.info).reshape(len(x), -1).astype(np.float64)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        acc = float((j.logreg.predict(pix / 16) == labels.numpy()).mean())
    with torch.no_grad():
        feats = j.fd_net.features(x.float())
    n = len(x)
    sub = np.random.default_rng(0).permutation(len(j.train_pixels))[:n]
    return {
        "accuracy": acc,
        "fd": frechet_distance(feats, j.test_feats),
        "fd_floor": frechet_distance(j.train_feats[sub], j.test_feats),
        "mmd": mmd(torch.as_tensor(pix), torch.as_tensor(j.test_pixels)),
        "mmd_floor": mmd(torch.as_tensor(j.train_pixels[sub]), torch.as_tensor(j.test_pixels)),
    }


def sample_rule(s: Setup, rule: str, w: float, labels: Tensor, *, nfe: int, seed: int,
                sampler: str = "ipndm") -> Tensor:  # fmt: skip
    """Samples of ``rule`` at scale ``w`` for per-row ``labels``: ipndm with ``nfe`` sampler calls;
    the network evaluations it made are counted in ``s.counts`` (reset here)."""
    s.counts.update(net=0, clf=0)
    if rule.partition("@")[0] == "svdd":
        return _sample_svdd(s, rule, w, labels, nfe=nfe, seed=seed)
    info = s.gf[1] if rule == "guidance_free" else s.info
    return draw(_make(rule, s, w, labels), info, len(labels), nfe=nfe, sampler=sampler, seed=seed)


def measure_rule(s: Setup, rule: str, w: float, *, per_class: int, budget: int, seed: int,
                 steps: int | None = None, sampler: str = "ipndm") -> dict:  # fmt: skip
    """Samples of one rule at one scale, and their accuracy, FD, MMD and counted evaluations;
    ``steps`` sampler calls if given, else as many as ``budget`` evaluations per sample allow."""
    labels = torch.arange(10).repeat_interleave(per_class)
    kind = rule.partition("@")[0]
    nfe = steps or (_svdd_steps(rule, budget)[1] if kind == "svdd" else
                    max(2, budget // _CALLS[kind]))  # fmt: skip
    x = sample_rule(s, rule, w, labels, nfe=nfe, seed=seed, sampler=sampler)
    q = _quality(s, x, labels)
    return {"rule": rule, "scale": w, "seed": seed, "sampler_calls": nfe,
            "nfe_per_sample": s.counts["net"] / len(labels),
            "classifier_per_sample": s.counts["clf"] / len(labels), **q, "samples": x}  # fmt: skip


def compare_guidance_free(s: Setup, *, per_class: int, steps: int, seed: int,
                          sampler: str = "ipndm") -> list[dict]:  # fmt: skip
    """The guidance-free run against CFG on the ``--digits`` run at the scale ``S`` it was trained for.

    Rows (each with ``compare`` saying which; one ``seed`` for all, so all rows share the noise):
    ``cfg`` of scale ``S`` with ``steps`` sampler calls of two network evaluations each;
    ``guidance_free`` (the run's conditional branch alone, no CFG: one evaluation per call) with
    ``steps`` calls (equal steps, half the evaluations) and with ``2 steps`` calls (equal
    evaluations); ``cond`` (the ``--digits`` run's conditional branch, unguided) at both.
    Evaluations are counted (``nfe_per_sample``), not assumed. Rows keep their ``samples``.
    Every row uses ``sampler`` (``--gf-sampler``, default ipndm).
    """
    if s.gf is None:
        raise ValueError("compare_guidance_free needs a guidance-free run (setup(..., gf_run=RUN))")
    if not (isinstance(steps, int) and steps >= 2):
        raise ValueError(f"steps must be a whole number >= 2; got {steps!r}")
    w = float(s.gf[1]["config"]["guidance_free"])
    plan = [("cfg", w, steps, f"cfg w={w:g}, {steps} steps"),
            ("guidance_free", 1.0, steps, "guidance-free, equal steps"),
            ("guidance_free", 1.0, 2 * steps, "guidance-free, equal evaluations"),
            ("cond", 1.0, steps, "cond, equal steps"),
            ("cond", 1.0, 2 * steps, "cond, equal evaluations")]  # fmt: skip
    rows = []
    for rule, scale, n, what in plan:
        r = measure_rule(s, rule, scale, per_class=per_class, budget=0, seed=seed, steps=n,
                         sampler=sampler)  # fmt: skip
        rows.append({**r, "compare": what, "trained_scale": w})
    return rows


def best_scale(rows: list[dict]) -> float:
    """Highest accuracy among the scales whose FD is within 1.25x of the rule's lowest FD."""
    lo = min(r["fd"] for r in rows)
    ok = [r for r in rows if r["fd"] <= 1.25 * lo]
    return max(ok, key=lambda r: (r["accuracy"], -r["fd"]))["scale"]


def demo_section(run_dir, out_dir, *, quick: bool) -> tuple[dict, str, list[str]]:
    """Guidance on a conditional digits run for ``scorekit demo``: one PNG grid of digits 0-9 (a row
    per class) per rule at its default scale (``DEFAULT_SCALES``), with accuracy, FD and MMD.

    Rules: ``cond``, ``cfg``, ``apg``, ``tcfg``, ``cfg_interval``, ``adaptive``; ``autoguidance``
    when the run holds an earlier complete checkpoint (the earliest is the weak model); not quick:
    ``cads`` too. Quick: 10 digits per class and a budget of 20 evaluations; else 20 and 40.
    Returns ``(figures, markdown, png_paths)``: ``figures[rule]`` holds scale, accuracy, fd,
    fd_floor, mmd, mmd_floor, nfe_per_sample.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = sorted(int(p.name[5:]) for p in (Path(run_dir) / "checkpoints").glob("step_*")
                   if p.name[5:].isdigit() and (p / "manifest.json").is_file())  # fmt: skip
    s = setup(run_dir, weak_step=steps[0] if len(steps) > 1 else None)
    rules = ["cond", "cfg", "apg", "tcfg", "cfg_interval", "adaptive"]
    rules += ["autoguidance"] if s.weak is not None else []
    rules += [] if quick else ["cads"]
    per_class, budget = (10, 20) if quick else (20, 40)
    figures, pngs = {}, []
    for rule in rules:
        w = DEFAULT_SCALES[rule]
        r = measure_rule(s, rule, w, per_class=per_class, budget=budget, seed=1)
        x = r.pop("samples")
        path = out / f"guidance_{rule}.png"
        picture(path, x[:: per_class // 10] if per_class > 10 else x, s.info,
                title=f"{rule}, scale {w:g}: rows are classes 0-9")  # fmt: skip
        figures[rule] = {k: r[k] for k in ("scale", "accuracy", "fd", "fd_floor", "mmd", "mmd_floor",
                                           "nfe_per_sample")}  # fmt: skip
        pngs.append(str(path))
    md = _markdown(figures, s, budget, per_class, steps)
    return figures, md, pngs


def _markdown(figures: dict, s: Setup, budget: int, per_class: int, steps: list[int]) -> str:
    lines = [
        "## Guidance on digits",
        "",
        f"Each rule at its default scale, {per_class} digits per class, ipndm with a budget of {budget} "
        "network evaluations per sample (two-model rules get half the sampler calls). Accuracy: "
        "logistic regression fitted on the real training digits (accuracy on held-out real digits "
        f"{s.judge.accuracy_real:.3f}). FD and MMD against the held-out digits, beside the floor "
        "(as many training digits against them)."
        + (f" Autoguidance's weak model: the checkpoint at step {steps[0]}." if s.weak else ""),
        "",
        "| rule | scale | class accuracy | FD (floor) | MMD (floor) | evaluations / sample |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rule, f in figures.items():
        lines.append(f"| {rule} | {f['scale']:g} | {f['accuracy']:.3f} | {f['fd']:.2f} "
                     f"({f['fd_floor']:.2f}) | {f['mmd']:.4f} ({f['mmd_floor']:.4f}) | "
                     f"{f['nfe_per_sample']:.1f} |")  # fmt: skip
    lines += ["", *(f"![{r}](guidance_{r}.png)" for r in figures), ""]
    return "\n".join(lines)


def run_digits(args) -> dict:
    """The sweep (seed 0) and the best-scale re-measure (seed 1); prints tables, writes JSON and PNGs."""
    start = time.perf_counter()
    s = setup(args.digits, weak_step=args.weak_step, classifier_dir=args.classifier,
              gf_run=args.gf_run)  # fmt: skip
    rules = [r for r in args.digit_rules if _available(r, s) and r != "guidance_free"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"per_class": args.per_class, "budget": args.budget}
    sweep, best = [], []
    for rule in rules:
        scales = [1.0] if rule in ("cond", "guidance_free") else args.digit_scales
        rows = [measure_rule(s, rule, w, seed=0, **kw) for w in scales]
        for r in rows:
            r.pop("samples")
            _print_row("sweep", r)
        sweep += rows
        b = measure_rule(s, rule, best_scale(rows), seed=1, **kw)
        x = b.pop("samples")
        picture(out / f"guidance_{rule}.png", x[:: max(1, args.per_class // 10)], s.info,
                title=f"{rule}, scale {b['scale']:g}")  # fmt: skip
        _print_row("held-out seed", b)
        best.append(b)
    gf_rows = _run_gf(s, args, out) if s.gf is not None else []
    result = {"run": str(args.digits), "per_class": args.per_class, "budget": args.budget,
              "accuracy_real": s.judge.accuracy_real, "sweep": sweep, "best": best,
              "guidance_free": gf_rows, "seconds": time.perf_counter() - start}  # fmt: skip
    (out / "guidance_digits.json").write_text(json.dumps(result, indent=1))
    if sweep:  # none with --digit-rules guidance_free alone
        _plot(out / "guidance_digits.png", sweep)
    print(f"wrote {out / 'guidance_digits.json'} ({result['seconds']:.0f} s)")
    return result


def _run_gf(s: Setup, args, out: Path) -> list[dict]:
    """``compare_guidance_free`` at CFG's budget (its steps at two calls each) for each seed of
    ``--gf-seed`` (held out), printed per seed and as means over the seeds; the rows, for the JSON."""
    seeds = getattr(args, "gf_seed", 2)
    seeds = seeds if isinstance(seeds, (list, tuple)) else [seeds]
    print(f"guidance-free run {args.gf_run} against cfg, seeds {seeds} (held out)")
    rows = []
    for seed in seeds:
        for r in compare_guidance_free(s, per_class=args.per_class, steps=max(2, args.budget // 2),
                                       seed=seed, sampler=getattr(args, "gf_sampler", "ipndm")):  # fmt: skip
            x = r.pop("samples")
            if r["compare"] == "guidance-free, equal steps" and seed == seeds[0]:
                picture(out / "guidance_guidance_free.png", x[:: max(1, args.per_class // 10)],
                        s.info, title=f"guidance-free (S = {r['trained_scale']:g}), one call per step")  # fmt: skip
            _print_row(f"seed {seed}", {**r, "rule": r["compare"]})
            rows.append(r)
    for what in dict.fromkeys(r["compare"] for r in rows):
        rs = [r for r in rows if r["compare"] == what]
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("accuracy", "fd", "fd_floor", "mmd",
                                                                 "mmd_floor", "nfe_per_sample")}  # fmt: skip
        fds = [r["fd"] for r in rs]
        _print_row(f"mean of {len(rs)}", {**rs[0], **mean, "rule": what})
        print(f"    FD range over seeds {min(fds):.2f} .. {max(fds):.2f}")
    return rows


def _available(rule: str, s: Setup) -> bool:
    need = {"autoguidance": s.weak, "classifier": s.clf, "reward": s.clf, "svdd": s.clf,
            "guidance_free": s.gf}  # fmt: skip
    if need.get(rule.partition("@")[0], True) is None:
        print(f"skipping {rule}: give --weak-step / --classifier / --gf-run")
        return False
    return True


def _print_row(what: str, r: dict) -> None:
    print(f"  {what:<13} {r['rule']:<18} w={r['scale']:<4g} acc {r['accuracy']:.3f}  FD {r['fd']:.2f} "
          f"(floor {r['fd_floor']:.2f})  MMD {r['mmd']:.4f} (floor {r['mmd_floor']:.4f})  "
          f"nfe/sample {r['nfe_per_sample']:.1f}", flush=True)  # fmt: skip


def _plot(path: Path, rows: list[dict]) -> None:
    from matplotlib.figure import Figure

    from scorekit.train.plots import save_figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for rule in dict.fromkeys(r["rule"] for r in rows):
        rs = [r for r in rows if r["rule"] == rule]
        ax.plot([r["fd"] for r in rs], [r["accuracy"] for r in rs], "o-", label=rule)
        for r in rs:
            ax.annotate(f"{r['scale']:g}", (r["fd"], r["accuracy"]), fontsize=7)
    ax.set_xlabel("FD-digits to held-out digits (lower is better)")
    ax.set_ylabel("class accuracy (logistic regression)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
