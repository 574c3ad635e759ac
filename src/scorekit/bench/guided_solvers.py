"""``scorekit bench guided_solvers``: predictor-corrector solvers under classifier-free guidance.

Problems: the exact class-conditional mixtures of ``scorekit.guidance.class_target`` (``ring6``,
2-D; ``gmm16``, 16-D), class 0, guided by ``cfg(cond, uncond, w)``. The error of a sampler is the
root-mean-square per coordinate between its samples and the *same guided* probability-flow ODE
solved from the same noise by ``pf_ode_reference`` (dopri5, rtol = atol = 1e-9), from ``sigma = 80``
to 0 on karras steps (``sigma_min = 0.002``, as ``bench guidance``). NFE counts sampler steps; a
guided step costs two network evaluations (``cond`` and ``uncond``) for ``w != 1``.

Part 1, the half-corrector of DPM-Solver-v3 (``dpm_solver_v3(corrector=True, corrector_until=c)``):
no corrector, the full corrector, and the half-corrector at ``c = 1.61`` (``t = 0.5`` on Stable
Diffusion's betas) and ``c = 3.41`` (``t = 0.5`` on the linear VP), at order 2 (the paper's order for
guided sampling), without statistics (``l = 1, s = b = 0``) and with ``fit_ems`` statistics fitted
per guided denoiser on calibration noise (seed + 1, not the evaluation noise). Nothing is tuned.

Part 2 (``--part dc``), DC-Solver's cascade regression over the guidance scale (``fit_dc_cascade``
with ``scales``): fitted at the tuning scales 1, 2, 4, 8 and NFEs 5, 8, 10 on calibration noise,
reported at the held-out scales 3 and 6 and NFEs 6 and 12 on evaluation noise, against ``unipc``
and a per-scale ``fit_dc`` on that scale's own calibration noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scorekit._util import atomic_write_json
from scorekit.guidance import cfg, class_target
from scorekit.pfode import pf_ode_reference
from scorekit.samplers import REGISTRY
from scorekit.samplers.dpm3 import DPM3_HALF_SIGMA, fit_ems
from scorekit.schedules import karras

__all__ = ["add_arguments", "guided", "half_corrector_table", "rms", "run"]

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="bench_out/guided_solvers", help="output folder (JSON)")
    a("--part", choices=("half", "all"), default="all", help="which part to run")
    a("--targets", default="ring6,gmm16", help="class targets, comma-separated")
    a("--rows", type=int, default=256, help="evaluation rows per problem (default 256)")
    a("--seed", type=int, default=0, help="evaluation noise seed; calibration uses seed + 1")
    a("--threads", type=int, default=1, help="torch threads (default 1)")


def guided(target: str, scale: float):
    """``(cfg denoiser of class 0 at ``scale``, dimension)`` on a built-in class target."""
    t = class_target(target)
    return cfg(t.cond(0), t.uncond, scale), t.dim


def noise(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return SIGMA_MAX * torch.randn(rows, dim, generator=g, dtype=torch.float64)


def reference(den, x: torch.Tensor) -> torch.Tensor:
    return pf_ode_reference(den, x, SIGMA_MAX, 0.0, rtol=1e-9, atol=1e-9)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt())


#: part 1's settings: name -> dpm_solver_v3 options (order 2 added)
HALF_SETTINGS = {
    "none": {},
    "full": {"corrector": True},
    "half@1.61": {"corrector": True, "corrector_until": DPM3_HALF_SIGMA["sd"]},
    "half@3.41": {"corrector": True, "corrector_until": DPM3_HALF_SIGMA["vp"]},
}


def half_corrector_table(
    targets, scales=(1.0, 4.0, 8.0), nfes=(5, 8, 10, 15), *, rows=256, seed=0, ems=(False, True)
) -> list[dict]:
    """One row per (target, scale, statistics, NFE): the error of each ``HALF_SETTINGS`` entry."""
    out = []
    for name in targets:
        for w in scales:
            den, dim = guided(name, w)
            x = noise(rows, dim, seed)
            ref = reference(den, x)
            for use_ems in ems:
                stats = None
                if use_ems:
                    stats = fit_ems(den, (64, dim), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                    seed=seed + 1, reference_rtol=1e-7)  # fmt: skip
                for n in nfes:
                    sig = karras(n, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
                    errs = {}
                    for k, o in HALF_SETTINGS.items():
                        got = REGISTRY["dpm_solver_v3"](den, x, sig, order=2, statistics=stats, **o)
                        errs[k] = rms(got, ref)
                    out.append({"target": name, "scale": w, "ems": use_ems, "nfe": n, **errs})
    return out


def _print_half(rows: list[dict]) -> None:
    keys = list(HALF_SETTINGS)
    print("DPM-Solver-v3 order 2, RMS error to the guided ODE (best of the row marked *):")
    print(f"  {'target':<7}{'w':>4}{'EMS':>5}{'NFE':>5}" + "".join(f"{k:>12}" for k in keys))
    for r in rows:
        best = min(keys, key=lambda k: r[k])
        cells = "".join(f"{r[k]:>11.3e}{'*' if k == best else ' '}" for k in keys)
        print(
            f"  {r['target']:<7}{r['scale']:>4g}{'yes' if r['ems'] else 'no':>5}{r['nfe']:>5}{cells}"
        )


def run(args: argparse.Namespace) -> int:
    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1; got {args.rows}")
    torch.set_num_threads(args.threads)
    targets = [t for t in args.targets.split(",") if t]
    out = Path(args.out)
    result: dict = {"targets": targets, "rows": args.rows, "seed": args.seed}
    if args.part in ("half", "all"):
        result["half_corrector"] = half_corrector_table(targets, rows=args.rows, seed=args.seed)
        _print_half(result["half_corrector"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
