"""``--fresh``: the main run's winners on fresh noise, against the best diffusers config there."""

from __future__ import annotations

import math

from scorekit.analytic import target
from scorekit.bench.samplers.config import Config
from scorekit.bench.samplers.diffusers_harness import diffusers_side
from scorekit.bench.samplers.measure import Problem, rms_error
from scorekit.bench.samplers.scorekit_side import replay
from scorekit.samplers.accelerators import GaussianFlow

__all__ = ["fresh_check"]


def _best_diffusers(d_rows: list[dict], target_nfe: int) -> dict:
    """The diffusers row with the lowest (not NaN) error at ``target_nfe``."""
    d_t = [r for r in d_rows if r["target_nfe"] == target_nfe and not math.isnan(r["error"])]
    return min(d_t, key=lambda r: r["error"])


def _fresh_set(problem: Problem, seed: int, summary: dict, flow, config: Config) -> list[dict]:
    """One fresh noise set: per NFE, the winner's error against the best diffusers config's."""
    d_rows = diffusers_side(problem, sorted(summary), config.quick, lambda m: None)
    rows = []
    for t, v in sorted(summary.items()):
        best = v["scorekit"]
        out = replay(best, problem.gm, problem.x_t, flow)
        err = rms_error(out, problem.ref)
        diag = problem.diagnostics(out)
        bd = _best_diffusers(d_rows, t)
        rows.append(
            {"seed": seed, "rows": config.fresh_rows, "target_nfe": t,
             "scorekit": best["config"], "scorekit_error": err,
             "scorekit_flips": diag["flips"], "diffusers": bd["config"],
             "diffusers_error": bd["error"], "diffusers_flips": bd["flips"],
             "ratio": err / bd["error"]}
        )  # fmt: skip
    return rows


def _pooled_lines(rows: list[dict]) -> list[str]:
    """Per NFE, the RMS errors pooled over every fresh set (squared errors weighted by rows)."""
    pooled: dict[int, list[float]] = {}
    for r in rows:
        p = pooled.setdefault(r["target_nfe"], [0.0, 0.0, 0])
        p[0] += r["scorekit_error"] ** 2 * r["rows"]
        p[1] += r["diffusers_error"] ** 2 * r["rows"]
        p[2] += r["rows"]
    return [
        f"{t:>4} | pooled over {n} rows: diffusers {math.sqrt(de / n):.4f} | scorekit "
        f"{math.sqrt(se / n):.4f} | ratio {math.sqrt(se / de):.2f}"
        for t, (se, de, n) in sorted(pooled.items())
    ]


def fresh_check(tname: str, summary: dict, config: Config, log) -> tuple[str, list[dict]]:
    """The winners of the main run on fresh noise: is a ratio a property of the samplers or of the
    few boundary samples in one noise draw?

    For each fresh set (seeds ``seed + 101, seed + 102, ...``, ``--fresh-rows`` rows, never the
    calibration noise) and NFE: the scorekit config that won the main run (``summary[nfe]
    ["scorekit"]``), its schedule unchanged, against the best of *every* diffusers config on that set
    (chosen after the fact, in diffusers' favour). The last line per NFE pools the squared errors
    over all fresh sets. Returns the text and one row per set and NFE.
    """
    flow = GaussianFlow.from_mixture(target(tname))
    lines, rows = [], []
    for k in range(1, config.fresh + 1):
        seed = config.seed + 100 + k
        problem = Problem.draw(tname, config.fresh_rows, seed, config.rtol)
        for row in _fresh_set(problem, seed, summary, flow, config):
            rows.append(row)
            line = (
                f"{row['target_nfe']:>4} | seed {seed}: diffusers {row['diffusers_error']:.4f} "
                f"({row['diffusers_flips']:2d}) {row['diffusers']:>18s} | scorekit "
                f"{row['scorekit_error']:.4f} ({row['scorekit_flips']:2d}) {row['scorekit']:>28s} | "
                f"ratio {row['ratio']:.2f}"
            )
            lines.append(line)
            log(line)
    head = (
        f"the main run's best scorekit config on {config.fresh} fresh noise set(s) of "
        f"{config.fresh_rows} rows, against the best diffusers config on each set (flips in brackets):"
    )
    return "\n".join([head, *lines, *_pooled_lines(rows)]), rows
