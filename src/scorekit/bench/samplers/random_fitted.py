"""``scorekit bench samplers --suite random --fit``: the held-out problems again, with fitting.

For each held-out problem and NFE, start from the candidate the suite chose with the data's
statistics (``AUTO_TELEPORT``'s row: teleport to the spectral band's top, then the band) and fit to
the problem's own **calibration** noise (``CAL_ROWS`` rows drawn with seed ``spec.seed + 5``; the
evaluation noise uses ``spec.seed + 2`` and is never seen by a fit):

* ``optimized``: ``samplers.optimized`` on the teleported sampler (``accelerators.with_teleport``),
  with the chosen sigmas as the only start, a free last sigma (floor ``SIGMA_FLOOR``) and L-BFGS;
* ``bespoke``: ``samplers.fit_bespoke`` of a linear solver (base: the chosen sampler when it is
  linear, ``dpmpp_2m`` otherwise) on the chosen band with the teleport start (the teleport target
  free too), Adam.

Each is measured on the evaluation noise against the exact PF-ODE solution; the ratio is to
diffusers' best on the same problem (from the suite's run), as in the suite's tables. The row of
each NFE is the better of the two, chosen per problem on the calibration error (not the evaluation
error), and both are kept in the results.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from scorekit.bench.samplers.candidates import steps_within
from scorekit.bench.samplers.measure import rms_error
from scorekit.pfode import pf_ode_reference
from scorekit.samplers import fit_bespoke, optimized
from scorekit.samplers.accelerators import with_teleport
from scorekit.samplers.bespoke import LINEAR
from scorekit.samplers.defaults import Choice, auto_sigmas

__all__ = ["CAL_ROWS", "fitted_errors", "fitted_table"]

CAL_ROWS = 256
SIGMA_FLOOR = 0.002


def _calibration(problem, spec, rows: int, rtol: float):
    g = torch.Generator().manual_seed(spec.seed + 5)
    x_t = problem.sigma_max * torch.randn(rows, problem.gm.dim, generator=g, dtype=torch.float64)
    return x_t, pf_ode_reference(problem.gm, x_t, problem.sigma_max, 0.0, rtol=rtol, atol=rtol)


def fitted_errors(problem, spec, flow, choices: dict[int, Choice], *, rows: int = CAL_ROWS,
                  iterations: int = 15, bespoke_iterations: int = 150, rtol: float = 1e-7,
                  log=print) -> dict[int, dict]:  # fmt: skip
    """Per NFE: the evaluation and calibration errors of ``optimized`` and ``bespoke`` started from
    ``choices[nfe]`` (a teleport choice), fitted on calibration noise only, and the seconds spent."""
    cal = _calibration(problem, spec, rows, rtol)
    out = {}
    for nfe, choice in choices.items():
        t0 = time.perf_counter()
        try:
            rec = _fit_one(
                problem, spec, flow, choice, nfe, cal, iterations, bespoke_iterations, rtol
            )
        except (ValueError, RuntimeError) as err:  # a fit that fails is reported, not hidden
            rec = {"error": math.inf, "chosen": None, "failed": f"{type(err).__name__}: {err}"}
            log(f"    fit p{spec.index} NFE {nfe} failed: {rec['failed']}")
            out[nfe] = rec
            continue
        rec["seconds"] = time.perf_counter() - t0
        log(f"    fit p{spec.index} NFE {nfe}: optimized {rec['optimized']['error']:.4g}, bespoke "
            f"{rec['bespoke']['error']:.4g} -> {rec['chosen']} ({rec['seconds']:.0f}s)")  # fmt: skip
        out[nfe] = rec
    return out


def _fit_one(problem, spec, flow, choice: Choice, nfe: int, cal, iterations: int,
             bespoke_iterations: int, rtol: float) -> dict:  # fmt: skip
    """``optimized`` and ``bespoke`` from ``choice`` at ``nfe``: their errors and the chosen one."""
    smax, gm = problem.sigma_max, problem.gm
    n = steps_within(choice.sampler, choice.options, nfe)
    band, top = auto_sigmas(choice, n, smax, evals=flow.evals)
    rec = {}
    # the optimised schedule of the teleported sampler (the teleport target is its sigmas[1])
    if top is None:  # a choice without the teleport (the jump start, or from sigma_max)
        raise ValueError(f"the fitted row starts from a teleport choice; got {choice}")
    fn = with_teleport(choice.sampler, flow)
    start = torch.cat([torch.tensor([smax], dtype=torch.float64), band])
    sig = optimized(
        gm, fn, len(start) - 1, sigma_min=SIGMA_FLOOR, sigma_max=smax, shape=cal[0].shape,
        seed=spec.seed + 5, init=(), starts=[start], free_sigma_min=True,
        iterations=iterations, sampler_options=choice.options, reference_rtol=rtol,
    )  # fmt: skip
    rec["optimized"] = {
        "error": rms_error(fn(gm, problem.x_t.clone(), sig, **choice.options), problem.ref),
        "calibration": rms_error(fn(gm, cal[0].clone(), sig, **choice.options), cal[1]),
        "sigmas": sig.tolist(),
    }
    # the bespoke solver on the band, teleported from sigma_max
    base = choice.sampler if choice.sampler in LINEAR else "dpmpp_2m"
    opts = choice.options if base == choice.sampler else {}
    solver = fit_bespoke(
        gm, band, calibration=cal, base=base, base_options=opts,
        gaussian=flow, sigma_max=smax,
        iterations=bespoke_iterations,
    )  # fmt: skip
    rec["bespoke"] = {
        "error": rms_error(solver(gm, problem.x_t.clone(), gaussian=flow), problem.ref),
        "calibration": rms_error(solver(gm, cal[0].clone(), gaussian=flow), cal[1]),
        "base": base,
    }
    best = min(("optimized", "bespoke"), key=lambda k: rec[k]["calibration"])
    rec["chosen"], rec["error"] = best, rec[best]["error"]
    return rec


def _fit_ratios(per: list[dict], nfe: int, kind: str) -> list[float]:
    """``kind``'s error (``"chosen"``, ``"optimized"``, ``"bespoke"``) / diffusers' best, per problem."""
    out = []
    for p in per:
        f = p["fitted"].get(nfe, p["fitted"].get(str(nfe)))
        e = f["error"] if kind == "chosen" or "failed" in f else f[kind]["error"]
        d = p["diffusers"].get(nfe, p["diffusers"].get(str(nfe)))[1]
        out.append(e / d if math.isfinite(e) else math.inf)
    return out


def fitted_table(held: list[dict], nfes) -> list[dict]:
    """Per NFE: median and worst ratio of the fitted error (and of each fit) to diffusers' best."""
    rows = []
    for nfe in nfes:
        per = [p for p in held if nfe in p.get("fitted", {}) or str(nfe) in p.get("fitted", {})]
        if not per:
            continue
        r, ro, rb = (_fit_ratios(per, nfe, k) for k in ("chosen", "optimized", "bespoke"))
        rows.append({
            "nfe": nfe, "median": statistics.median(r), "worst": max(r),
            "wins": sum(v < 1 for v in r), "problems": len(r),
            "optimized_median": statistics.median(ro), "bespoke_median": statistics.median(rb),
        })  # fmt: skip
    return rows


def fitted_text(rows: list[dict], part: str = "held-out") -> str:
    """The fitted table of ``part``'s problems as fixed-width text."""
    lines = [
        f"{part} problems with fitting on each problem's calibration noise (optimized / bespoke, "
        "the better on calibration): error / diffusers' best",
        f"{'NFE':>4}  {'median':>7}  {'worst':>7}  {'wins':>6}  {'optimized med':>13}  "
        f"{'bespoke med':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r['nfe']:>4}  {r['median']:7.3f}  {r['worst']:7.3f}  {r['wins']:>2}/{r['problems']:<3}  "
            f"{r['optimized_median']:13.3f}  {r['bespoke_median']:11.3f}"
        )
    return "\n".join(lines)
