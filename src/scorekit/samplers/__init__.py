"""Samplers: one plain function per method, the registry, exact NFE counts and ``sample()``.

Every sampler has the signature

    name(denoiser, x, sigmas, *, generator=None, callback=None, progress=False, <options>) -> x

with ``x`` ``[B, ...]`` already at ``sigmas[0]`` and ``sigmas`` 1-D, strictly decreasing, ending in 0.
``REGISTRY`` maps each name to its function; ``nfe(name, sigmas, **options)`` is the exact number of
denoiser calls it makes; ``sample()`` picks the number of steps that gives a requested NFE exactly,
by default ``dpmpp_2m`` on karras steps to 0.002 (the one multistep method that stayed bounded on
every network of the robustness suite, ``scorekit bench samplers --suite robust``), and with
``sampler="auto"`` the sampler, schedule and noise band that the random-mixture suite chose for that
NFE on its tuning problems (``samplers.defaults``, ``docs/choosing-a-sampler.md``): with
``gaussian=GaussianFlow(mean, cov)`` of the data, the teleport start and ``schedules.spectral_band``
(``AUTO_TELEPORT``, tuned on 20 problems), otherwise a band in the denoiser's data scale (``AUTO``,
tuned on 10: the 20-problem choice failed the trained-network check). Both tables are bounded on the
robustness suite's perturbed mixtures and level with the default on the trained digits UNet (so
``"auto"`` is not the default).

Choosing (``N`` steps = ``len(sigmas) - 1``; orders as measured in ``tests/test_samplers_order.py``):

================  ==============  ======================================================
sampler           NFE             notes
================  ==============  ======================================================
euler             N               order 1 (= DDIM, DPM-Solver-1)
heun              2N - 1          order 2, EDM Alg. 1
dpm_solver_2      2N - 1          order 2, singlestep, noise prediction
dpm_solver_3      3N - 2          order 3, singlestep, noise prediction
dpmpp_2s          2N - 1          order 2, singlestep, data prediction
dpmpp_2m          N               order 2, multistep; a good default at 10-30 NFE
dpmpp_3m          N               third-order steps, multistep
unipc             N               predictor-corrector; ``order`` 1-3, ``variant`` bh1/bh2
dc_solver         N               unipc + dynamic compensation, ratios by ``fit_dc`` / ``fit_dc_cascade`` (any NFE)
dpm_solver_v3     N               multistep (+ ``corrector``, ``pseudo_order``), statistics by ``fit_ems``
deis              N               Adams in sigma / log sigma; ``order`` 1-3
ipndm             N               Adams-Bashforth in sigma up to order 4 (variable-step; ``variant="equal"``: published)
bespoke           N               explicit linear-solver coefficients, fitted by ``fit_bespoke``
euler_ancestral   N               DDPM ancestral (``eta``)
euler_maruyama    N               reverse SDE, first order; needs many steps
dpmpp_2m_sde      N               SDE family with ``eta``; ``eta=0`` is dpmpp_2m
dpmpp_3m_sde      N               as above with a curvature term
edm_stochastic    2N - 1          EDM Alg. 2 (churn + Heun)
restart           2N - 1 + 2KM    Heun + K restarts of M Heun steps in [t_min, t_max]
pc_langevin       N + C(N - 1)    reverse diffusion + C Langevin corrector steps (snr)
sa_solver         N               SA-Solver: stochastic Adams PC, ``tau`` noise, orders p/c
adaptive_ode      stats["nfe"]    dopri5 (torchdiffeq) in log sigma, rtol/atol
adaptive_sde      stats["nfe"]    Gotta Go Fast (EM + improved Euler), per-sample control
================  ==============  ======================================================

Modules: ``common`` (the plumbing every sampler shares, public for guidance and posterior solvers),
``ode``, ``sde``, ``adaptive``, ``bespoke`` (the samplers), ``registry`` (``REGISTRY``, ``nfe``),
``fitted`` (``optimized`` schedules and ``fit_bespoke`` solvers, fitted to one denoiser: they run the
samplers, so they sit above them), ``accelerators`` (teleport start, exposure-bias corrections),
``sa``, ``dc``, ``dpm3`` (SA-Solver, DC-Solver with ``fit_dc``, DPM-Solver-v3 with ``fit_ems``) and
``parallel`` (``parallel_euler``, ``parallel_sample``: Picard iterations for any sampler with a fixed
step map, stochastic ones with their noise drawn up front (``PresetNoise``), fewer sequential rounds;
not in the registry).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from scorekit._util import check_int
from scorekit.denoiser import data_scale
from scorekit.samplers import registry
from scorekit.samplers.accelerators import GaussianFlow, with_last_step
from scorekit.samplers.adaptive import adaptive_ode, adaptive_sde
from scorekit.samplers.bespoke import BespokeSolver, bespoke, linear_coefficients
from scorekit.samplers.common import PresetNoise, check_sigmas, row_generators
from scorekit.samplers.dc import DCCascade, DCSolver, dc_solver, fit_dc, fit_dc_cascade
from scorekit.samplers.defaults import AUTO, AUTO_TELEPORT, auto_choice, auto_sigmas
from scorekit.samplers.dpm3 import EMS, dpm_solver_v3, fit_ems
from scorekit.samplers.fitted import fit_bespoke, optimized
from scorekit.samplers.ode import (
    deis,
    dpm_solver_2,
    dpm_solver_3,
    dpmpp_2m,
    dpmpp_2s,
    dpmpp_3m,
    euler,
    heun,
    ipndm,
    unipc,
)
from scorekit.samplers.parallel import linear_step_map, parallel_euler, parallel_sample
from scorekit.samplers.registry import (
    ADAPTIVE,
    REGISTRY,
    STOCHASTIC,
    get_sampler,
    nfe,
    options_of,
    steps_for,
)
from scorekit.samplers.sa import sa_solver
from scorekit.samplers.sde import (
    dpmpp_2m_sde,
    dpmpp_3m_sde,
    edm_stochastic,
    euler_ancestral,
    euler_maruyama,
    pc_langevin,
    restart,
)
from scorekit.schedules import get_schedule

__all__ = [
    "ADAPTIVE",
    "AUTO",
    "AUTO_TELEPORT",
    "EMS",
    "REGISTRY",
    "STOCHASTIC",
    "BespokeSolver",
    "DCCascade",
    "DCSolver",
    "GaussianFlow",
    "PresetNoise",
    "adaptive_ode",
    "adaptive_sde",
    "bespoke",
    "dc_solver",
    "default_sigma_max",
    "deis",
    "dpm_solver_2",
    "dpm_solver_3",
    "dpm_solver_v3",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2s",
    "dpmpp_3m",
    "dpmpp_3m_sde",
    "edm_stochastic",
    "euler",
    "euler_ancestral",
    "euler_maruyama",
    "fit_bespoke",
    "fit_dc",
    "fit_dc_cascade",
    "fit_ems",
    "get_sampler",
    "heun",
    "ipndm",
    "linear_coefficients",
    "linear_step_map",
    "nfe",
    "optimized",
    "parallel_euler",
    "parallel_sample",
    "pc_langevin",
    "restart",
    "sa_solver",
    "sample",
    "schedule_sigmas",
    "unipc",
]


def _start_noise(noise, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``noise`` checked (a finite floating tensor of ``shape``) and cast to ``dtype`` / ``device``."""
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        got = f"{noise.dtype} tensor" if isinstance(noise, Tensor) else type(noise).__name__
        raise TypeError(f"noise must be a floating tensor of the result's shape {shape}; got {got}")
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have the result's shape {shape}; got {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must be finite; got NaN or inf entries")
    return noise.to(device=device, dtype=dtype)


def default_sigma_max(denoiser: Callable) -> float:
    """``sample``'s default first sigma for ``denoiser``: ``min(80, 20 sigma_data)`` when it declares
    its data's scale (``scorekit.denoiser.data_scale``), EDM's 80 otherwise."""
    sd = data_scale(denoiser)
    return 80.0 if sd is None else min(80.0, 20.0 * sd)


def schedule_sigmas(
    schedule: str | Callable, n: int, sigma_min: float | None, sigma_max: float
) -> list[float]:
    """``n`` steps of ``schedule`` (a name or ``(n, sigma_min, sigma_max) -> sigmas``) ending in 0,
    as checked floats. ``sigma_min=None`` is ``sample``'s default grid: the schedule laid on ``n + 1``
    steps down to 0.002 with that last nonzero point dropped."""
    if isinstance(schedule, str):
        schedule = get_schedule(schedule)
    if not callable(schedule):
        raise TypeError(f"schedule must be a name or a callable; got {type(schedule).__name__}")
    drop = sigma_min is None
    m = n + drop
    s = check_sigmas(
        schedule(m, 0.002 if drop else sigma_min, sigma_max),
        name=f"sigmas from schedule {schedule!r}",
    )
    if len(s) != m + 1:
        raise ValueError(f"schedule returned {len(s)} sigmas for n={m} steps; expected {m + 1}")
    return [*s[:-2], 0.0] if drop else s


def _auto(denoiser, nfe, sigmas, schedule, sigma_min, sigma_max, gaussian, options):
    """``sample``'s ``sampler="auto"``: ``(sampler, options, sigmas, teleport_to, jump)`` from
    the tables of ``samplers.defaults`` (``AUTO_TELEPORT`` with ``gaussian``, ``AUTO`` without)."""
    if nfe is None or sigmas is not None:
        raise ValueError(
            "sampler='auto' picks the sampler and the sigmas for an NFE: give nfe and no sigmas "
            "(or a sampler name)"
        )
    if gaussian is not None and not isinstance(gaussian, GaussianFlow):
        raise TypeError(
            f"gaussian must be a samplers.GaussianFlow (the data's mean and covariance); got "
            f"{type(gaussian).__name__}"
        )
    choice = auto_choice(check_int("nfe", nfe), teleport=gaussian is not None)
    options = {**choice.options, **options}
    n = steps_for(choice.sampler, nfe, options)
    fn = get_schedule(schedule) if isinstance(schedule, str) else schedule
    s, teleport_to = auto_sigmas(
        choice, n, float(sigma_max), evals=None if gaussian is None else gaussian.evals,
        scale=data_scale(denoiser) or 1.0, schedule=fn, sigma_min=sigma_min,
    )  # fmt: skip
    return choice.sampler, options, s, teleport_to, choice.jump


def sample(
    denoiser: Callable,
    shape: Sequence[int],
    *,
    nfe: int | None = None,
    sampler: str = "dpmpp_2m",
    schedule: str | Callable | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    seed: int = 0,
    index_offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    sigmas: Tensor | Sequence[float] | None = None,
    noise: Tensor | None = None,
    gaussian: GaussianFlow | None = None,
    progress: bool = False,
    **options,
) -> Tensor:
    """Draw ``shape[0]`` samples with ``sampler`` using exactly ``nfe`` denoiser calls.

    Row ``i`` starts from ``sigmas[0] * z_i`` with ``z_i`` drawn from its own generator seeded by
    ``(seed, i)``, and a stochastic sampler draws row ``i``'s noise from that generator too, so
    sample ``i`` depends only on ``(seed, i)``, never on the batch size.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]``; bind conditioning into it beforehand.
        shape: ``[B, ...]`` of the result.
        nfe: exact number of denoiser calls; the number of steps is chosen to match it (ValueError
            naming the nearest achievable values if the sampler cannot). Leave ``None`` with explicit
            ``sigmas`` or an adaptive sampler.
        sampler: a name in ``REGISTRY`` (default ``dpmpp_2m``), or ``"auto"``: the sampler, its
            options, the schedule and the noise band chosen for this NFE by the random-mixture suite
            on exact mixtures (``samplers.defaults``; needs ``nfe``): with ``gaussian``, the teleport
            start and the band of ``schedules.spectral_band`` (``AUTO_TELEPORT``), otherwise a
            schedule from ``sigma_max`` to a last sigma in data scales (``AUTO``). An explicit
            ``schedule`` or ``sigma_min`` still wins over the table.
        schedule: a name for ``scorekit.schedules.get_schedule`` or a callable
            ``(n, sigma_min, sigma_max) -> sigmas [n + 1]``; default: the table's with ``"auto"``,
            ``"karras"`` otherwise.
        sigma_min: the last nonzero sigma; default: the table's with ``"auto"``; otherwise the
            schedule is laid on ``n + 1`` steps down to 0.002 and that last point is dropped, so the
            last call lands one grid step above it (karras from 10: 0.030 at 5 calls, 0.0089 at 10,
            0.0044 at 20) and ends with ``x = D``: a call at 0.002 returns its input almost unchanged
            (diffusers' multistep schedulers, whose grid runs to t = 0 and whose final step goes to
            sigma 0 from the grid's last nonzero point, do the same). Measured on the
            diffusers-recipe UNet at 5 calls from 10: FD 57-62 over 4 noise draws this way, 70 and
            75 on two of them with the last call at 0.002 (``docs/choosing-a-sampler.md``).
        sigma_max: the first sigma; default ``min(80, 20 sigma_data)`` when the denoiser declares
            its data's scale (``scorekit.denoiser.data_scale``: scorekit's runs, ``EDMPrecond``
            networks, ``from_diffusers`` models, as ``scorekit sample`` does), 80 (EDM's) otherwise.
            The prior ``N(0, sigma_max^2 I)`` differs from the noised data by a relative variance
            ``(sigma_data / sigma_max)^2``, 0.25 % at 20 sigma_data; steps above that are spent where
            ``D`` is the data mean (measured on the diffusers-recipe digits UNet at 5 calls: FD 377
            from 80, 56 from 10; ``docs/choosing-a-sampler.md``).
        seed: the seed; row ``i`` of the result is sample number ``index_offset + i`` of this seed.
        index_offset: first sample number (for sharding: rank ``r`` draws rows ``start_r ...``).
        sigmas: explicit noise levels (overrides ``schedule``, ``sigma_min``, ``sigma_max``).
        noise: the starting standard-normal noise ``z`` ``[B, ...]`` of the result's shape (like
            diffusers' ``latents``): the start is ``sigmas[0] * z`` instead of the seed's draw, so two
            samplers, or scorekit and another library, can be compared from the same noise. It is
            cast to ``dtype`` and ``device``; a stochastic sampler still draws its later noise from
            the per-row generators of ``seed``.
        gaussian: with ``sampler="auto"``, the data's Gaussian approximation
            (``accelerators.GaussianFlow(mean, cov)``, e.g. from data rows through
            ``analytic.gaussian_approximation``): the start ``sigma_max z`` is moved without denoiser
            calls along its exact probability-flow ODE to the top of the band (Wang & Vastola 2024)
            and every call is spent inside the band. Where the table's choice says
            ``jump="gaussian"``, the Gaussian is used beyond the start too: the last step is
            ``accelerators.gaussian_jump`` (``dpm_solver_v3`` runs with ``gaussian=``). A choice
            with ``jump="extrapolated"`` ends with ``accelerators.extrapolated_jump`` instead.
        **options: the sampler's own keyword options (misspelt ones are a TypeError).

    Returns:
        ``[B, ...]`` samples in ``dtype`` on ``device``.
    """
    for name in ("generator", "callback"):
        if name in options:
            raise TypeError(
                f"sample() takes no {name}=: row i draws from its own generator seeded by "
                "(seed, i), so give seed= (an int); call the sampler itself for a generator or a "
                "callback"
            )
    if sigma_max is None:
        sigma_max = default_sigma_max(denoiser)
    teleport_to, jump = None, "tweedie"
    if sampler == "auto":
        sampler, options, sigmas, teleport_to, jump = _auto(
            denoiser, nfe, sigmas, schedule, sigma_min, sigma_max, gaussian, options
        )
    elif gaussian is not None:
        raise ValueError(
            f"gaussian= is the teleport start of sampler='auto'; got sampler={sampler!r} (wrap a "
            "sampler in accelerators.with_teleport to teleport it)"
        )
    schedule = "karras" if schedule is None else schedule
    grid_min = sigma_min  # None: the default grid of schedule_sigmas
    sigma_min = 0.002 if sigma_min is None else sigma_min
    options_of(sampler, options)
    fn, options = with_last_step(sampler, options, jump, gaussian)
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be [B, ...] with rank >= 2 and positive sizes; got {shape}")
    if gaussian is not None and gaussian.dim != math.prod(shape[1:]):
        raise ValueError(
            f"gaussian= is a Gaussian of {gaussian.dim} values per row; shape {shape} has "
            f"{math.prod(shape[1:])}"
        )
    if sampler in ADAPTIVE and nfe is not None:
        raise ValueError(
            f"{sampler} is adaptive: its NFE follows from its tolerances (rtol/atol), so nfe must "
            f"be None; got nfe={nfe}"
        )
    if sigmas is not None:
        s = check_sigmas(sigmas)
        made = None if nfe is None else registry.nfe(sampler, s, **options)
        if made is not None and made != nfe:
            raise ValueError(
                f"nfe={nfe} does not match the explicit sigmas: {sampler} makes {made} calls on "
                f"{len(s) - 1} steps"
            )
    elif sampler in ADAPTIVE:
        s = [float(sigma_max), float(sigma_min), 0.0]
    else:
        if nfe is None:
            raise ValueError(
                f"give nfe (the number of denoiser calls) or explicit sigmas for {sampler}"
            )
        n = steps_for(sampler, nfe, options)
        s = schedule_sigmas(schedule, n, grid_min, sigma_max)
    device = torch.device(device if device is not None else "cpu")
    check_int("index_offset", index_offset, least=0)
    gens = row_generators(seed, range(index_offset, index_offset + shape[0]), device)
    if noise is None:
        x = torch.stack(
            [torch.randn(shape[1:], generator=g, dtype=dtype, device=device) for g in gens]
        )
    else:
        x = _start_noise(noise, shape, dtype, device)
    if teleport_to is None:
        x = x * s[0]
    else:  # z at sigma_max, moved along the Gaussian approximation's exact flow to the band's top
        x = gaussian(x.to(gaussian.mean.device) * sigma_max, sigma_max, teleport_to).to(device)
    sig = torch.tensor(s, dtype=torch.float64)
    return fn(denoiser, x, sig, generator=gens, progress=progress, **options)
