"""``scorekit bench guidance``: distance to the exact tilted target against network evaluations.

For class-conditional Gaussian mixtures (``ring6``: 2-D, 3 classes; ``gmm16``: 16-D, 4 classes;
``scorekit.guidance.class_target``) every guidance rule is run on the *exact* conditional and
unconditional denoisers of class 0, so what is measured is the rule itself (and its sampler's
discretisation), never a network's error. For each scale ``w`` in 1, 2, 4, 8 the reference is the
exact tilted target ``p_w ∝ p(x|y)^w p(x)^(1-w)`` (exact samples by accept-reject,
``ClassMixture.tilted_sample``); the figure is the sliced W2 between ``--n`` samples of the rule and
``--n`` exact samples, beside the floor (the mean sliced W2 between that exact set and three
independent exact sets of the same size).

``--fk-sweep`` (``fk_smc`` at ``--convergence-scale`` against steps, correctors, ``sigma_final``,
``ess_step`` and seeds) measures more carefully, because on ring6 the sliced W2 between two exact sets
is mostly how they share the mass between the two class-0 components (3 apart): there the floor is
the mean over all pairs of ``--fk-refs`` independent exact sets (with its spread), a run's figure is
its mean sliced W2 to each of those sets, and ``--fk-null`` further exact sets measured the same way
give the exact-vs-exact ratios, i.e. what a perfect sampler would score.

Cost is network evaluations per sample: every row passed to a denoiser (or to the classifier, for
classifier guidance) counts once, so a CFG call costs 2 and a rule that skips the unconditional
model on some rows (adaptive guidance, a guidance interval) is charged only for what it ran.

Rules and samplers (``N = --steps`` karras steps, sigma in [0.002, 80]):
``cfg`` / ``cfg_rescale`` (phi = 0.7) / ``cfg_interval`` (sigma in (0.3, 5]) / ``apg`` (eta = 0,
momentum -0.5) / ``tcfg`` / ``adaptive`` (threshold 0.999) / ``classifier`` (exact noisy classifier)
with ``dpmpp_2m``; ``cfg_ddpm`` (CFG with DDPM ancestral steps, the reference process of
``fk_smc``); ``fk_smc`` (one population of ``--n`` particles, and groups of 64); ``cfg_pc`` with 1 and
4 Langevin corrector steps. Then, at ``--convergence-scale``, ``fk_smc`` with 50 and 200 steps and
1, 64 and ``--n`` particles per population, and ``cfg_pc`` (25 steps) with 0, 1, 4, 16 correctors.

``--digits RUN`` measures the rules on a class-conditional digits run instead (class accuracy, FD,
MMD against held-out digits, at equal network evaluations): ``scorekit.bench.guidance_digits``.
``--digits RUN --minority-run CLS``: minority guidance with a trained minority classifier, per-scale
rarity and FD with a PNG grid per scale (``scorekit.bench.guidance_minority``).
``--digits RUN --adaptive-sweep``: adaptive guidance's saving against CFG's quality, threshold tuned on
one seed and reported on held-out ones (``scorekit.bench.guidance_adaptive``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from scorekit._util import atomic_write_json
from scorekit.guidance import (
    adaptive_guidance,
    apg,
    cfg,
    cfg_pc,
    class_target,
    classifier_guidance,
    fk_smc,
    tcfg,
)
from scorekit.metrics import sliced_wasserstein
from scorekit.samplers import REGISTRY
from scorekit.schedules import karras

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="bench_out/guidance", help="output folder (JSON)")
    a("--n", type=int, default=2048, help="samples per rule and scale (default 2048)")
    a("--steps", type=int, default=50, help="karras steps per sampling call (default 50)")
    a("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    a("--targets", nargs="+", default=["ring6", "gmm16"])
    a("--quick", action="store_true", help="ring6 only, 512 samples, scales 1 and 4")
    a("--convergence-scale", type=float, default=4.0, help="scale of the convergence sweeps")
    a("--seed", type=int, default=0)
    f = parser.add_argument_group("fk_smc with resample-move correctors on gmm16 (--fk-sweep)")
    f.add_argument("--fk-sweep", action="store_true", help="only the fk_smc corrector sweep")
    f.add_argument("--fk-seeds", type=int, nargs="+", default=[2, 3, 4])
    f.add_argument("--fk-steps", type=int, nargs="+", default=[100, 200])
    f.add_argument("--fk-correctors", type=int, nargs="+", default=[0, 4])
    f.add_argument("--fk-particles", type=int, default=256)
    f.add_argument("--fk-sigma-final", type=float, nargs="+", default=[0.0],
                   help="fk_smc's sigma_final values (0: weights to the end, a final resample)")  # fmt: skip
    f.add_argument("--fk-targets", nargs="+", default=["gmm16"], help="default gmm16")
    f.add_argument("--fk-ess-step", type=float, nargs="+", default=[0.0],
                   help="fk_smc's ess_step values (0: no adaptive sub-steps)")  # fmt: skip
    f.add_argument("--fk-corrector-step", type=float, nargs="+", default=[0.5],
                   help="fk_smc's corrector_step values (Langevin step in units of the level's "
                   "du / 2; default 0.5)")  # fmt: skip
    f.add_argument("--fk-refs", type=int, default=8, help="exact reference sets: the floor is "
                   "the mean sliced W2 over all their pairs, a run's figure its mean to them")  # fmt: skip
    f.add_argument("--fk-null", type=int, default=16, help="independent exact sets measured like "
                   "a run: the exact-vs-exact ratios (what a perfect sampler would score)")  # fmt: skip
    g = parser.add_argument_group("digits (scorekit.bench.guidance_digits)")
    g.add_argument("--digits", metavar="RUN_DIR", help="a class-conditional digits run: measure the "
                   "rules on it (class accuracy, FD, MMD) instead of the exact mixtures")  # fmt: skip
    g.add_argument("--weak-step", type=int, help="digits: autoguidance's weak checkpoint step")
    g.add_argument(
        "--classifier", metavar="CLS_DIR", help="digits: scorekit train-classifier output"
    )
    g.add_argument("--gf-run", metavar="RUN_DIR", help="digits: a --guidance-free run (same data "
                   "split) against cfg of its scale at equal steps and at equal evaluations")  # fmt: skip
    g.add_argument("--gf-seed", type=int, nargs="+", default=[2], help="digits: the seeds of the "
                   "--gf-run comparison (default 2; 0 tunes the scales, 1 re-measures them)")  # fmt: skip
    g.add_argument("--gf-sampler", default="ipndm", help="digits: the sampler of every row of the "
                   "--gf-run comparison (default ipndm)")  # fmt: skip
    g.add_argument("--per-class", type=int, default=20, help="digits per class (default 20)")
    g.add_argument(
        "--budget", type=int, default=20, help="network evaluations per sample (default 20)"
    )
    g.add_argument("--digit-scales", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    g.add_argument("--digit-rules", nargs="+", default=["cond", "cfg", "cfg_interval", "apg", "tcfg",
                   "adaptive", "autoguidance", "classifier", "cads", "guidance_free"])  # fmt: skip
    g.add_argument("--adaptive-sweep", action="store_true", help="digits: adaptive guidance's saving "
                   "against CFG's quality (scorekit.bench.guidance_adaptive) instead of the rules")  # fmt: skip
    g.add_argument("--ag-thresholds", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.97, 0.99],
                   help="--adaptive-sweep: the x0-frame thresholds")  # fmt: skip
    g.add_argument("--ag-tune-seed", type=int, nargs="+", default=[0],
                   help="--adaptive-sweep: the tuning seeds (accuracy and FD averaged over them)")  # fmt: skip
    g.add_argument("--ag-budgets", type=int, nargs="+", help="--adaptive-sweep: several budgets; "
                   "the threshold must qualify on the tuning seeds at every one (default: --budget)")  # fmt: skip
    g.add_argument("--ag-stops", type=float, nargs="*", default=[4.0, 2.0, 1.0],
                   help="--adaptive-sweep: fixed sigma stops cfg(interval=(S, inf)) to compare")  # fmt: skip
    g.add_argument("--ag-seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="--adaptive-sweep: the held-out seeds")  # fmt: skip
    m = parser.add_argument_group("minority guidance on digits (scorekit.bench.guidance_minority)")
    m.add_argument("--minority-run", metavar="CLS_DIR", help="with --digits RUN: a minority "
                   "classifier (train-classifier --minority-of RUN); per-scale table and PNG grids")  # fmt: skip
    m.add_argument("--minority-scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    m.add_argument("--minority-n", type=int, default=500, help="samples per scale (default 500)")
    m.add_argument("--minority-seed", type=int, default=2, help="default 2 (held out)")
    m.add_argument("--minority-calls", type=int, default=20, help="ipndm calls (default 20)")


class _Counting:
    """Counts the rows a denoiser (or classifier) is evaluated on."""

    def __init__(self, inner):
        self.inner, self.rows = inner, 0

    def __call__(self, x, sigma):
        self.rows += x.shape[0]
        return self.inner(x, sigma)


def _rules(t, w: float):
    """name -> function(cond, uncond, classifier, x, sigmas, generator) -> samples."""
    ode = REGISTRY["dpmpp_2m"]

    def guided(make):
        return lambda c, u, k, x, s, g: ode(make(c, u, k), x, s)

    return {
        "cfg": guided(lambda c, u, k: cfg(c, u, w)),
        "cfg_rescale": guided(lambda c, u, k: cfg(c, u, w, rescale=0.7)),
        "cfg_interval": guided(lambda c, u, k: cfg(c, u, w, interval=(0.3, 5.0))),
        "apg": guided(lambda c, u, k: apg(c, u, w)),
        "tcfg": guided(lambda c, u, k: tcfg(c, u, w)),
        "adaptive": guided(lambda c, u, k: adaptive_guidance(c, u, w, threshold=0.999)),
        "classifier": guided(lambda c, u, k: classifier_guidance(u, k, w)),
        "cfg_ddpm": lambda c, u, k, x, s, g: REGISTRY["euler_ancestral"](
            cfg(c, u, w), x, s, generator=g
        ),
        "fk_smc": lambda c, u, k, x, s, g: fk_smc(c, u, x, s, scale=w, generator=g),
        "fk_smc_64": lambda c, u, k, x, s, g: fk_smc(
            c, u, x, s, scale=w, generator=g, particles=64
        ),
        "cfg_pc_1": lambda c, u, k, x, s, g: cfg_pc(
            c, u, x, s, scale=w, n_corrector=1, generator=g
        ),
        "cfg_pc_4": lambda c, u, k, x, s, g: cfg_pc(
            c, u, x, s, scale=w, n_corrector=4, generator=g
        ),
    }


def _measure(t, name: str, w: float, n: int, steps: int, seed: int, exact) -> dict:
    """One rule at one scale: sliced W2 to the exact samples, evaluations per sample, seconds."""
    c, u = _Counting(t.cond(0)), _Counting(t.uncond)
    k = _Counting(t.classifier(0))
    sig = karras(steps, 0.002, 80.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = 80.0 * torch.randn(n, t.dim, generator=g, dtype=torch.float64)
    start = time.perf_counter()
    out = _rules(t, w)[name](c, u, k, x, sig, g)
    seconds = time.perf_counter() - start
    return {
        "rule": name,
        "scale": w,
        "sw2": sliced_wasserstein(out, exact),
        "nfe_per_sample": (c.rows + u.rows + k.rows) / n,
        "seconds": seconds,
    }


def _convergence(t, w: float, args, exact) -> list[dict]:
    """``fk_smc`` against steps and particles, ``cfg_pc`` against corrector steps, at one scale."""
    rows = []
    sweeps = [("fk_smc", st, p, 0) for st in (50, 200) for p in (1, 64, args.n)]
    sweeps += [("cfg_pc", 25, 0, c) for c in (0, 1, 4, 16)]
    for rule, steps, p, c in sweeps:
        cu, uu = _Counting(t.cond(0)), _Counting(t.uncond)
        sig = karras(steps, 0.002, 80.0, dtype=torch.float64)
        g = torch.Generator().manual_seed(args.seed)
        x = 80.0 * torch.randn(args.n, t.dim, generator=g, dtype=torch.float64)
        start = time.perf_counter()
        if rule == "fk_smc":
            out = fk_smc(cu, uu, x, sig, scale=w, particles=p, generator=g)
        else:
            out = cfg_pc(cu, uu, x, sig, scale=w, n_corrector=c, generator=g)
        rows.append(
            {
                "rule": rule,
                "steps": steps,
                "particles": p,
                "n_corrector": c,
                "scale": w,
                "sw2": sliced_wasserstein(out, exact),
                "nfe_per_sample": (cu.rows + uu.rows) / args.n,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def _target(name: str, args) -> dict:
    t = class_target(name)
    rows, floors = [], {}
    for w in args.scales:
        g = torch.Generator().manual_seed(args.seed + 1000)
        exact, *others = (t.tilted_sample(0, w, args.n, g) for _ in range(4))
        floors[w] = sum(sliced_wasserstein(exact, o) for o in others) / len(others)
        for rule in _rules(t, w):
            rows.append(_measure(t, rule, w, args.n, args.steps, args.seed, exact))
        if w == args.convergence_scale:
            conv = _convergence(t, w, args, exact)
    res = {"target": name, "dim": t.dim, "floor": floors, "rows": rows}
    if args.convergence_scale in args.scales:
        res["convergence"] = conv
    return res


def _print(res: dict, scales) -> None:
    print(f"{res['target']} (d={res['dim']}): sliced W2 to the exact tilted target (nfe/sample)")
    print(f"  {'rule':<13}" + "".join(f"{'w=' + format(w, 'g'):>18}" for w in scales))
    print(f"  {'exact floor':<13}" + "".join(f"{res['floor'][w]:>18.4f}" for w in scales))
    for rule in dict.fromkeys(r["rule"] for r in res["rows"]):
        cells = {r["scale"]: r for r in res["rows"] if r["rule"] == rule}
        line = "".join(
            f"{cells[w]['sw2']:>10.4f} ({cells[w]['nfe_per_sample']:>5.0f})" for w in scales
        )
        print(f"  {rule:<13}{line}")


def _print_convergence(res: dict) -> None:
    rows = res["convergence"]
    w = rows[0]["scale"]
    print(f"  convergence at w={w:g} (floor {res['floor'][w]:.4f}):")
    for r in rows:
        what = (
            f"fk_smc  steps={r['steps']:<4} particles={r['particles']:<5}"
            if r["rule"] == "fk_smc"
            else f"cfg_pc  steps={r['steps']:<4} correctors={r['n_corrector']:<4}"
        )
        print(f"    {what}  sw2 {r['sw2']:.4f}  nfe/sample {r['nfe_per_sample']:.0f}")


def _fk_sweep(args) -> list[dict]:
    """``fk_smc`` at ``--convergence-scale`` on each of ``--fk-targets``: ratio to the exact floor
    per steps, correctors, ``sigma_final`` and seed."""
    rows = []
    for name in args.fk_targets:
        rows += _fk_target(name, args)
    return rows


def _references(t, w: float, n: int, k: int, null: int) -> dict:
    """``k`` independent exact sets of ``n`` tilted samples (seed 1000), the floor as the mean (and
    spread) of the sliced W2 over all their pairs, and ``null`` further exact sets (seed 2000)
    measured like a run: their ratios are what a perfect sampler would score."""
    if k < 3 or null < 0:  # 3 sets: 3 pairs, so the floor has a spread
        raise ValueError(f"--fk-refs must be >= 3 and --fk-null >= 0; got {k} and {null}")
    g = torch.Generator().manual_seed(1000)
    refs = [t.tilted_sample(0, w, n, g) for _ in range(k)]
    pairs = [sliced_wasserstein(a, b) for a, b in itertools.combinations(refs, 2)]
    floor = statistics.fmean(pairs)
    g = torch.Generator().manual_seed(2000)
    nulls = [_to_refs(t.tilted_sample(0, w, n, g), refs) / floor for _ in range(null)]
    return {"refs": refs, "floor": floor, "floor_sd": statistics.stdev(pairs),
            "floor_pairs": (min(pairs), max(pairs)), "null_ratios": nulls}  # fmt: skip


def _share_tv(t, out, refs) -> float:
    """Total variation between the class-0 component shares (mean responsibilities at sigma 0) of
    ``out`` and of the pooled exact sets: how the run splits the mass between separated modes."""
    share = lambda z: t.cond(0).responsibilities(z, 0.0).mean(0)  # noqa: E731
    return 0.5 * float((share(out) - share(torch.cat(refs))).abs().sum())


def _to_refs(out, refs) -> float:
    """The mean sliced W2 from ``out`` to each exact reference set."""
    return statistics.fmean(sliced_wasserstein(out, r) for r in refs)


def _fk_target(name: str, args) -> list[dict]:
    t, w, n = class_target(name), args.convergence_scale, args.n
    ref = _references(t, w, n, args.fk_refs, args.fk_null)
    floor, nulls = ref["floor"], ref["null_ratios"]
    print(f"fk_smc on {name}, w={w:g}, {n} samples, groups of {args.fk_particles}; floor "
          f"{floor:.4f} (sd {ref['floor_sd']:.4f}, {ref['floor_pairs'][0]:.4f} .. "
          f"{ref['floor_pairs'][1]:.4f} over the pairs of {args.fk_refs} exact sets)")  # fmt: skip
    if nulls:
        print(f"  exact vs exact ({len(nulls)} independent sets): ratios {min(nulls):.2f} .. "
              f"{max(nulls):.2f}, mean {statistics.fmean(nulls):.2f}")  # fmt: skip
    rows = [{"target": name, "rule": "exact_vs_exact", "null_ratios": nulls, "floor": floor,
             "floor_sd": ref["floor_sd"], "floor_pairs": ref["floor_pairs"]}]  # fmt: skip
    for steps in args.fk_steps:
        for c in args.fk_correctors:
            grid = itertools.product(args.fk_sigma_final, args.fk_ess_step, args.fk_corrector_step)
            for sf, es, cs in grid:
                for seed in args.fk_seeds:
                    g = torch.Generator().manual_seed(seed)
                    x = 80.0 * torch.randn(n, t.dim, generator=g, dtype=torch.float64)
                    st: dict = {}
                    sig = karras(steps, 0.002, 80.0, dtype=torch.float64)
                    out = fk_smc(t.cond(0), t.uncond, x, sig, scale=w, generator=g,
                                 particles=args.fk_particles, n_corrector=c, sigma_final=sf,
                                 ess_step=es, corrector_step=cs, stats=st)  # fmt: skip
                    sw = _to_refs(out, ref["refs"])
                    rows.append({"target": name, "steps": steps, "n_corrector": c,
                                 "sigma_final": sf, "ess_step": es, "corrector_step": cs,
                                 "seed": seed, "sw2": sw,
                                 "floor": floor, "substeps": st["substeps"],
                                 "ratio": sw / floor, "nfe_per_sample": st["nfe"],
                                 "min_ess": min(st["ess"]),
                                 "share_tv": _share_tv(t, out, ref["refs"])})  # fmt: skip
                    print(f"  steps {steps:<4} C {c:<2} step {cs:<4g} sigma_final {sf:<5g} "
                          f"ess_step {es:<4g} seed {seed}: sw2 "
                          f"{sw:.4f}  ratio {sw / floor:.2f}  nfe/sample {st['nfe']}  min ESS "
                          f"{min(st['ess']):.1f}  share TV {rows[-1]['share_tv']:.3f}",
                          flush=True)  # fmt: skip
                rs = [r["ratio"] for r in rows[-len(args.fk_seeds) :]]
                print(f"  steps {steps:<4} C {c:<2} step {cs:<4g} sigma_final {sf:<5g} "
                      f"ess_step {es:<4g} ratios "
                      f"{min(rs):.2f} .. "
                      f"{max(rs):.2f}, mean {sum(rs) / len(rs):.2f}", flush=True)  # fmt: skip
    return rows


def run(args: argparse.Namespace) -> int:
    if args.fk_sweep:
        torch.set_num_threads(1)
        rows = _fk_sweep(args)
        out = Path(args.out) / "guidance_fk.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, rows)
        return 0
    if args.minority_run is not None:
        if args.digits is None:
            raise ValueError("--minority-run needs --digits RUN (the run it was trained on)")
        from scorekit.bench.guidance_minority import run_minority

        torch.set_num_threads(1)
        run_minority(args)
        return 0
    if args.digits is not None and args.adaptive_sweep:
        from scorekit.bench.guidance_adaptive import run_adaptive

        torch.set_num_threads(1)
        run_adaptive(args)
        return 0
    if args.digits is not None:
        from scorekit.bench.guidance_digits import run_digits

        torch.set_num_threads(1)
        run_digits(args)
        return 0
    if args.quick:
        args.n, args.scales, args.targets = 512, [1.0, 4.0], ["ring6"]
    if args.n < 64 or args.n % 64:
        raise ValueError(f"--n must be a positive multiple of 64; got {args.n}")
    if args.steps < 2:
        raise ValueError(f"--steps must be >= 2; got {args.steps}")
    torch.set_num_threads(1)
    result = {"n": args.n, "steps": args.steps, "targets": []}
    for name in args.targets:
        res = _target(name, args)
        _print(res, args.scales)
        if "convergence" in res:
            _print_convergence(res)
        result["targets"].append(res)
    out = Path(args.out) / "guidance.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0
