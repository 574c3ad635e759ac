"""``scorekit bench samplers --suite random``: scorekit vs diffusers' best on random Gaussian mixtures.

Problems. ``problems`` random Gaussian mixtures drawn from one seed (``--seed``, default 0): for
problem ``j`` a generator seeded by ``mix_seed(SUITE_SEED, seed, j)`` draws the dimension (2 to 256,
log-uniform over powers of two), the number of components (2 to 64, likewise), the covariance type
(isotropic, or full with eigenvalues log-uniform in [0.02, 1] and a random rotation; full only when
``K d^2 <= 2^17`` so one denoiser call stays cheap), the separation ``c`` (log-uniform in [0.5, 8]:
means ``c z / sqrt(d)``, so the distance between two means is about ``c sqrt(2)`` within-component
standard deviations, from overlapping to well separated) and unequal weights; the mixture is then
centred and scaled to unit mean per-coordinate variance. Even ``j`` form the **tuning** part, odd
``j`` the **held-out** part (same family, disjoint problems). ``--part held-out-b`` adds block b:
``problems`` more from the same generator at indices ``BLOCK_B`` (1000) on, so with new seeds;
its even problems (**tuning-b**) join the tuning part and its odd ones form **held-out-b**, which no
choice and no rule was ever fitted to (the held-out part of block a, once looked at, is "seen").
``--part held-out-c`` adds block c: the odd indices of ``BLOCK_C`` (2000) on, all held out
(**held-out-c**), drawn once the candidates of the Gaussian jump and the Gaussian DPM-Solver-v3 had
been added and chosen on the same 20 tuning problems (held-out-b had been seen by then).

Measure. As ``scorekit bench samplers``: noise ``x_T = sigma_max z`` (``sigma_max`` = 157.4, the
DDPM linear table's last sigma; ``rows`` rows per problem, own seed per problem), the exact
probability-flow ODE solution from it (``pf_ode_reference``), and the RMS error per coordinate of a
sampler's output against it. diffusers: every ODE scheduler of ``diffusers_harness.diffusers_configs``
(DDIM, Euler, Heun, LMS, DPM++ 2M/3M/2S/3S, UniPC 2/3, DEIS 2/3) with default, trailing and karras
spacings, at the most steps whose counted NFE fits; per problem and NFE its **best** configuration,
chosen after the fact. scorekit: every candidate at exactly the NFE, run as ``sample(sampler="auto")``
runs a ``samplers.defaults.Choice``: either a schedule from ``sigma_max`` to a last nonzero sigma (then
the Tweedie jump to 0), or the teleport start: the data's Gaussian approximation (mean and covariance
of ``STATS_ROWS`` exact samples of the mixture, drawn with the problem's own seed, as a user estimates
them from data rows) moves ``x_T`` along its exact flow to ``top sqrt(max lam)`` and every call is
spent in the band ``schedules.spectral_band`` down to ``last sqrt(mean lam)`` (also with the
Gaussian beyond the start, ``Choice.jump="gaussian"``: the last step ``accelerators.gaussian_jump``,
or ``dpm_solver_v3`` with the Gaussian's exact statistics, ``gdpm3``/``gdpm3c``); or, without data
statistics, the jump start: the first call at ``sigma_max``, the others on a band from ``top`` to
``last`` (in data scales). The grid of candidates
was pruned from a wider search on the tuning problems only (teleport tops 1-16, jump tops 2-8, last
sigmas 0.005-0.5, five samplers, karras / loglinear).

Selection. For each NFE the candidate minimising ``max(median / 0.5, worst / 0.8)`` of the ratios
``scorekit error / diffusers' best error`` over the **tuning** problems (the goal: median <= 0.5,
worst <= 0.8) is chosen, twice: among all candidates (``with data statistics``, what ``AUTO_TELEPORT`` holds)
and among those that use no data statistics (from ``sigma_max`` or the jump start; ``without``, what
``AUTO`` holds when it passes the trained-network check: ``samplers.defaults``). Each table's label
says whether this run's choice equals that table. The held-out tables report the
chosen candidates' ratios on the held-out problems, which took no part in any choice.
``--fit NFE ...`` adds, on the held-out problems (with ``--part held-out-b``: on held-out-b only),
``optimized`` and ``fit_bespoke`` fitted on each problem's own calibration noise from the best
teleport candidate on the tuning part (``random_fitted``), with that candidate's table on the same part.
``--reuse-diffusers DIR`` takes diffusers' per-problem bests from an earlier ``results.json`` of the
same settings (checked) instead of rerunning them; ``--reuse-tuning DIR`` likewise whole tuning
records (diffusers and every candidate) where they hold every candidate of this run. ``--quick``: 2 small problems (one per part; 4
with ``--part held-out-b``), two NFEs, a few candidates.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from scorekit._util import atomic_write, atomic_write_json, mix_seed
from scorekit.analytic import GaussianMixture, gaussian_approximation
from scorekit.bench.samplers.candidates import steps_within
from scorekit.bench.samplers.diffusers_harness import (
    _steps_within,
    diffusers_configs,
    diffusers_scheduler,
    run_diffusers,
)
from scorekit.bench.samplers.measure import Problem, rms_error
from scorekit.bench.samplers.random_fitted import fitted_errors, fitted_table, fitted_text
from scorekit.pfode import pf_ode_reference
from scorekit.process import DiscreteProcess
from scorekit.samplers.accelerators import GaussianFlow, with_last_step
from scorekit.samplers.defaults import AUTO, AUTO_TELEPORT, Choice, auto_sigmas

__all__ = [
    "CANDIDATE_SAMPLERS",
    "NFES",
    "Spec",
    "build",
    "candidates",
    "data_flow",
    "run_suite",
    "specs",
]

SUITE_SEED = 14
NFES = (3, 4, 5, 6, 8, 10, 15, 20)
#: scorekit samplers the selection may choose from: (label, registry name, options). ipndm is left
#: out: it diverges on trained, imperfect networks (another benchmark), so it is no default.
CANDIDATE_SAMPLERS = [
    ("dpmpp_2m", "dpmpp_2m", {}),
    ("dpmpp_3m", "dpmpp_3m", {}),
    ("unipc2", "unipc", {"order": 2}),
    ("unipc3", "unipc", {"order": 3}),
    ("deis3", "deis", {"order": 3}),
]
#: candidates from sigma_max: schedules and the last nonzero sigma (the step after it is the Tweedie
#: jump to 0), in RMS data scales (the data are unit-scale).
SCHEDULE_NAMES = ("karras", "loglinear", "uniform_t")
SIGMA_LAST = (0.01, 0.05, 0.1, 0.25)
#: teleport and jump candidates: samplers; teleport (top, last) pairs of ``schedules.spectral_band``.
TELEPORT_SAMPLERS = ("dpmpp_2m", "unipc2", "unipc3")
TELEPORT_BANDS = [(t, lo) for t in (1.0, 2.0, 4.0) for lo in (0.1, 0.2, 0.35)] + [
    (t, lo) for t in (4.0, 8.0, 16.0) for lo in (0.02, 0.05, 0.1) if (t, lo) != (4.0, 0.1)
]
#: candidates that also spend the data's Gaussian beyond the teleport (``Choice.jump="gaussian"``):
#: the teleport samplers with ``accelerators.gaussian_jump`` as their last step, and DPM-Solver-v3 with
#: the Gaussian's exact statistics (``dpm_solver_v3(gaussian=...)``), order 3 without and with its
#: corrector; on the teleport bands.
GAUSSIAN_SAMPLERS = [
    ("gdpm3", "dpm_solver_v3", {"order": 3}),
    ("gdpm3c", "dpm_solver_v3", {"order": 3, "corrector": True}),
]
#: samplers whose candidates (every start) are also run with the extrapolated last step
#: (``Choice.jump="extrapolated"``, ``accelerators.extrapolated_jump``; keys ending ``/x2``).
EXTRAPOLATED_SAMPLERS = ("unipc2", "unipc3")
#: jump candidates (no data statistics; in data scales): (top, last) of the band after the first call.
JUMP_BANDS = [(t, lo) for t in (4.0, 8.0) for lo in (0.05, 0.1, 0.2)]
#: data rows from which the teleport's mean and covariance are estimated.
STATS_ROWS = 16384
#: first problem index of block b (``--part held-out-b``): its problems' seeds are new.
BLOCK_B = 1000
#: first problem index of block c (``--part held-out-c``): only its odd problems are drawn, all held
#: out (**held-out-c**); the tuning part stays that of blocks a and b.
BLOCK_C = 2000
#: first problem index of block d (``--part held-out-d``): likewise, odd problems only, all held out;
#: drawn once the extrapolated last step had been added and chosen on the same tuning part.
BLOCK_D = 3000
#: the parts a run reports: ``held-out`` (block a) or ``held-out-b`` (blocks a and b, tuning on both
#: tuning parts, reported on both held-out parts).
PARTS = ("held-out", "held-out-b", "held-out-c", "held-out-d")


@dataclass(frozen=True)
class Spec:
    """One random problem: its index, part, size and shape parameters, and its own seed."""

    index: int
    part: str
    dim: int
    components: int
    covariance: str
    separation: float
    seed: int


def specs(problems: int, seed: int, quick: bool, block_b: bool = False,
          block_c: bool = False, block_d: bool = False) -> list[Spec]:  # fmt: skip
    """The suite's problems, deterministic in ``(problems, seed, quick)``; even index = tuning.

    ``block_b``: also block b, ``problems`` more of the same family drawn by the same generator from
    indices ``BLOCK_B ..`` (seeds no run of block a uses): even = ``tuning-b``, odd = ``held-out-b``.
    ``block_c``, ``block_d``: also the odd indices of ``BLOCK_C .. BLOCK_C + problems``
    (``held-out-c``), of ``BLOCK_D ..`` (``held-out-d``).
    """
    if block_b and problems > BLOCK_B:
        raise ValueError(f"--problems: got {problems} with block b; allowed: at most {BLOCK_B}")
    out = []
    idx = list(range(problems)) + (list(range(BLOCK_B, BLOCK_B + problems)) if block_b else [])
    idx += list(range(BLOCK_C + 1, BLOCK_C + problems, 2)) if block_c else []
    idx += list(range(BLOCK_D + 1, BLOCK_D + problems, 2)) if block_d else []
    for j in idx:
        s = mix_seed(SUITE_SEED, seed, j)
        g = torch.Generator().manual_seed(s)
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        dim = 2 ** (1 + int(u[0] * (3 if quick else 8)))  # 2..16 quick, 2..256
        comps = 2 ** (1 + int(u[1] * (2 if quick else 6)))  # 2..8 quick, 2..64
        full = u[2] < 0.5 and comps * dim * dim <= 2**17
        sep = 0.5 * 16 ** u[3]  # log-uniform in [0.5, 8]
        block = "-d" if j >= BLOCK_D else "-c" if j >= BLOCK_C else "-b" if j >= BLOCK_B else ""
        part = ("tuning" if j % 2 == 0 else "held-out") + block
        out.append(Spec(j, part, dim, comps, "full" if full else "iso", sep, s))
    return out


def build(spec: Spec) -> GaussianMixture:
    """The mixture of ``spec`` in float64, centred and scaled to unit mean per-coordinate variance."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    k, d = spec.components, spec.dim
    means = spec.separation * torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    if spec.covariance == "full":
        q, _ = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=torch.float64))
        ev = 0.02 * 50 ** torch.rand(k, d, generator=g, dtype=torch.float64)
        covs = q @ torch.diag_embed(ev) @ q.mT
        covs = 0.5 * (covs + covs.mT)
    else:
        covs = (0.1 + 0.9 * torch.rand(k, 1, generator=g, dtype=torch.float64)).expand(k, d)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    gm = GaussianMixture(means, covs, w / w.sum())
    scale = math.sqrt(float(gm.covariance.diagonal().mean()))
    return GaussianMixture((means - gm.mean) / scale, (covs / scale**2).contiguous(), w / w.sum())


def data_flow(spec: Spec, gm: GaussianMixture, rows: int = STATS_ROWS) -> GaussianFlow:
    """The data's Gaussian approximation as a user has it: mean and covariance of ``rows`` exact
    samples of the mixture (seeded by the problem's own seed), not the mixture's exact moments."""
    x = gm.sample(rows, generator=torch.Generator().manual_seed(spec.seed + 3))
    return GaussianFlow.from_mixture(gaussian_approximation(x))


def _key(c) -> str:
    lab, _, _, top, sch, lo, start, jump = c
    tag = "" if start == "sigma_max" else f"{'tele' if start == 'teleport' else 'jump'}{top:g}/"
    end = {"gaussian": "" if lab.startswith("gdpm") else "/gj", "extrapolated": "/x2"}.get(jump, "")
    return f"{lab}/{tag}{sch}/{lo:g}{end}"


def candidates(quick: bool) -> list[tuple]:
    """``(sampler label, registry name, options, top or None, schedule, last sigma, start, jump)`` of
    every candidate (``start``: ``"sigma_max"``, ``"jump"`` or ``"teleport"``; ``jump``: ``"tweedie"``,
    ``"gaussian"`` or ``"extrapolated"``; as ``defaults.Choice``). Keys end in ``/gj`` for a teleport
    sampler with the Gaussian jump and in ``/x2`` for the extrapolated jump; ``gdpm3*`` are
    DPM-Solver-v3 with the Gaussian's statistics."""
    samplers = CANDIDATE_SAMPLERS[::2] if quick else CANDIDATE_SAMPLERS
    lasts = (0.05, 0.25) if quick else SIGMA_LAST
    floor = DiscreteProcess.linear().sigma_min  # uniform_t stays inside the DDPM table
    out = [(lab, name, opts, None, sch, lo, "sigma_max", "tweedie") for lab, name, opts in samplers
           for sch in SCHEDULE_NAMES for lo in lasts
           if sch != "uniform_t" or lo >= floor]  # fmt: skip
    for start, bands in (("teleport", TELEPORT_BANDS), ("jump", JUMP_BANDS)):
        bands = [(2.0, 0.2), (8.0, 0.05)] if quick else bands
        out += [(lab, name, opts, top, sch, lo, start, "tweedie") for lab, name, opts in samplers
                if lab in TELEPORT_SAMPLERS for sch in ("karras", "loglinear")
                for top, lo in bands]  # fmt: skip
    bands = [(2.0, 0.2), (8.0, 0.05)] if quick else TELEPORT_BANDS
    gauss = [s for s in samplers if s[0] in TELEPORT_SAMPLERS] + GAUSSIAN_SAMPLERS[
        : 1 if quick else 2
    ]
    out += [(lab, name, opts, top, sch, lo, "teleport", "gaussian") for lab, name, opts in gauss
            for sch in ("karras", "loglinear") for top, lo in bands]  # fmt: skip
    # the last step extrapolated from the last two calls (any start): unipc 2 and 3
    out += [(*c[:7], "extrapolated") for c in out
            if c[7] == "tweedie" and c[0] in EXTRAPOLATED_SAMPLERS]  # fmt: skip
    return out


def _in_defaults(chosen: dict, by_key: dict, table: dict, name: str) -> str:
    """`` (= NAME)`` when the choice per NFE is ``samplers.defaults``' table, else ``(not NAME at
    NFE ...)``: a run on other tuning problems need not choose what ``sampler="auto"`` uses."""
    other = [n for n, c in chosen.items() if table.get(n) != choice_of(by_key[c["config"]])]
    return f" (= {name})" if not other else f" (not {name} at NFE {', '.join(map(str, other))})"


def choice_of(c) -> Choice:
    """A candidate as the ``samplers.defaults.Choice`` that ``sample(sampler="auto")`` runs."""
    _, name, opts, top, sch, lo, start, jump = c
    return Choice(name, dict(opts), sch, lo, top, start, jump)


def _problem(spec: Spec, rows: int, rtol: float) -> Problem:
    gm = build(spec)
    table = DiscreteProcess.linear()
    g = torch.Generator().manual_seed(spec.seed + 2)
    x_t = table.sigma_max * torch.randn(rows, gm.dim, generator=g, dtype=torch.float64)
    ref = pf_ode_reference(gm, x_t, table.sigma_max, 0.0, rtol=rtol, atol=rtol)
    comp = gm.responsibilities(ref, 0.0).argmax(1)
    return Problem(f"p{spec.index}", gm, x_t, ref, comp, table.sigma_max, table.sigma_min)


def run_choice(problem: Problem, flow: GaussianFlow, c, nfe: int) -> Tensor:
    """Candidate ``c`` on the problem's noise at exactly ``nfe`` calls (as ``sample`` runs it)."""
    choice = choice_of(c)
    n = steps_within(choice.sampler, choice.options, nfe)
    sig, top = auto_sigmas(choice, n, problem.sigma_max, evals=flow.evals)
    x = problem.x_t.clone() if top is None else flow(problem.x_t, problem.sigma_max, top)
    fn, options = with_last_step(choice.sampler, choice.options, choice.jump, flow)
    return fn(problem.gm, x, sig, **options)


def _scorekit_errors(problem: Problem, flow, cands, nfes) -> dict[str, dict[int, float]]:
    """``{candidate key: {nfe: error}}`` of every candidate at exactly each NFE."""
    out: dict[str, dict[int, float]] = {}
    for c in cands:
        out[_key(c)] = {}
        for nfe in nfes:
            x = run_choice(problem, flow, c, nfe)
            out[_key(c)][nfe] = rms_error(x, problem.ref) if torch.isfinite(x).all() else math.inf
    return out


#: (config label, target NFE) -> steps: the counted NFE of a diffusers config does not depend on
#: the problem, so each is probed once per process.
_STEPS: dict[tuple[str, int], int | None] = {}


def _diffusers_best(problem: Problem, nfes, quick: bool) -> dict[int, tuple[str, float]]:
    """Per NFE, diffusers' best ``(config, error)`` on the problem (configs that fit the NFE)."""
    best: dict[int, tuple[str, float]] = {}
    probe = problem.x_t[:1].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, name, cfg in diffusers_configs(quick):
            for nfe in nfes:
                if (label, nfe) not in _STEPS:
                    _STEPS[label, nfe] = _steps_within(problem.gm, name, cfg, probe, nfe)
                n = _STEPS[label, nfe]
                if n is None:
                    continue
                out, _ = run_diffusers(
                    diffusers_scheduler(name, **cfg), problem.gm, problem.x_t.clone(), n,
                    sigma_start=problem.sigma_max,
                )  # fmt: skip
                e = rms_error(out, problem.ref) if torch.isfinite(out).all() else math.inf
                if e < best.get(nfe, ("", math.inf))[1]:
                    best[nfe] = (label, e)
    return best


def _score(ratios: list[float]) -> float:
    return max(statistics.median(ratios) / 0.5, max(ratios) / 0.8)


def ratios_of(problems: list[dict], key: str, nfe: int) -> list[float]:
    """``scorekit error / diffusers' best error`` of candidate ``key`` at ``nfe``, per problem."""
    return [p["scorekit"][key][nfe] / p["diffusers"][nfe][1] for p in problems]


def _uses_gaussian(key: str) -> bool:
    """Whether a candidate spends the data's Gaussian beyond the teleport (``/gj``, ``gdpm3*``). The
    selection leaves these out: chosen on the tuning part (``bench_out/samplers_gj``) they met the
    goal on held-out-c but made the digits UNet's FD worse at every NFE, so no default may use them
    (docs/choosing-a-sampler.md); they stay measured in the records."""
    return key.endswith("/gj") or key.startswith("gdpm")


def _own_end(key: str) -> bool:
    """Whether a candidate has its own last step or solver (``/gj``, ``/x2``, ``gdpm3*``): the fits
    of ``random_fitted`` wrap the plain sampler, so these are no start for them."""
    return _uses_gaussian(key) or key.endswith("/x2")


def select(tuning: list[dict], nfes, teleport: bool | None = True) -> dict[int, dict]:
    """Per NFE, the candidate with the lowest ``max(median / 0.5, worst / 0.8)`` on ``tuning``:
    among all candidates (``teleport=True``), those without the teleport start (``False``) or those
    with it and without an end of its own (``None``: the start of the fitted row, whose fits wrap
    the plain sampler). Never a candidate that uses the Gaussian beyond the teleport
    (``_uses_gaussian``)."""
    chosen = {}
    keys = [k for k in tuning[0]["scorekit"]
            if teleport or (("/tele" in k) == (teleport is None))]  # fmt: skip
    keys = [k for k in keys if not (_own_end(k) if teleport is None else _uses_gaussian(k))]
    for nfe in nfes:
        best = None
        for key in keys:
            r = ratios_of(tuning, key, nfe)
            cand = (_score(r), key, statistics.median(r), max(r))
            if best is None or cand < best:
                best = cand
        chosen[nfe] = {"config": best[1], "tuning_median": best[2], "tuning_worst": best[3]}
    return chosen


def _run_problem(spec: Spec, cfg: dict, only: set[str] | None, log) -> dict:
    """One problem: diffusers' best per NFE and the errors of the candidates (those in ``only``)."""
    t0 = time.perf_counter()
    cands = [c for c in candidates(cfg["quick"]) if only is None or _key(c) in only]
    old = cfg.get("reuse_tuning", {}).get(spec.index)
    if old is not None and old["spec"] != asdict(spec):
        old = None
    if old is not None and _covers(old, cands, cfg["nfes"]):
        log(f"  {spec.part:10s} p{spec.index:<4d} d={spec.dim:<3d} K={spec.components:<2d} "
            f"{spec.covariance:4s} sep={spec.separation:.2f}  (reused)")  # fmt: skip
        return {**old, "reused": True}
    problem = _problem(spec, cfg["rows"], cfg["rtol"])
    reused = cfg["reuse"].get(spec.index) or (old or {}).get("diffusers")
    flow = data_flow(spec, problem.gm)
    wanted = {_key(c) for c in cands}  # a reused record's candidates are not rerun; stale keys go
    have = {} if old is None else {k: v for k, v in old["scorekit"].items() if k in wanted}
    todo = [c for c in cands if not _covers({"scorekit": have}, [c], cfg["nfes"])]
    rec = {
        "spec": asdict(spec),
        "diffusers": reused or _diffusers_best(problem, cfg["nfes"], cfg["quick"]),
        "scorekit": {**have, **_scorekit_errors(problem, flow, todo, cfg["nfes"])},
    }
    if spec.part == cfg.get("part", "held-out") and cfg.get("fit"):
        rec["fitted"] = fitted_errors(problem, spec, flow, cfg["fit"], rtol=cfg["rtol"], log=log)
    rec["seconds"] = time.perf_counter() - t0
    log(f"  {spec.part:10s} p{spec.index:<4d} d={spec.dim:<3d} K={spec.components:<2d} "
        f"{spec.covariance:4s} sep={spec.separation:.2f}  {rec['seconds']:.0f}s"
        f"{' (diffusers reused)' if reused else ''}")  # fmt: skip
    return rec


def _covers(record: dict, cands, nfes) -> bool:
    """Whether a reused record holds every candidate's error at every NFE of this run."""
    errs = record["scorekit"]
    return all(_key(c) in errs and all(n in errs[_key(c)] for n in nfes) for c in cands)


def held_out_table(held: list[dict], chosen: dict[int, dict], nfes) -> list[dict]:
    """Per NFE: the chosen config's median and worst ratio on the held-out problems, and wins."""
    rows = []
    for nfe in nfes:
        key = chosen[nfe]["config"]
        r = ratios_of(held, key, nfe)
        rows.append({
            "nfe": nfe, "config": key, "median": statistics.median(r), "worst": max(r),
            "wins": sum(v < 1 for v in r), "problems": len(r),
            "tuning_median": chosen[nfe]["tuning_median"],
            "tuning_worst": chosen[nfe]["tuning_worst"],
        })  # fmt: skip
    return rows


def table_text(rows: list[dict], title: str = "", part: str = "held-out") -> str:
    """A held-out part's table as fixed-width text."""
    lines = [
        f"{part} problems: scorekit error / diffusers' best error (per problem, chosen after the "
        f"fact){title}",
        f"{'NFE':>4}  {'median':>7}  {'worst':>7}  {'wins':>6}  {'tuning med/worst':>17}  "
        "config (chosen on tuning)",
    ]
    for r in rows:
        lines.append(
            f"{r['nfe']:>4}  {r['median']:7.3f}  {r['worst']:7.3f}  {r['wins']:>2}/{r['problems']:<3}  "
            f"{r['tuning_median']:7.3f}/{r['tuning_worst']:<7.3f}  {r['config']}"
        )
    return "\n".join(lines)


def _old_problems(path: str, settings: dict, flag: str) -> list[dict]:
    """The per-problem records of an earlier ``results.json`` of the same settings."""
    old = json.loads((Path(path) / "results.json").read_text())
    for k in ("rows", "rtol", "seed", "problems", "quick", "nfes", "suite_seed"):
        if old["settings"].get(k) != settings[k]:
            raise ValueError(
                f"{flag} {path}: its {k} is {old['settings'].get(k)!r}, this run's {settings[k]!r}"
            )
    return old["tuning_problems"] + [
        p for k in PARTS for p in old.get(k.replace("-", "_") + "_problems", [])
    ]


def _reuse(path: str | None, settings: dict) -> dict[int, dict]:
    """``{problem index: diffusers bests}`` from an earlier ``results.json`` of the same settings."""
    if path is None:
        return {}
    probs = _old_problems(path, settings, "--reuse-diffusers")
    return {p["spec"]["index"]: {int(n): v for n, v in p["diffusers"].items()} for p in probs}


def _reuse_tuning(path: str | None, settings: dict) -> dict[int, dict]:
    """``{problem index: record}`` of the tuning problems of an earlier ``results.json`` of the same
    settings (diffusers' bests and every candidate's errors; used where they cover this run's)."""
    if path is None:
        return {}
    probs = _old_problems(path, settings, "--reuse-tuning")
    return {
        p["spec"]["index"]: {**p, "diffusers": {int(n): v for n, v in p["diffusers"].items()},
                             "scorekit": {k: {int(n): e for n, e in v.items()}
                                          for k, v in p["scorekit"].items()}}
        for p in probs if p["spec"]["part"].startswith("tuning")
    }  # fmt: skip


def run_suite(*, out: Path, problems: int = 20, rows: int = 64, seed: int = 0, quick: bool = False,
              rtol: float = 1e-7, reuse_diffusers: str | None = None, fit_nfes=None,
              part: str = "held-out", reuse_tuning: str | None = None,
              log=print) -> dict:  # fmt: skip
    """Run the suite: tuning part (all candidates), selection, held-out part (the chosen configs).

    ``part="held-out-b"``: block b too (``specs``): its tuning-b problems join the tuning part and
    its held-out-b problems, used by no choice, get their own tables (``held_out_b``).
    ``fit_nfes``: also fit ``optimized`` / ``bespoke`` per problem of the reported part (block a's
    held-out part, or held-out-b with ``part="held-out-b"``) at these NFEs (``random_fitted``). ``reuse_tuning``: tuning records (diffusers and every candidate) from an
    earlier run's ``results.json`` where they cover this run's candidates. Writes
    ``<out>/results.json`` and ``<out>/table.txt`` (and ``partial.json`` while it runs); returns
    what ``results.json`` holds.
    """
    t0 = time.perf_counter()
    if part not in PARTS:
        raise ValueError(f"--part: got {part!r}; allowed: {', '.join(PARTS)}")
    if quick:
        problems, rows, rtol = min(problems, 2), min(rows, 16), max(rtol, 1e-6)
    nfes = (4, 8) if quick else NFES
    bad = sorted(set(fit_nfes or ()) - set(nfes))
    if bad:
        raise ValueError(f"--fit: NFE {bad} not in this suite's NFEs {list(nfes)}")
    settings = {"rows": rows, "rtol": rtol, "quick": quick, "nfes": list(nfes), "problems": problems,
                "seed": seed, "suite_seed": SUITE_SEED}  # fmt: skip
    cfg = {**settings, "nfes": nfes, "part": part, "reuse": _reuse(reuse_diffusers, settings),
           "reuse_tuning": _reuse_tuning(reuse_tuning, settings)}  # fmt: skip
    all_specs = specs(problems, seed, quick, block_b=part != "held-out",
                      block_c=part in ("held-out-c", "held-out-d"),
                      block_d=part == "held-out-d")  # fmt: skip
    log(f"random suite: {len(all_specs)} problems ({rows} rows each), NFE {list(nfes)}")
    out.mkdir(parents=True, exist_ok=True)
    tuning = []
    for s in all_specs:  # the tuning part(s), every candidate
        if s.part.startswith("tuning"):
            tuning.append(_run_problem(s, cfg, None, log))
            atomic_write_json(out / "partial.json", {"tuning_problems": tuning})
    chosen = {"stats": select(tuning, nfes), "no_stats": select(tuning, nfes, teleport=False)}
    if fit_nfes:  # the fits start from the best teleport candidate on the tuning part
        chosen["teleport"] = select(tuning, nfes, teleport=None)
    keep = {c[n]["config"] for c in chosen.values() for n in nfes}
    by_key = {_key(c): c for c in candidates(quick)}
    cfg["fit"] = {n: choice_of(by_key[chosen["teleport"][n]["config"]]) for n in fit_nfes or ()}
    held: dict[str, list[dict]] = {p: [] for p in PARTS}
    for s in all_specs:  # the held-out part(s), the chosen configs only
        if s.part.startswith("held-out"):
            held[s.part].append(_run_problem(s, cfg, keep, log))
            atomic_write_json(out / "partial.json", {"tuning_problems": tuning, "held": held})
    # Labels say whether this run's choice is what sample(sampler="auto") uses (samplers.defaults).
    labels = {
        "stats": ", with the data's mean and covariance, this run's choice"
        + _in_defaults(chosen["stats"], by_key, AUTO_TELEPORT, "AUTO_TELEPORT"),
        "no_stats": ", without data statistics, this run's choice"
        + _in_defaults(chosen["no_stats"], by_key, AUTO, "AUTO"),
        "teleport": ", the best teleport candidate (the fits' start)",
    }
    tables, texts = {}, []
    for p in reversed(PARTS):  # the freshest part first
        if not held[p]:
            continue
        tables[p] = {k: held_out_table(held[p], c, nfes) for k, c in chosen.items()}
        name = p + (" (fresh)" if p == part and p != "held-out" else "")
        texts += [table_text(tables[p][k], labels[k], part=name) for k in ("stats", "no_stats")]
    if cfg["fit"]:  # the fits and their start, on the part the fits are measured on
        fresh = part + (" (fresh)" if part != "held-out" else "")
        texts.append(table_text(tables[part]["teleport"], labels["teleport"], part=fresh))
        tables[part]["fitted"] = fitted_table(held[part], nfes)
        texts.append(fitted_text(tables[part]["fitted"], part))
    text = "\n\n".join(texts)
    log(text)
    result = {
        "settings": {**settings, "sigma_max": DiscreteProcess.linear().sigma_max,
                     "stats_rows": STATS_ROWS, "reused_diffusers": reuse_diffusers},
        "part": part, "chosen": chosen, "tuning_problems": tuning,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    for p in PARTS:  # held_out, held_out_b, ... (tables) and their *_problems (records)
        result[p.replace("-", "_")] = tables.get(p, {})
        result[p.replace("-", "_") + "_problems"] = held[p]
    atomic_write_json(out / "results.json", result)
    atomic_write(out / "table.txt", (text + "\n").encode())
    return result


def run(args: argparse.Namespace) -> int:
    """``scorekit bench samplers --suite random``: writes into ``<--out>/random``."""
    run_suite(out=Path(args.out) / "random", seed=args.seed, quick=args.quick,
              problems=args.problems, rows=args.rows,
              reuse_diffusers=getattr(args, "reuse_diffusers", None),
              fit_nfes=getattr(args, "fit_nfes", None),
              part=getattr(args, "part", "held-out"),
              reuse_tuning=getattr(args, "reuse_tuning", None))  # fmt: skip
    return 0
