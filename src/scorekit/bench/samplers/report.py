"""What ``scorekit bench samplers`` writes: the tables (text), the summary per NFE, the error-vs-NFE
plot and ``results.json``."""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from scorekit._util import atomic_write, atomic_write_json

__all__ = ["overhead_text", "plot", "table", "write_results"]


def _ok(r: dict) -> bool:
    return not math.isnan(r["error"])


def _best_lines(rows: list[dict], tname: str, nfes) -> tuple[list[str], dict]:
    """The best diffusers and scorekit row per NFE, their ratio against the goal of half."""
    lines = [f"== {tname}: RMS error to the exact PF-ODE solution (data units) =="]
    lines.append(
        f"{'NFE':>4} | {'best diffusers (flips)':>38} | {'best scorekit (flips)':>48} | ratio | goal <= 0.5"
    )
    summary = {}
    for t in nfes:
        d = [r for r in rows if r["side"] == "diffusers" and r["target_nfe"] == t and _ok(r)]
        s = [r for r in rows if r["side"] == "scorekit" and r["target_nfe"] == t]
        if not d or not s:
            continue
        bd, bs = min(d, key=lambda r: r["error"]), min(s, key=lambda r: r["error"])
        ratio = bs["error"] / bd["error"]
        summary[t] = {"diffusers": bd, "scorekit": bs, "ratio": ratio}
        lines.append(
            f"{t:>4} | {bd['error']:8.4f} ({bd['flips']:2d}) {bd['config']:>19s} ({bd['nfe']:2d}) | "
            f"{bs['error']:8.4f} ({bs['flips']:2d}) {bs['config']:>29s} ({bs['nfe']:2d}) | {ratio:5.2f} | "
            f"{'met' if ratio <= 0.5 else 'MISSED'}"
        )
    return lines, summary


def _flip_lines(summary: dict) -> list[str]:
    lines = ["the same configs without their flipped samples (flips: nearest component != ref's):"]
    for t, v in summary.items():
        bd, bs = v["diffusers"], v["scorekit"]
        lines.append(
            f"{t:>4} | diffusers {bd['error_without_flips']:.4f} ({bd['flips']} flips, median "
            f"{bd['median']:.4f}) | scorekit {bs['error_without_flips']:.4f} ({bs['flips']} flips, "
            f"median {bs['median']:.4f})"
        )
    return lines


def _schedule_lines(rows: list[dict], nfes) -> list[str]:
    lines = ["best scorekit per schedule (any sampler):"]
    ours = [r for r in rows if r["side"] == "scorekit"]
    for sc in sorted({r["schedule"] for r in ours}):
        cells = []
        for t in nfes:
            s = [r["error"] for r in ours if r["target_nfe"] == t and r["schedule"] == sc]
            cells.append(f"{min(s):.4f}" if s else "   -  ")
        lines.append(f"  {sc:>20s}: " + "  ".join(cells))
    return lines


def table(rows: list[dict], tname: str, nfes) -> tuple[str, dict]:
    """The text table of one target and its summary ``{nfe: {diffusers, scorekit, ratio}}``."""
    lines, summary = _best_lines(rows, tname, nfes)
    lines += _flip_lines(summary) + _schedule_lines(rows, nfes)
    return "\n".join(lines), summary


def overhead_text(overhead: list[dict]) -> str:
    lines = ["== per-step overhead, batch 1, denoiser excluded (best of repeats) =="]
    for r in overhead:
        lines.append(
            f"  {r['scorekit']:>9s} {r['us_per_step_scorekit']:7.1f} us/step  vs  {r['diffusers']:>28s} "
            f"{r['us_per_step_diffusers']:7.1f} us/step   ratio {r['ratio']:.2f} (goal <= 0.33)"
        )
    return "\n".join(lines)


def _best_curve(rows: list[dict], nfes, pred) -> tuple[list[int], list[float]]:
    """Per NFE, the lowest (not NaN) error among the rows that satisfy ``pred``."""
    xs, ys = [], []
    for t in nfes:
        c = [r["error"] for r in rows if r["target_nfe"] == t and pred(r) and _ok(r)]
        if c:
            xs.append(t)
            ys.append(min(c))
    return xs, ys


def _plot_target(ax, tname: str, rows: list[dict], nfes) -> None:
    diffusers = _best_curve(rows, nfes, lambda r: r["side"] == "diffusers")
    ax.plot(*diffusers, "k-o", lw=2, label="diffusers (best)")
    for sc in sorted({r["schedule"] for r in rows if r["side"] == "scorekit"}):
        curve = _best_curve(
            rows, nfes, lambda r, sc=sc: r["side"] == "scorekit" and r["schedule"] == sc
        )
        ax.plot(*curve, "-o", label=f"scorekit {sc}")
    xs, ys = diffusers
    ax.plot(xs, [y / 2 for y in ys], "k:", label="goal: half of diffusers")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(nfes, [str(t) for t in nfes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE (denoiser calls)")
    ax.set_ylabel("RMS error to exact ODE solution")
    ax.set_title(tname)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot(all_rows: dict, nfes, path: Path) -> None:
    """Error vs NFE per target (log-log): best diffusers, best scorekit per schedule, the goal."""
    fig = Figure(figsize=(6 * len(all_rows), 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(all_rows), squeeze=False)
    for ax, (tname, rows) in zip(axes[0], all_rows.items(), strict=True):
        _plot_target(ax, tname, rows, list(nfes))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())


def summary_json(summaries: dict) -> dict:
    """``{target: {nfe: best configs, their errors and ratio}}`` for ``results.json``."""
    return {
        t: {
            str(k): {
                "diffusers": v["diffusers"]["config"],
                "diffusers_error": v["diffusers"]["error"],
                "scorekit": v["scorekit"]["config"],
                "scorekit_error": v["scorekit"]["error"],
                "ratio": v["ratio"],
            }
            for k, v in s.items()
        }
        for t, s in summaries.items()
    }


def write_results(out: Path, result: dict, texts: list[str]) -> None:
    """``results.json`` and ``table.txt`` in ``out``, each written atomically."""
    atomic_write_json(out / "results.json", result)
    atomic_write(out / "table.txt", ("\n\n".join(texts) + "\n").encode())
