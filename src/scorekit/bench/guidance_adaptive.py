"""Adaptive guidance on digits: its saving in network evaluations against CFG's quality, with the
threshold tuned on one seed and reported on held-out seeds
(``scorekit bench guidance --digits RUN --adaptive-sweep``).

At each scale of ``--digit-scales``: first ``cosine_trace``, the cosine of the conditional and
unconditional estimates along CFG's trajectories in both frames (why the noise frame saves little
on a trained network); then on the tuning seed (``--ag-tune-seed``, default 0) CFG, the
noise-frame rule (``adaptive``, threshold 0.999) and ``adaptive_guidance(frame="x0")`` at every
threshold of ``--ag-thresholds``, all with the same sampler calls (ipndm, ``--budget`` / 2 of them:
CFG's two evaluations per call make the budget); the chosen threshold (``choose_threshold``) is
the lowest whose accuracy is within ``ACC_TOL`` of CFG's and whose FD is no higher than CFG's on
the tuning seed. On the held-out seeds (``--ag-seeds``, default 1 2 3): ``cond``, CFG, ``adaptive``
and ``adaptive_x0`` at every threshold (the whole saving-vs-quality curve, the chosen one marked).
For comparison, ``cfg_stop@S`` for every ``S`` of ``--ag-stops``: one fixed stop for every row,
``cfg(interval=(S, inf))``, the non-adaptive rule of the same kind (guidance in the first steps only).
The judges (class accuracy, FD, MMD against held-out digits) are ``scorekit.bench.guidance_digits``'s.
Evaluations are counted rows of network calls, not assumed.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from scorekit._util import atomic_write_json
from scorekit.bench.guidance_digits import measure_rule, setup

__all__ = ["ACC_TOL", "choose_threshold", "cosine_trace", "run_adaptive"]

#: How much lower than CFG's the accuracy may be on the tuning seed (one digit in a hundred).
ACC_TOL = 0.01


def choose_threshold(cfg_row: dict, rows: dict[float, dict]) -> float | None:
    """The lowest threshold (the largest saving) whose row has ``accuracy >= cfg - ACC_TOL`` and
    ``fd <= cfg's fd``; ``None`` if no threshold qualifies. ``rows``: threshold -> measured row."""
    ok = [t for t, r in rows.items()
          if r["accuracy"] >= cfg_row["accuracy"] - ACC_TOL and r["fd"] <= cfg_row["fd"]]  # fmt: skip
    return min(ok) if ok else None


def _line(what: str, r: dict, cfg_nfe: float) -> str:
    saving = 1 - r["nfe_per_sample"] / cfg_nfe
    return (f"  {what:<9} seed {r['seed']} w={r['scale']:<3g} {r['rule']:<18} acc {r['accuracy']:.3f}  "
            f"FD {r['fd']:6.2f}  MMD {r['mmd']:.4f}  nfe/sample {r['nfe_per_sample']:5.2f}  "
            f"saving {100 * saving:4.1f}%")  # fmt: skip


def _measure(s, rule: str, w: float, seed: int, args) -> dict:
    if rule.startswith("cfg_stop@"):
        return _measure_stop(s, float(rule.partition("@")[2]), w, seed, args)
    r = measure_rule(s, rule, w, per_class=args.per_class, budget=args.budget, seed=seed)
    r.pop("samples")
    return r


def _measure_stop(s, sigma_stop: float, w: float, seed: int, args) -> dict:
    """``cfg_stop@S``: the same stop for every row at a fixed sigma, ``cfg(interval=(S, inf))``
    (guided for sigma > S, one conditional call below), at the same sampler calls as CFG."""
    import torch

    from scorekit import guidance as G
    from scorekit.bench.guidance_digits import _counted, _quality
    from scorekit.runs import draw

    labels = torch.arange(10).repeat_interleave(args.per_class)
    c, u = _counted(s, s.den, labels), _counted(s, s.den, -1)
    s.counts.update(net=0, clf=0)
    d = G.cfg(c, u, w, interval=(sigma_stop, float("inf")))
    nfe = max(2, args.budget // 2)
    x = draw(d, s.info, len(labels), nfe=nfe, sampler="ipndm", seed=seed)
    return {"rule": f"cfg_stop@{sigma_stop:g}", "scale": w, "seed": seed, "sampler_calls": nfe,
            "nfe_per_sample": s.counts["net"] / len(labels), **_quality(s, x, labels)}  # fmt: skip


def run_adaptive(args) -> dict:
    """The tuning sweep and the held-out curve; prints them and writes ``guidance_adaptive.json``."""
    start = time.perf_counter()
    s = setup(args.digits)
    thresholds = sorted(float(t) for t in args.ag_thresholds)
    result = {"run": str(args.digits), "per_class": args.per_class, "budget": args.budget,
              "tune_seed": args.ag_tune_seed, "seeds": list(args.ag_seeds), "scales": []}  # fmt: skip
    for w in args.digit_scales:
        print(f"scale {w:g}: tuning seed {args.ag_tune_seed}", flush=True)
        trace = cosine_trace(s, w, per_class=args.per_class, budget=args.budget,
                             seed=args.ag_tune_seed)  # fmt: skip
        for t in trace:
            print(f"  CFG trajectory: sigma {t['sigma']:7.3f}  1 - cos, median (q90): noise frame "
                  f"{t['eps_median']:.1e} ({t['eps_q90']:.1e}), x0 frame {t['x0_median']:.1e} "
                  f"({t['x0_q90']:.1e})", flush=True)  # fmt: skip
        tune = {"cfg": _measure(s, "cfg", w, args.ag_tune_seed, args)}
        tune["adaptive"] = _measure(s, "adaptive", w, args.ag_tune_seed, args)
        for t in thresholds:
            tune[f"adaptive_x0@{t:g}"] = _measure(
                s, f"adaptive_x0@{t:g}", w, args.ag_tune_seed, args
            )
        for stop in args.ag_stops:
            tune[f"cfg_stop@{stop:g}"] = _measure(
                s, f"cfg_stop@{stop:g}", w, args.ag_tune_seed, args
            )
        for r in tune.values():
            print(_line("tuning", r, tune["cfg"]["nfe_per_sample"]), flush=True)
        chosen = choose_threshold(tune["cfg"], {t: tune[f"adaptive_x0@{t:g}"] for t in thresholds})
        print(f"  chosen threshold: {chosen}", flush=True)
        held = []
        for seed in args.ag_seeds:
            rules = ["cond", "cfg", "adaptive", *(f"adaptive_x0@{t:g}" for t in thresholds),
                     *(f"cfg_stop@{stop:g}" for stop in args.ag_stops)]  # fmt: skip
            rows = {rule: _measure(s, rule, w, seed, args) for rule in rules}
            for r in rows.values():
                mark = (
                    "held-out*"
                    if chosen is not None and r["rule"] == f"adaptive_x0@{chosen:g}"
                    else "held-out"
                )
                print(_line(mark, r, rows["cfg"]["nfe_per_sample"]), flush=True)
            held += rows.values()
        summary = _summary(held, list(dict.fromkeys(r["rule"] for r in held)))
        for rule, m in summary.items():
            print(f"  mean over held-out seeds  {rule:<18} acc {m['accuracy']:.3f}  FD {m['fd']:.2f} "
                  f"(+-{m['fd_sd']:.2f})  MMD {m['mmd']:.4f}  nfe/sample {m['nfe_per_sample']:.2f}  "
                  f"saving {100 * m['saving']:.1f}%", flush=True)  # fmt: skip
        result["scales"].append({"scale": w, "cosine_trace": trace, "tuning": list(tune.values()), "chosen": chosen,
                                 "held_out": held, "summary": summary})  # fmt: skip
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out) / "guidance_adaptive.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return result


def cosine_trace(s, w: float, *, per_class: int, budget: int, seed: int) -> list[dict]:
    """Along CFG's trajectories (the tuning seed's digits): per sampler call, sigma and the median
    and 90th percentile over rows of ``1 - cos(x - D_c, x - D_u)`` (the noise frame) and of
    ``1 - cos(D_c, D_u)`` (the ``x0`` frame)."""
    import torch

    from scorekit.runs import draw

    labels = torch.arange(10).repeat_interleave(per_class)
    rows: list[dict] = []

    def one_minus_cos(a, b):
        a, b = a.flatten(1).double(), b.flatten(1).double()
        return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).numpy()

    def guided(x, sigma):
        d_c = s.den(x, sigma, class_labels=labels)
        d_u = s.den(x, sigma, class_labels=torch.full_like(labels, -1))
        eps, x0 = one_minus_cos(x - d_c, x - d_u), one_minus_cos(d_c, d_u)
        rows.append({"sigma": float(sigma.flatten()[0]),
                     "eps_median": float(np.median(eps)), "eps_q90": float(np.quantile(eps, 0.9)),
                     "x0_median": float(np.median(x0)), "x0_q90": float(np.quantile(x0, 0.9))})  # fmt: skip
        return d_u + w * (d_c - d_u)

    draw(guided, s.info, len(labels), nfe=max(2, budget // 2), sampler="ipndm", seed=seed)
    return rows


def _summary(rows: list[dict], rules: list[str]) -> dict:
    """Per rule: mean accuracy, FD (and its standard deviation over seeds), MMD, evaluations, and
    the saving against CFG's mean evaluations."""
    cfg_nfe = np.mean([r["nfe_per_sample"] for r in rows if r["rule"] == "cfg"])
    out = {}
    for rule in rules:
        rs = [r for r in rows if r["rule"] == rule]
        fd = [r["fd"] for r in rs]
        nfe = float(np.mean([r["nfe_per_sample"] for r in rs]))
        out[rule] = {"accuracy": float(np.mean([r["accuracy"] for r in rs])),
                     "fd": float(np.mean(fd)), "fd_sd": float(np.std(fd, ddof=1)) if len(fd) > 1 else 0.0,
                     "mmd": float(np.mean([r["mmd"] for r in rs])), "nfe_per_sample": nfe,
                     "saving": float(1 - nfe / cfg_nfe)}  # fmt: skip
    return out
