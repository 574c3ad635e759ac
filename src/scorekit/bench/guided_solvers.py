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
with ``scales``, degrees (2, 1, 2)): fitted at the tuning scales 1, 2, 4, 8 and NFEs 5, 8, 10 on
calibration noise, reported on evaluation noise at those and at the held-out scales 3 and 6 and
NFEs 6 and 9, against ``unipc`` (order 3) and, at the held-out NFEs, a per-scale ``fit_dc`` at that
scale and NFE alone (same calibration noise). Extrapolation outside the fitted NFEs is a
polynomial's and fails (measured: at NFE 12 the cascade fitted at 5-10 was up to 9x unipc's error
on ring6 for w >= 4), so the report stays inside them.

Measured (``scorekit bench guided_solvers``, seed 0, 256 rows; nothing of part 1 is tuned):

Part 1, geometric mean over ring6 and gmm16 and NFE 5, 8, 10, 15 of the error relative to no
corrector (per-cell table in the JSON and the printout):

    statistics  w    full   half@1.61  half@3.41
    none        1    0.91     1.02       1.02
    none        4    0.91     1.02       1.01
    none        8    0.92     1.05       1.03
    fit_ems     1    0.47     1.01       1.00
    fit_ems     4    0.55     1.07       1.02
    fit_ems     8    0.61     1.18       1.07

The full corrector is best in 34 of 48 cells; a half-corrector beats it in 12, mostly at NFE 5
with w >= 4 (by 1-20%), where no corrector does about as well. On these exact targets the
corrector's gain comes from the low-noise steps that the half-corrector drops, so there is no
case here for the half-corrector; the paper motivates it by large guidance scales with a network.

Part 2, held-out cells (scale 3 or 6 not fitted, or NFE 6 or 9 not fitted), cascade error over
``unipc``'s and over a per-scale ``fit_dc`` at that scale and NFE:

    target  held out     cascade/unipc   cascade/per-scale fit
    ring6   scale        0.09 - 0.31     -
    ring6   NFE          0.03 - 0.45     1.07 - 2.42
    ring6   scale + NFE  0.05 - 0.18     1.36 - 1.70
    gmm16   scale        0.07 - 0.79     -
    gmm16   NFE          0.09 - 0.68     0.92 - 6.31
    gmm16   scale + NFE  0.09 - 0.27     1.12 - 2.05

On the tuned cells (scales 1, 2, 4, 8 at NFE 5, 8, 10) cascade/unipc is 0.03 - 0.92 (worst at NFE
8). The cascade beats ``unipc`` in every cell and costs no fit at the held-out scale; a fit at that
exact scale and NFE is still up to 6x better (gmm16, w = 1, NFE 9).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from scorekit._util import atomic_write_json
from scorekit.bench.samplers.measure import rms_error as rms
from scorekit.guidance import cfg, class_target
from scorekit.pfode import pf_ode_reference
from scorekit.samplers import REGISTRY
from scorekit.samplers.dc import fit_dc, fit_dc_cascade
from scorekit.samplers.dpm3 import DPM3_HALF_SIGMA, fit_ems
from scorekit.schedules import karras

__all__ = ["add_arguments", "dc_scale_table", "guided", "half_corrector_table", "rms", "run"]

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="bench_out/guided_solvers", help="output folder (JSON)")
    a("--part", choices=("half", "dc", "all"), default="all", help="which part to run")
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


#: part 2: (tuning scales, tuning NFEs) of the cascade; reported scales and NFEs
DC_TUNE = ((1.0, 2.0, 4.0, 8.0), (5, 8, 10))
DC_REPORT = ((1.0, 2.0, 3.0, 4.0, 6.0, 8.0), (5, 6, 8, 9, 10))


def dc_scale_table(targets, *, rows=256, seed=0, cal_rows=64) -> list[dict]:
    """One row per (target, scale, NFE): RMS error of ``unipc`` (order 3), ``dc_solver`` on the cascade
    fitted over ``DC_TUNE`` (``fit_dc_cascade(scales=...)``, degrees (2, 1, 2)) and, at the NFEs
    outside ``DC_TUNE``, ``fit_dc`` on that scale and NFE alone; fits on calibration noise (seed + 1,
    ``cal_rows`` rows), errors on the evaluation noise. ``held_out``: the scale, the NFE, or both
    were not fitted by the cascade."""
    out = []
    scales, nfes = DC_TUNE
    for name in targets:
        t = class_target(name)

        def den(w, t=t):
            return cfg(t.cond(0), t.uncond, w)

        sched = {n: karras(n, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64) for n in DC_REPORT[1]}
        fit = {"shape": (cal_rows, t.dim), "seed": seed + 1, "reference_rtol": 1e-8}
        cas = fit_dc_cascade(den, [sched[n] for n in nfes], scales=scales, **fit)
        x = noise(rows, t.dim, seed)
        for w in DC_REPORT[0]:
            d = den(w)
            ref = reference(d, x)
            c = cas.for_scale(w)
            for n in DC_REPORT[1]:
                sig = sched[n]
                row = {"target": name, "scale": w, "nfe": n,
                       "held_out": [k for k, v in (("scale", w in scales), ("nfe", n in nfes)) if not v],
                       "unipc": rms(REGISTRY["unipc"](d, x, sig, order=3), ref),
                       "cascade": rms(REGISTRY["dc_solver"](d, x, sig, ratios=c), ref)}  # fmt: skip
                if n not in nfes:
                    own = fit_dc(d, sig, **fit)
                    row["per_scale_fit"] = rms(own(d, x), ref)
                out.append(row)
    return out


def print_dc(rows: list[dict]) -> None:
    print(
        "DC-Solver cascade over (NFE, guidance scale), fitted at scales 1, 2, 4, 8 x NFE 5, 8, 10;"
    )
    print("RMS error to the guided ODE; per-scale fit = fit_dc at that scale and NFE alone:")
    print(f"  {'target':<7}{'w':>4}{'NFE':>5}  {'held out':<10}{'unipc':>11}{'cascade':>11}"
          f"{'casc/unipc':>11}{'per-scale':>11}{'casc/fit':>9}")  # fmt: skip
    for r in rows:
        fit = r.get("per_scale_fit")
        extra = f"{fit:>11.3e}{r['cascade'] / fit:>9.2f}" if fit is not None else ""
        print(f"  {r['target']:<7}{r['scale']:>4g}{r['nfe']:>5}  {'+'.join(r['held_out']) or '-':<10}"
              f"{r['unipc']:>11.3e}{r['cascade']:>11.3e}{r['cascade'] / r['unipc']:>11.2f}{extra}")  # fmt: skip


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
    if args.part in ("dc", "all"):
        result["dc_cascade"] = dc_scale_table(targets, rows=args.rows, seed=args.seed)
        print_dc(result["dc_cascade"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
