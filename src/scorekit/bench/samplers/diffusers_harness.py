"""diffusers driven by an exact denoiser: its schedulers on the DDPM linear table, in float64.

diffusers is an optional peer (``pip install 'scorekit[test]'``); without it this module still
imports, and ``require_diffusers`` says in one line what to install.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from scorekit.bench.samplers.measure import Counted, Problem, rms_error
from scorekit.process import DiscreteProcess

try:
    import diffusers
except ImportError:  # the optional peer; see require_diffusers
    diffusers = None

__all__ = [
    "SIGMA_FRAME_SCHEDULERS",
    "diffusers_configs",
    "diffusers_scheduler",
    "diffusers_side",
    "diffusers_sigmas",
    "require_diffusers",
    "run_diffusers",
]

#: The one line shown when diffusers is missing.
MISSING = (
    "scorekit bench samplers compares against diffusers, which is not installed: "
    "pip install 'scorekit[test]'"
)


def require_diffusers() -> None:
    """Raise ModuleNotFoundError with an install hint (one line) if diffusers is not installed."""
    if diffusers is None:
        raise ModuleNotFoundError(MISSING, name="diffusers")


#: diffusers schedulers whose ``sample`` lives in the sigma frame (``x = x0 + sigma * noise``); the
#: others hold ``x_t = x / sqrt(1 + sigma^2)`` (the VP frame of the DDPM table).
SIGMA_FRAME_SCHEDULERS = {
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
}


def diffusers_scheduler(name: str, **config):
    """A diffusers scheduler ``name`` on DDPM's linear beta table (1000 steps), built in code.

    The table is replaced by the float64 ``alphas_cumprod`` of ``DiscreteProcess.linear()`` so that
    the scheduler's arithmetic runs in float64 when the sample is float64 (diffusers builds it in
    float32). ``config`` overrides the scheduler's options (``use_karras_sigmas``, ``solver_order``...).
    """
    require_diffusers()
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ValueError(f"unknown diffusers scheduler {name!r}")
    base = {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
    }
    sched = cls.from_config({**base, **config})
    if sched.config.get("clip_sample"):  # DDIM's default clamps x0 to [-1, 1]: wrong for these data
        sched.register_to_config(clip_sample=False)
    ac = DiscreteProcess.linear().alphas_cumprod.clone()
    sched.alphas_cumprod = ac
    if hasattr(sched, "final_alpha_cumprod"):  # DDIM, PNDM
        one = sched.config.get("set_alpha_to_one", True)
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if one else ac[0]
    if hasattr(sched, "lambda_t"):  # multistep solvers keep these tables (used to clip lambda)
        sched.alpha_t, sched.sigma_t = ac.sqrt(), (1 - ac).sqrt()
        sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
    return sched


class _Float64Sample(Tensor):
    """A float64 tensor on which ``.to(torch.float32)`` is a no-op.

    diffusers' Euler and DPM-Solver ``step`` casts the sample to float32 before the update (meant as
    an upcast from float16); wrapping the sample keeps the update in float64, so scorekit and
    diffusers can be compared at float64 tolerance. Used only in the agreement harness, not in timings.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is Tensor.to:
            args = tuple(a for a in args if a is not torch.float32)
            if kwargs.get("dtype") is torch.float32:
                kwargs.pop("dtype")
        return super().__torch_function__(func, types, args, kwargs)


def _table_sigma(sched, t) -> Tensor:
    ac = sched.alphas_cumprod[int(t)]
    return ((1 - ac) / ac).sqrt()


def diffusers_sigmas(sched, num_inference_steps: int) -> Tensor:
    """The sigma-frame schedule ``[n + 1]`` (float64, ending in 0 or sigma_min) the scheduler steps on.

    Calls ``set_timesteps``. Heun's doubled entries are merged. DDIM steps from ``t`` to
    ``t - 1000 // n`` whatever its spacing; with ``"trailing"`` spacing those are its timesteps.
    """
    sched.set_timesteps(num_inference_steps)
    if getattr(sched, "sigmas", None) is not None:
        return torch.unique_consecutive(sched.sigmas.to(torch.float64))
    ts = [int(t) for t in sched.timesteps]
    sig = [float(_table_sigma(sched, t)) for t in ts]
    last = 0.0 if sched.config.get("set_alpha_to_one", True) else float(_table_sigma(sched, 0))
    return torch.tensor([*sig, last], dtype=torch.float64)


def run_diffusers(
    sched,
    denoiser,
    x: Tensor,
    num_inference_steps: int,
    *,
    sigma_start: float | None = None,
    sigmas: Tensor | None = None,
    keep_float64: bool = True,
) -> tuple[Tensor, int]:
    """Run a diffusers scheduler's loop with ``denoiser`` from the sigma-frame state ``x`` ``[B, ...]``.

    The model is ``eps(x_t, t) = (x - D(x, sigma)) / sigma`` with ``x = x_t sqrt(1 + sigma^2)`` and
    ``sigma`` the noise level the scheduler has for that call (its ``sigmas[step_index]``, or the table
    at ``t`` for DDIM). ``sigmas`` are promoted to float64. If ``sigma_start`` is given it replaces the
    scheduler's first sigma (so a float32-rounded table value does not shift the start). With
    ``keep_float64`` a float64 ``x`` stays float64 through diffusers' ``step`` (see ``_Float64Sample``).
    ``sigmas`` (a scheduler with a ``sigmas`` table only, not Heun's doubled one) replaces the
    table after ``set_timesteps``: any schedule of ``num_inference_steps + 1`` entries.

    Returns:
        ``(x0, nfe)``: the final sample in the sigma frame and the number of denoiser calls.
    """
    sched.set_timesteps(num_inference_steps)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    has_sigmas = getattr(sched, "sigmas", None) is not None
    if has_sigmas:
        sched.sigmas = sched.sigmas.to(torch.float64)
        if sigmas is not None:
            if sigmas.shape != sched.sigmas.shape:
                raise ValueError(
                    f"sigmas must have {tuple(sched.sigmas.shape)} entries for "
                    f"{type(sched).__name__} with {num_inference_steps} steps; got {tuple(sigmas.shape)}"
                )
            sched.sigmas = sigmas.to(torch.float64).clone()
        if sigma_start is not None:
            sched.sigmas[0] = sigma_start
    batch = x.shape[0]

    def sigma_now(t) -> Tensor:
        if has_sigmas:
            i = sched.step_index if sched.step_index is not None else 0
            return sched.sigmas[i]
        return _table_sigma(sched, t)

    sigma_frame = type(sched).__name__ in SIGMA_FRAME_SCHEDULERS
    s0 = sigma_now(sched.timesteps[0]).to(x.dtype)
    sample = x if sigma_frame else x / (1 + s0**2).sqrt()
    wrap = keep_float64 and x.dtype == torch.float64
    if wrap:
        sample = sample.as_subclass(_Float64Sample)
    nfe = 0
    for t in sched.timesteps:
        inp = sched.scale_model_input(sample, t)
        s = sigma_now(t).to(x.dtype)
        xs = inp * (1 + s**2).sqrt()
        den = denoiser(xs.as_subclass(Tensor), s.expand(batch))
        nfe += 1
        eps = (xs - den) / s
        sample = sched.step(eps, t, sample).prev_sample
    sample = sample.as_subclass(Tensor)
    if sigma_frame:
        return sample, nfe
    if has_sigmas:
        s_last = sched.sigmas[-1].to(x.dtype)
    else:
        one = sched.config.get("set_alpha_to_one", True)
        s_last = torch.tensor(0.0) if one else _table_sigma(sched, 0)
    return sample * (1 + s_last.to(x.dtype) ** 2).sqrt(), nfe


def diffusers_configs(quick: bool) -> list[tuple[str, str, dict]]:
    """(label, scheduler, config): every scheduler with default (linspace), trailing and Karras steps.

    DDIM's default "leading" spacing starts at t = 900 (sigma 60, not the start noise 157), so DDIM
    runs with "linspace" and "trailing"; ``clip_sample`` is off (the targets are not in [-1, 1]).
    """
    spacings = {"default": {}, "trailing": {"timestep_spacing": "trailing"}}
    karras = {"use_karras_sigmas": True}
    out = []
    for sp, c in spacings.items():
        ddim = {"timestep_spacing": "linspace"} if sp == "default" else c
        out.append((f"DDIM/{sp}", "DDIMScheduler", ddim))
    scheds = [
        ("Euler", "EulerDiscreteScheduler", {}),
        ("Heun", "HeunDiscreteScheduler", {}),
        ("LMS", "LMSDiscreteScheduler", {}),
        ("DPM++2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
        ("DPM++3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
        ("DPM++2S", "DPMSolverSinglestepScheduler", {"solver_order": 2}),
        ("DPM++3S", "DPMSolverSinglestepScheduler", {"solver_order": 3}),
        ("UniPC2", "UniPCMultistepScheduler", {"solver_order": 2}),
        ("UniPC3", "UniPCMultistepScheduler", {"solver_order": 3}),
        ("DEIS2", "DEISMultistepScheduler", {"solver_order": 2}),
        ("DEIS3", "DEISMultistepScheduler", {"solver_order": 3}),
    ]
    if quick:
        scheds = [scheds[i] for i in (0, 3, 7, 8)]
    for label, name, cfg in scheds:
        for sp, c in {**spacings, "karras": karras}.items():
            out.append((f"{label}/{sp}", name, {**cfg, **c}))
    return out


def _steps_within(gm, name: str, cfg: dict, probe: Tensor, target_nfe: int) -> int | None:
    """The most steps whose real NFE (counted on ``probe`` ``[1, d]``) is at most ``target_nfe``."""
    for n in range(target_nfe, 0, -1):
        counted = Counted(gm)
        run_diffusers(diffusers_scheduler(name, **cfg), counted, probe, n)
        if counted.calls <= target_nfe:
            return n
    return None


def diffusers_side(problem: Problem, nfes, quick: bool, log) -> list[dict]:
    """One row per diffusers config x target NFE it can fit: its error on ``problem`` and NFE."""
    gm, x_t, ref = problem.gm, problem.x_t, problem.ref
    rows = []
    probe = x_t[:1].clone()
    for label, name, cfg in diffusers_configs(quick):
        for target_nfe in nfes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps = _steps_within(gm, name, cfg, probe, target_nfe)
                if steps is None:
                    continue
                counted = Counted(gm)
                sched = diffusers_scheduler(name, **cfg)
                out, _ = run_diffusers(
                    sched, counted, x_t.clone(), steps, sigma_start=problem.sigma_max
                )
            err = rms_error(out, ref) if torch.isfinite(out).all() else math.nan
            rows.append(
                {"side": "diffusers", "config": label, "target_nfe": target_nfe,
                 "nfe": counted.calls, "steps": steps, "error": err, **problem.diagnostics(out)}
            )  # fmt: skip
            log(f"  diffusers {label:22s} NFE {counted.calls:3d}  err {err:.4g}")
    return rows
