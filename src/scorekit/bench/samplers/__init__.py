"""``scorekit bench samplers``: error vs NFE of every sampler x schedule on exact targets, against diffusers.

Problem. Exact Gaussian-mixture targets ``ring8`` (2-D) and ``gmm64`` (64-D) from
``scorekit.analytic.target``, float64. Starting noise ``x_T = sigma_max * z`` with ``z ~ N(0, I)`` and
``sigma_max = 157.407`` (the last sigma of DDPM's linear beta table, ``DiscreteProcess.linear()``).
The reference is the probability-flow ODE solution from the same ``x_T`` to ``sigma = 0``, solved
adaptively (torchdiffeq dopri5, ``rtol = atol = 1e-10``).

Metric. RMS trajectory error in data units,

    err = sqrt( mean_b |x_b - x_ref_b|^2 / d ),

the root mean square over samples ``b`` and coordinates of the difference between a sampler's output
and the exact ODE solution from the same noise (the targets are unit-scale: per-dimension variance 1).

diffusers side. Its schedulers, built from config in code on the same DDPM linear table (1000 steps,
float64 ``alphas_cumprod``), each with default, trailing and Karras spacings, driven by the same exact
denoiser (``eps = (x - D(x, sigma)) / sigma`` at the sigma the scheduler believes the sample is at).
NFE is the number of denoiser calls actually made (counted).

scorekit side. Every deterministic ODE sampler x every schedule (karras, loglinear,
polyexponential rho=2, uniform_t on the DDPM table; all from sigma_max to the table's sigma_min
0.0100005) at the target NFE (counted), or the largest NFE not above it when a sampler cannot hit it
(heun, dpm_solver_2/3, dpmpp_2s: 2n-1 or 3n-2 calls). Then ``samplers.optimized`` (free last sigma,
floor 0.002) for the ``--optimize-top`` samplers that did best on the fixed schedules at that NFE,
without and with the analytic teleport start (``accelerators.with_teleport`` on the target's Gaussian
approximation; starts: teleport to 10/20/40, then log-linear to 0.03/0.1/0.3). The optimiser
calibrates on its own noise (seed + 1, 256 rows for ring8, 512 for gmm64), never on the evaluation
noise; schedules are cached in ``<out>/optimized_schedules.json``. On gmm64 a third variant,
teleport+selected, only selects (no polish) on 2048 rows among those teleport starts and those of
``candidates.selection_family``: teleport, then ``schedules.two_phase`` (equal log-steps across the band where
the modes separate, a short karras ramp below it) or karras (see ``run``). Last, teleport+bespoke:
``samplers.fit_bespoke`` fits the coefficients and sigmas of a linear solver, starting from the
teleport config with the lowest error on its own calibration noise (seed + 1, 4096 rows on gmm64,
1024 on ring8; ``--bespoke-*`` options); solvers are cached in ``<out>/bespoke_solvers.json``.

Diagnostics. "flips": samples whose nearest mixture component differs from the reference's; on
gmm64 a handful of samples lying on a component boundary dominate the RMS (one flip of 500 costs
about 0.05), so the table also gives the same configs' RMS without their flipped samples and medians.
With ``--fresh K`` the winning scorekit config of each NFE is re-run, schedule unchanged, on K fresh
noise sets of ``--fresh-rows`` rows against the best diffusers config on each set: whether a ratio
holds beyond the few boundary samples of one draw.

Overhead. Time per step of the sampler itself, excluding the model: a "denoiser" returning a
precomputed tensor, batch 1, scorekit's sampler against the same algorithm's diffusers scheduler loop
(``scale_model_input`` + ``step``), measured side by side in one process.

Layout. ``config`` (the frozen settings), ``measure`` (the problem, the error and its diagnostics),
``diffusers_harness`` (diffusers' schedulers driven by the exact denoiser), ``candidates`` (the
samplers, step counts, starts and the bespoke start), ``scorekit_side``, ``fresh``, ``overhead`` and
``report`` (tables, plot, ``results.json``); this module holds the command line and the run.
"""

from __future__ import annotations

import argparse
import sys
import time

from scorekit.bench.samplers import random_suite, robust
from scorekit.bench.samplers.candidates import SCOREKIT_SAMPLERS
from scorekit.bench.samplers.config import Config
from scorekit.bench.samplers.diffusers_harness import (
    MISSING,
    SIGMA_FRAME_SCHEDULERS,
    diffusers,
    diffusers_scheduler,
    diffusers_side,
    diffusers_sigmas,
    run_diffusers,
)
from scorekit.bench.samplers.fresh import fresh_check
from scorekit.bench.samplers.measure import Problem, rms_error
from scorekit.bench.samplers.overhead import overhead
from scorekit.bench.samplers.report import (
    overhead_text,
    plot,
    summary_json,
    table,
    write_results,
)
from scorekit.bench.samplers.scorekit_side import scorekit_side
from scorekit.process import DiscreteProcess

__all__ = [
    "SCOREKIT_SAMPLERS",
    "SIGMA_FRAME_SCHEDULERS",
    "Config",
    "add_arguments",
    "benchmark",
    "diffusers_scheduler",
    "diffusers_sigmas",
    "rms_error",
    "run",
    "run_diffusers",
]

METRIC = (
    "sqrt(mean over samples and coordinates of (x - x_ref)^2), x_ref the PF-ODE "
    "solution (torchdiffeq dopri5) from the same noise at sigma_max to sigma = 0"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench_out/samplers", help="output folder (JSON, PNG)")
    parser.add_argument(
        "--suite", choices=("exact", "random", "robust"), default="exact",
        help="exact: ring8 and gmm64 with every sampler x schedule (default); random: random "
        "Gaussian mixtures split into tuning and held-out parts (random_suite), into <out>/random; "
        "robust: imperfect denoisers and trained digits networks (robust), into <out>/robust",
    )  # fmt: skip
    robust.add_arguments(parser)
    parser.add_argument("--problems", type=int, default=20, help="--suite random: problems")
    parser.add_argument("--rows", type=int, default=64, help="--suite random: rows per problem")
    parser.add_argument(
        "--reuse-diffusers", default=None, metavar="DIR",
        help="--suite random: diffusers' per-problem bests from DIR/results.json (same settings)",
    )  # fmt: skip
    parser.add_argument(
        "--part", choices=("held-out", "held-out-b", "held-out-c", "held-out-d"), default="held-out",
        help="--suite random: held-out-b adds block b (new seeds): its tuning-b half joins the "
        "tuning part, its held-out-b half is reported apart (used by no choice); held-out-c adds "
        "block c's odd problems, all held out (the tuning part stays blocks a and b); held-out-d "
        "adds block d likewise",
    )  # fmt: skip
    parser.add_argument(
        "--reuse-tuning", default=None, metavar="DIR",
        help="--suite random: tuning problems' records from DIR/results.json (same settings) "
        "where they hold every candidate",
    )  # fmt: skip
    parser.add_argument(
        "--fit", dest="fit_nfes", nargs="+", type=int, default=None, metavar="NFE",
        help="--suite random: also fit optimized / bespoke per problem of the reported held-out "
        "part (--part) at these NFEs",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small batches and subsets: < 1 min")
    parser.add_argument("--targets", nargs="+", default=["ring8", "gmm64"])
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 10, 20])
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    parser.add_argument("--rtol", type=float, default=1e-10, help="rtol = atol of the reference")
    parser.add_argument(
        "--optimize-top", type=int, default=3, help="optimise the schedule of the k best samplers"
    )
    parser.add_argument("--optimize-all", action="store_true", help="optimise for every sampler")
    parser.add_argument("--no-teleport", action="store_true", help="skip teleport+optimized")
    parser.add_argument("--iterations", type=int, default=25, help="L-BFGS iterations (optimized)")
    parser.add_argument(
        "--sigma-floor", type=float, default=0.002, help="lowest last sigma the optimiser may pick"
    )
    parser.add_argument(
        "--fresh",
        type=int,
        default=0,
        help="re-check the best configs on this many fresh noise sets (seeds seed+101, ...)",
    )
    parser.add_argument("--fresh-rows", type=int, default=2000, help="rows per fresh noise set")
    parser.add_argument("--no-bespoke", action="store_true", help="skip teleport+bespoke")
    parser.add_argument(
        "--bespoke-nfe", nargs="+", type=int, default=None,
        help="NFEs with a teleport+bespoke fit (default: every --nfe)",
    )  # fmt: skip
    parser.add_argument(
        "--bespoke-rows", type=int, default=None,
        help="calibration rows of the bespoke fit (default: 4096 on gmm64, 1024 otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--bespoke-iterations", type=int, default=400, help="Adam steps of the bespoke fit"
    )


def _log(msg: str) -> None:
    print(msg, flush=True)


def _bench_target(tname: str, config: Config) -> tuple[list[dict], dict, str, list[dict]]:
    """One target: its rows (both sides), summary per NFE, text table and fresh-noise rows."""
    t0 = time.perf_counter()
    problem = Problem.draw(tname, config.batches[tname], config.seed, config.rtol)
    _log(f"{tname}: {problem.x_t.shape[0]} samples, reference in {time.perf_counter() - t0:.1f}s")
    rows = diffusers_side(problem, config.nfe, config.quick, _log)
    rows += scorekit_side(problem, config, _log)
    text, summary = table(rows, tname, config.nfe)
    fresh = []
    if config.fresh > 0:
        fresh_text, fresh = fresh_check(tname, summary, config, _log)
        text += "\n" + fresh_text
    print(text, flush=True)
    return rows, summary, text, fresh


def benchmark(config: Config) -> dict:
    """Run the benchmark of ``config``; write ``results.json``, ``table.txt`` and
    ``error_vs_nfe.png`` into ``config.out``; return what ``results.json`` holds."""
    t_start = time.perf_counter()
    config.out.mkdir(parents=True, exist_ok=True)
    all_rows, summaries, texts, fresh = {}, {}, [], {}
    for tname in config.targets:
        all_rows[tname], summaries[tname], text, fresh_rows = _bench_target(tname, config)
        texts.append(text)
        if config.fresh > 0:
            fresh[tname] = fresh_rows
    timings = overhead(steps=20 if config.quick else 50, repeats=5 if config.quick else 30)
    texts.append(overhead_text(timings))
    print(texts[-1], flush=True)
    ddpm = DiscreteProcess.linear()
    result = {
        "metric": METRIC,
        "sigma_max": ddpm.sigma_max,
        "sigma_min_fixed_schedules": ddpm.sigma_min,
        "args": config.to_dict(),
        "rows": all_rows,
        "summary": summary_json(summaries),
        "fresh": fresh,
        "overhead": timings,
        "seconds": time.perf_counter() - t_start,
    }
    write_results(config.out, result, texts)
    plot(all_rows, config.nfe, config.out / "error_vs_nfe.png")
    print(
        f"wrote {config.out}/results.json, table.txt, error_vs_nfe.png in "
        f"{time.perf_counter() - t_start:.0f}s"
    )
    return result


def run(args: argparse.Namespace) -> int:
    """``scorekit bench samplers``: the config of ``args``, then ``benchmark``.

    Without diffusers (the peer it compares against) it prints which extra to install and returns 2.
    """
    if args.suite == "robust":
        if diffusers is None:
            print(MISSING, file=sys.stderr)
            return 2
        return robust.run(args)
    config = None if args.suite == "random" else Config.from_args(args)
    if diffusers is None:
        print(MISSING, file=sys.stderr)
        return 2
    if config is None:
        return random_suite.run(args)
    benchmark(config)
    return 0
