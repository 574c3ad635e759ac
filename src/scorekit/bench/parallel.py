"""``scorekit bench parallel``: Picard-iteration sampling (``parallel_sample``) against the sequential
samplers, in sequential rounds of batched denoiser calls.

On exact targets (``ring8``, 2-D; ``gmm64``, 64-D), 64 rows from 80 to 0.002 on karras steps, each
sampler runs sequentially and by ``parallel_sample(tol=...)`` with the whole trajectory as the window,
stochastic ones from the same generator seed (ParaDiGMS draws the noise up front, so both use the
same draws). Reported: steps (the sequential sampler's calls), rounds (sequential batched calls of
the parallel run), evaluations per sample (its total work), noise draws, and the largest deviation
per coordinate from the sequential sample. Only rounds are reported, not seconds: a CPU evaluates a
window's batch in about the time of its rows, so the wall-clock gain needs an accelerator.
Nothing is tuned.

Measured (``scorekit bench parallel``, defaults): rounds for 25 / 100 steps at ``tol = 1e-3`` --
ring8: ``dpmpp_2m`` 12 / 17, ``euler_ancestral`` 14 / 33, ``dpmpp_2m_sde`` 14 / 36, ``sa_solver`` 15 /
39; gmm64: 17 / 31, 17 / 36, 17 / 41, 18 / 52. Largest deviation per coordinate from the sequential
sample 4e-5 to 7e-3, except ring8 ``euler_ancestral`` at 100 steps: 2.7e-2 in one row of 64 (RMS
2.6e-3). The tolerance bounds each point's last Picard update, not the final error; the deviation
falls in proportion to ``tol`` (1.5e-3 at 1e-4, 1.1e-4 at 1e-5, 2e-14 at 0 in 41 rounds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scorekit._util import atomic_write_json
from scorekit.analytic import target
from scorekit.samplers import REGISTRY, parallel_sample
from scorekit.schedules import karras

__all__ = ["add_arguments", "rounds_table", "run"]

SAMPLERS = ("dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "sa_solver")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="bench_out/parallel", help="output folder (JSON)")
    a("--targets", default="ring8,gmm64", help="exact targets, comma-separated")
    a("--steps", default="25,100", help="step counts, comma-separated")
    a("--tol", type=float, default=1e-3, help="parallel_sample's tolerance (default 1e-3)")
    a("--rows", type=int, default=64, help="rows per target (default 64)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=1, help="torch threads (default 1)")


def rounds_table(targets, steps, *, tol=1e-3, rows=64, seed=0, samplers=SAMPLERS) -> list[dict]:
    """One row per (target, sampler, steps): rounds, evaluations, draws and deviation."""
    out = []
    for name in targets:
        g = target(name)
        x = 80.0 * torch.randn(rows, g.dim, generator=torch.Generator().manual_seed(seed),
                               dtype=torch.float64)  # fmt: skip
        for sampler in samplers:
            for n in steps:
                sig = karras(n, 0.002, 80.0)
                seq = REGISTRY[sampler](
                    g, x, sig, generator=torch.Generator().manual_seed(seed + 1)
                )
                st: dict = {}
                par = parallel_sample(g, x, sig, sampler=sampler, tol=tol, stats=st,
                                      generator=torch.Generator().manual_seed(seed + 1))  # fmt: skip
                dev = float((par - seq).abs().max())
                out.append({"target": name, "sampler": sampler, **st, "max_deviation": dev})
    return out


def run(args: argparse.Namespace) -> int:
    if args.rows < 1 or args.tol < 0:
        raise ValueError(f"--rows must be >= 1 and --tol >= 0; got {args.rows}, {args.tol}")
    torch.set_num_threads(args.threads)
    steps = [int(v) for v in args.steps.split(",") if v]
    targets = [t for t in args.targets.split(",") if t]
    rows = rounds_table(targets, steps, tol=args.tol, rows=args.rows, seed=args.seed)
    print(
        f"parallel_sample (tol={args.tol:g}, window = all) vs the sequential sampler, same noise:"
    )
    print(f"  {'target':<7}{'sampler':<17}{'steps':>6}{'rounds':>7}{'evals':>7}{'draws':>6}"
          f"{'max dev':>10}")  # fmt: skip
    for r in rows:
        print(f"  {r['target']:<7}{r['sampler']:<17}{r['steps']:>6}{r['rounds']:>7}"
              f"{r['evaluations']:>7}{r['draws']:>6}{r['max_deviation']:>10.1e}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"tol": args.tol, "seed": args.seed, "rows": rows})
    print(f"wrote {out / 'results.json'}")
    return 0
