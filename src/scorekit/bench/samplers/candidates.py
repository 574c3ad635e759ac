"""Which configs the benchmark tries: the samplers, their step counts, the samplers worth optimising,
the teleport starts of the optimiser, and the start and fit of the teleport+bespoke solver."""

from __future__ import annotations

import json
import math

import torch
from torch import Tensor

from scorekit._util import atomic_write_json
from scorekit.bench.samplers.config import Config
from scorekit.pfode import pf_ode_reference
from scorekit.process import DiscreteProcess
from scorekit.samplers import BespokeSolver, fit_bespoke
from scorekit.samplers.accelerators import with_teleport
from scorekit.samplers.bespoke import LINEAR
from scorekit.samplers.registry import steps_for
from scorekit.schedules import karras, loglinear, two_phase

__all__ = [
    "SCOREKIT_SAMPLERS",
    "bespoke_fit",
    "ranked_samplers",
    "selection_family",
    "steps_within",
    "teleport_starts",
]

#: scorekit's deterministic ODE samplers in the benchmark: (label, registry name, options).
SCOREKIT_SAMPLERS = [
    ("euler", "euler", {}),
    ("heun", "heun", {}),
    ("dpm_solver_2", "dpm_solver_2", {}),
    ("dpm_solver_3", "dpm_solver_3", {}),
    ("dpmpp_2s", "dpmpp_2s", {}),
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_3m", "dpmpp_3m", {}),
    ("unipc2", "unipc", {"order": 2}),
    ("unipc3", "unipc", {"order": 3}),
    ("deis3", "deis", {"order": 3}),
    ("ipndm", "ipndm", {}),
]

#: the samplers of ``--quick``.
QUICK_SAMPLERS = ("euler", "dpmpp_2m", "unipc3", "ipndm")

#: label -> (registry name, options).
OPTIONS = {label: (name, opts) for label, name, opts in SCOREKIT_SAMPLERS}


def benchmark_samplers(quick: bool) -> list[tuple[str, str, dict]]:
    """``SCOREKIT_SAMPLERS``, or its ``QUICK_SAMPLERS`` with ``--quick``."""
    if quick:
        return [s for s in SCOREKIT_SAMPLERS if s[0] in QUICK_SAMPLERS]
    return SCOREKIT_SAMPLERS


def steps_within(name: str, options: dict, target_nfe: int) -> int | None:
    """The steps of the largest NFE not above ``target_nfe`` that ``name`` can make, or None.

    heun, dpm_solver_2/3 and dpmpp_2s make 2n - 1 or 3n - 2 calls, so some NFEs are out of reach.
    """
    for nfe in range(target_nfe, 0, -1):
        try:
            return steps_for(name, nfe, options)
        except ValueError:  # no step count gives exactly this NFE
            continue
    return None


def ranked_samplers(rows: list[dict], target_nfe: int) -> list[str]:
    """Sampler labels by their lowest error among ``rows`` at ``target_nfe``, best first."""
    best: dict[str, float] = {}
    for r in rows:
        if r["target_nfe"] == target_nfe:
            best[r["sampler"]] = min(best.get(r["sampler"], math.inf), r["error"])
    return sorted(best, key=best.get)


def teleport_starts(n: int) -> list[Tensor]:
    """Starts of teleport+optimized, each ``[sigma_max, T, ..., e]``: teleport to ``T`` (10, 20 or
    40), then ``n`` log-linear sigmas down to ``e`` (0.03, 0.1 or 0.3)."""
    head = torch.tensor([DiscreteProcess.linear().sigma_max], dtype=torch.float64)
    return [
        torch.cat([head, loglinear(n, se, st)])
        for st in (10.0, 20.0, 40.0)
        for se in (0.03, 0.1, 0.3)
    ]


def selection_family(n: int) -> list[Tensor]:
    """More teleport starts for teleport+selected, each ``[sigma_max, T, ..., 0]`` with ``n`` sigmas
    after the teleport to ``T``:

    * ``schedules.two_phase``: ``T`` 20 or 40, equal log-steps down to 1, 2 or 3, then 30/40/50% of
      the steps on a karras ramp to 0.03, 0.1 or 0.3 (54 at most; needs ``n >= 3``);
    * ``karras`` from ``T`` 10, 15, 20 or 40 with rho 7 or 12 to 0.03, 0.1 or 0.3 (24).
    """
    head = torch.tensor([DiscreteProcess.linear().sigma_max], dtype=torch.float64)
    out = []
    if n >= 3:
        lows = sorted({min(n - 1, max(2, round(f * n))) for f in (0.3, 0.4, 0.5)})
        out += [
            torch.cat([head, two_phase(n, se, st, sigma_split=sp, n_low=nl)])
            for st in (20.0, 40.0)
            for sp in (1.0, 2.0, 3.0)
            for nl in lows
            for se in (0.03, 0.1, 0.3)
        ]
    out += [
        torch.cat([head, karras(n, se, st, rho=rho)])
        for st in (10.0, 15.0, 20.0, 40.0)
        for rho in (7.0, 12.0)
        for se in (0.03, 0.1, 0.3)
    ]
    return out


# -- teleport+bespoke ------------------------------------------------------------------------------


def bespoke_candidates(rows: list[dict], target_nfe: int) -> list[tuple[str, list[float]]]:
    """``(label, sigmas)`` of this NFE's teleport rows whose sampler is a linear one-call-per-step
    solver, each distinct config once, in row order."""
    cands, seen = [], set()
    for r in rows:
        name, _ = OPTIONS[r["sampler"]]
        key = (r["sampler"], tuple(round(v, 12) for v in r["sigmas"]))
        if (
            r["target_nfe"] == target_nfe
            and r["schedule"].startswith("teleport")
            and name in LINEAR
            and key not in seen
        ):
            seen.add(key)
            cands.append((r["sampler"], r["sigmas"]))
    return cands


def _best_start(gm, cands, flow, x_c: Tensor, ref_c: Tensor) -> tuple[str, list[float]]:
    """The candidate with the lowest mean squared error on the calibration noise ``x_c``."""
    scored = []
    for label, sig in cands:
        name, opts = OPTIONS[label]
        out = with_teleport(name, flow)(
            gm, x_c.clone(), torch.tensor(sig, dtype=torch.float64), **opts
        )
        scored.append((float((out - ref_c).square().mean()), label, sig))
    _, label, sig = min(scored, key=lambda c: c[0])
    return label, sig


def bespoke_fit(gm, tname: str, target_nfe: int, rows: list[dict], flow, sigma_max: float,
                config: Config, log) -> tuple[str, BespokeSolver] | None:  # fmt: skip
    """teleport+bespoke: ``samplers.fit_bespoke`` from the best teleport config at this NFE.

    The candidates are this NFE's teleport rows (teleport+optimized / teleport+selected) whose
    sampler is a linear one-call-per-step solver; the start is the one with the lowest error on the
    calibration noise (seed + 1, ``--bespoke-rows`` rows, never the evaluation noise), whose
    coefficients and sigmas are then fitted there. Cached in ``<out>/bespoke_solvers.json``.
    Returns ``(sampler label, BespokeSolver)`` or ``None`` without candidates.
    """
    cands = bespoke_candidates(rows, target_nfe)
    if not cands:
        return None
    n_rows = config.bespoke_rows or {"gmm64": 4096}.get(tname, 1024)
    cache = config.out / "bespoke_solvers.json"
    ckey = json.dumps(
        [tname, target_nfe, n_rows, config.bespoke_iterations, config.seed + 1, cands]
    )
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    if ckey in stored:
        hit = stored[ckey]
        return hit["label"], BespokeSolver.from_dict(hit["solver"])
    g = torch.Generator().manual_seed(config.seed + 1)
    x_c = sigma_max * torch.randn(n_rows, gm.dim, generator=g, dtype=torch.float64)
    ref_c = pf_ode_reference(gm, x_c, sigma_max, 0.0, rtol=config.rtol, atol=config.rtol)
    label, sig = _best_start(gm, cands, flow, x_c, ref_c)
    name, opts = OPTIONS[label]
    solver = fit_bespoke(
        gm, sig[1:], calibration=(x_c, ref_c), base=name, base_options=opts, gaussian=flow,
        sigma_max=sig[0], iterations=config.bespoke_iterations,
    )  # fmt: skip
    log(
        f"  bespoke {tname} NFE {target_nfe}: start {label} {[round(v, 3) for v in sig]}; "
        f"calibration RMS {solver.calibration_rms[0]:.4g} -> {solver.calibration_rms[1]:.4g}"
    )
    stored = json.loads(cache.read_text()) if cache.exists() else {}
    stored[ckey] = {"label": label, "solver": solver.to_dict()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache, stored)
    return label, solver
