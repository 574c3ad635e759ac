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
the tuning seed. With several tuning seeds (``--ag-tune-seed 0 4``) accuracy and FD are averaged
over them first; with several budgets (``--ag-budgets 20 40``: 10 and 20 sampler calls) the
threshold must qualify at every budget (``choose_over_budgets``), and the held-out seeds are
measured at each. On the held-out seeds (``--ag-seeds``, default 1 2 3): ``cond``, CFG, ``adaptive``
and ``adaptive_x0`` at every threshold (the whole saving-vs-quality curve, the chosen one marked).
For comparison, ``cfg_stop@S`` for every ``S`` of ``--ag-stops``: one fixed stop for every row,
``cfg(interval=(S, inf))``, the non-adaptive rule of the same kind (guidance in the first steps only).
The judges (class accuracy, FD, MMD against held-out digits) are ``scorekit.bench.guidance_digits``'s.
Evaluations are counted rows of network calls, not assumed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from scorekit._util import atomic_write_json
from scorekit.bench.guidance_digits import measure_rule, setup

__all__ = ["ACC_TOL", "choose_over_budgets", "choose_threshold", "cosine_trace", "run_adaptive"]

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


def _tuning_mean(rows: list[dict]) -> dict:
    """Accuracy and FD averaged over the tuning seeds' rows of one rule (what ``choose_threshold`` reads)."""
    return {"accuracy": float(np.mean([r["accuracy"] for r in rows])),
            "fd": float(np.mean([r["fd"] for r in rows]))}  # fmt: skip


def choose_over_budgets(tunes: list[dict], thresholds: list[float]) -> float | None:
    """The lowest threshold that ``choose_threshold`` accepts at *every* tuning budget.

    ``tunes``: one dict per budget, rule name -> list of the tuning seeds' rows (accuracy and FD are
    averaged over those seeds first)."""
    ok = set(thresholds)
    for tune in tunes:
        cfg_row = _tuning_mean(tune["cfg"])
        ok = {t for t in ok
              if choose_threshold(cfg_row, {t: _tuning_mean(tune[f"adaptive_x0@{t:g}"])}) == t}  # fmt: skip
    return min(ok) if ok else None


def run_adaptive(args) -> dict:
    """The tuning sweep and the held-out curve; prints them and writes ``guidance_adaptive.json``.

    With several ``--ag-budgets`` the threshold is chosen once per scale, as the lowest that
    qualifies on the tuning seeds at every budget (``choose_over_budgets``), and the held-out
    seeds are measured at each budget."""
    start = time.perf_counter()
    s = setup(args.digits)
    thresholds = sorted(float(t) for t in args.ag_thresholds)
    budgets = list(getattr(args, "ag_budgets", None) or [args.budget])
    tseeds = (
        args.ag_tune_seed if isinstance(args.ag_tune_seed, (list, tuple)) else [args.ag_tune_seed]
    )
    result = {"run": str(args.digits), "per_class": args.per_class, "budgets": budgets,
              "tune_seeds": list(tseeds), "seeds": list(args.ag_seeds), "scales": []}  # fmt: skip
    rules = ["cfg", "adaptive", *(f"adaptive_x0@{t:g}" for t in thresholds),
             *(f"cfg_stop@{stop:g}" for stop in args.ag_stops)]  # fmt: skip
    for w in args.digit_scales:
        entry: dict = {"scale": w, "budgets": []}
        tunes = []
        for budget in budgets:
            b_args = argparse.Namespace(**{**vars(args), "budget": budget})
            print(f"scale {w:g}, budget {budget}: tuning seeds {tseeds}", flush=True)
            trace = cosine_trace(s, w, per_class=args.per_class, budget=budget, seed=tseeds[0])
            for t in trace:
                print(f"  CFG trajectory: sigma {t['sigma']:7.3f}  1 - cos, median (q90): noise "
                      f"frame {t['eps_median']:.1e} ({t['eps_q90']:.1e}), x0 frame "
                      f"{t['x0_median']:.1e} ({t['x0_q90']:.1e})", flush=True)  # fmt: skip
            tune = {rule: [_measure(s, rule, w, seed, b_args) for seed in tseeds] for rule in rules}
            for rs in tune.values():
                for r in rs:
                    print(_line("tuning", r, tune["cfg"][0]["nfe_per_sample"]), flush=True)
            tunes.append(tune)
            entry["budgets"].append({"budget": budget, "cosine_trace": trace,
                                     "tuning": [r for rs in tune.values() for r in rs]})  # fmt: skip
        chosen = choose_over_budgets(tunes, thresholds)
        print(f"  chosen threshold (every budget {budgets}): {chosen}", flush=True)
        entry["chosen"] = chosen
        for budget, b_entry in zip(budgets, entry["budgets"], strict=True):
            b_args = argparse.Namespace(**{**vars(args), "budget": budget})
            held = []
            for seed in args.ag_seeds:
                rows = {rule: _measure(s, rule, w, seed, b_args) for rule in ["cond", *rules]}
                for r in rows.values():
                    star = chosen is not None and r["rule"] == f"adaptive_x0@{chosen:g}"
                    print(_line("held-out*" if star else "held-out", r,
                                rows["cfg"]["nfe_per_sample"]), flush=True)  # fmt: skip
                held += rows.values()
            summary = _summary(held, list(dict.fromkeys(r["rule"] for r in held)))
            for rule, m in summary.items():
                print(f"  mean over held-out seeds, budget {budget}  {rule:<18} acc "
                      f"{m['accuracy']:.3f}  FD {m['fd']:.2f} (+-{m['fd_sd']:.2f})  MMD "
                      f"{m['mmd']:.4f}  nfe/sample {m['nfe_per_sample']:.2f}  saving "
                      f"{100 * m['saving']:.1f}%", flush=True)  # fmt: skip
            b_entry.update(held_out=held, summary=summary)
        result["scales"].append(entry)
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
