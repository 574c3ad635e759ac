"""scorekit's side of the benchmark: every sampler on the fixed schedules, then the optimised
schedules of the best few (with and without the teleport start), then the teleport+bespoke solver."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from scorekit.bench.samplers.candidates import (
    OPTIONS,
    benchmark_samplers,
    bespoke_fit,
    ranked_samplers,
    selection_family,
    steps_within,
    teleport_starts,
)
from scorekit.bench.samplers.config import Config
from scorekit.bench.samplers.measure import Counted, Problem, rms_error
from scorekit.process import DiscreteProcess
from scorekit.samplers import BespokeSolver, optimized
from scorekit.samplers.accelerators import GaussianFlow, with_teleport
from scorekit.samplers.registry import get_sampler
from scorekit.schedules import SCHEDULES

__all__ = ["replay", "scorekit_side"]

#: the fixed schedules and their options, all from sigma_max to the DDPM table's sigma_min.
FIXED = {
    "karras": {},
    "loglinear": {},
    "polyexponential": {"rho": 2.0},
    "uniform_t": {"process": DiscreteProcess.linear()},
}


def record(problem: Problem, label: str, sched_label: str, target_nfe: int, fn, sigmas: Tensor,
           options: dict) -> dict:  # fmt: skip
    """Run ``fn`` on the problem's noise with ``sigmas``; its row (error, counted NFE, diagnostics)."""
    counted = Counted(problem.gm)
    out = fn(counted, problem.x_t.clone(), sigmas, **options)
    return {"side": "scorekit", "config": f"{label}/{sched_label}", "sampler": label,
            "schedule": sched_label, "target_nfe": target_nfe, "nfe": counted.calls,
            "steps": len(sigmas) - 1, "error": rms_error(out, problem.ref),
            "sigmas": sigmas.tolist(), **problem.diagnostics(out)}  # fmt: skip


def fixed_rows(problem: Problem, samplers, target_nfe: int) -> list[dict]:
    """Every sampler on every fixed schedule at the largest NFE not above ``target_nfe``."""
    rows = []
    for label, name, opts in samplers:
        n = steps_within(name, opts, target_nfe)
        if n is None:
            continue
        for sname, sopts in FIXED.items():
            sig = SCHEDULES[sname](n, problem.sigma_min, problem.sigma_max, **sopts)
            rows.append(record(problem, label, sname, target_nfe, get_sampler(name), sig, opts))
    return rows


def _variants(problem: Problem, name: str, n: int, flow, config: Config) -> list[tuple]:
    """``(label, sampler, sigmas after the start, starts)`` of the optimised schedules: optimized;
    teleport+optimized (the optimiser picks the best teleport start on its calibration noise, then
    polishes every sigma); on the ``select_only`` targets teleport+selected (selection only)."""
    variants = [("optimized", get_sampler(name), n, None)]
    if config.no_teleport:
        return variants
    fam = teleport_starts(n)
    tele = with_teleport(name, flow)
    variants.append(("teleport+optimized", tele, n + 1, fam))
    if problem.name in config.select_only:
        variants.append(("teleport+selected", tele, n + 1, fam + selection_family(n)))
    return variants


def optimized_rows(problem: Problem, samplers, target_nfe: int, chosen, flow, config: Config,
                   log) -> list[dict]:  # fmt: skip
    """The optimised-schedule variants of the ``chosen`` samplers at ``target_nfe``."""
    rows = []
    for label, name, opts in samplers:
        if label not in chosen:
            continue
        n = steps_within(name, opts, target_nfe)
        for vlabel, fn, n_v, starts in _variants(problem, name, n, flow, config):
            t0 = time.perf_counter()
            cal, iters = config.calibration[problem.name], config.iterations
            if vlabel == "teleport+selected":
                cal, iters = config.select_only[problem.name], 0
            sig = optimized(
                problem.gm, fn, n_v, sigma_min=config.sigma_floor, sigma_max=problem.sigma_max,
                shape=(cal, problem.gm.dim), seed=config.seed + 1,
                free_sigma_min=True, iterations=iters, sampler_options=opts, starts=starts,
                cache=config.out / "optimized_schedules.json",
                cache_key=f"{problem.name}|{vlabel}",
            )  # fmt: skip
            row = record(problem, label, vlabel, target_nfe, fn, sig, opts)
            row["optimize_s"] = time.perf_counter() - t0
            rows.append(row)
            log(
                f"  scorekit {label}/{vlabel} NFE {row['nfe']} err {row['error']:.4g} "
                f"({row['optimize_s']:.0f}s)"
            )
    return rows


def bespoke_row(problem: Problem, target_nfe: int, rows: list[dict], flow, config: Config,
                log) -> dict | None:  # fmt: skip
    """teleport+bespoke at ``target_nfe`` (see ``candidates.bespoke_fit``), or None without a start."""
    t0 = time.perf_counter()
    fitted = bespoke_fit(
        problem.gm, problem.name, target_nfe, rows, flow, problem.sigma_max, config, log
    )
    if fitted is None:
        return None
    label, solver = fitted

    def run_solver(den, x, _sigmas):
        return solver(den, x, gaussian=flow)

    sig = torch.cat([torch.tensor([problem.sigma_max], dtype=torch.float64), solver.sigmas])
    row = record(problem, label, "teleport+bespoke", target_nfe, run_solver, sig, {})
    row["bespoke"] = solver.to_dict()
    row["optimize_s"] = time.perf_counter() - t0
    log(
        f"  scorekit {label}/teleport+bespoke NFE {row['nfe']} err {row['error']:.4g} "
        f"({row['optimize_s']:.0f}s)"
    )
    return row


def scorekit_side(problem: Problem, config: Config, log) -> list[dict]:
    """Per target NFE: the fixed schedules, the optimised ones of the ``--optimize-top`` samplers
    (all with ``--optimize-all``) that did best on them, then teleport+bespoke."""
    samplers = benchmark_samplers(config.quick)
    flow = GaussianFlow.from_mixture(problem.gm)
    rows: list[dict] = []
    for target_nfe in config.nfe:
        fixed = fixed_rows(problem, samplers, target_nfe)
        rows += fixed
        ranked = ranked_samplers(fixed, target_nfe)
        chosen = ranked if config.optimize_all else ranked[: config.optimize_top]
        rows += optimized_rows(problem, samplers, target_nfe, chosen, flow, config, log)
        bespoke = not config.no_teleport and not config.no_bespoke
        if bespoke and target_nfe in config.bespoke_nfe:
            row = bespoke_row(problem, target_nfe, rows, flow, config, log)
            if row is not None:
                rows.append(row)
    return rows


def replay(best: dict, gm, x: Tensor, flow) -> Tensor:
    """Re-run a scorekit row ``best`` (its sampler, schedule and any bespoke solver) from ``x``."""
    if "bespoke" in best:
        return BespokeSolver.from_dict(best["bespoke"])(gm, x.clone(), gaussian=flow)
    name, opts = OPTIONS[best["sampler"]]
    fn = get_sampler(name)
    if best["schedule"].startswith("teleport"):
        fn = with_teleport(name, flow)
    return fn(gm, x.clone(), torch.tensor(best["sigmas"], dtype=torch.float64), **opts)
