"""Samplers: one plain function per method, the registry, exact NFE counts and ``sample()``.

Every sampler has the signature

    name(denoiser, x, sigmas, *, generator=None, callback=None, progress=False, <options>) -> x

with ``x`` ``[B, ...]`` already at ``sigmas[0]`` and ``sigmas`` 1-D, strictly decreasing, ending in 0.
``REGISTRY`` maps each name to its function; ``nfe(name, sigmas, **options)`` is the exact number of
denoiser calls it makes; ``sample()`` picks the number of steps that gives a requested NFE exactly.

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
deis              N               Adams in sigma / log sigma; ``order`` 1-3
ipndm             N               equal-step Adams-Bashforth up to order 4; strong at <10 NFE
bespoke           N               explicit linear-solver coefficients, fitted by ``fit_bespoke``
euler_ancestral   N               DDPM ancestral (``eta``)
euler_maruyama    N               reverse SDE, first order; needs many steps
dpmpp_2m_sde      N               SDE family with ``eta``; ``eta=0`` is dpmpp_2m
dpmpp_3m_sde      N               as above with a curvature term
edm_stochastic    2N - 1          EDM Alg. 2 (churn + Heun)
restart           2N - 1 + 2KM    Heun + K restarts of M Heun steps in [t_min, t_max]
pc_langevin       N + C(N - 1)    reverse diffusion + C Langevin corrector steps (snr)
adaptive_ode      stats["nfe"]    dopri5 (torchdiffeq) in log sigma, rtol/atol
adaptive_sde      stats["nfe"]    Gotta Go Fast (EM + improved Euler), per-sample control
================  ==============  ======================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from scorekit.samplers.adaptive import adaptive_ode, adaptive_sde
from scorekit.samplers.bespoke import BespokeSolver, bespoke, fit_bespoke, linear_coefficients
from scorekit.samplers.common import check_sigmas, row_generators
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
from scorekit.samplers.sde import (
    dpmpp_2m_sde,
    dpmpp_3m_sde,
    edm_stochastic,
    euler_ancestral,
    euler_maruyama,
    pc_langevin,
    restart,
)

__all__ = [
    "ADAPTIVE",
    "REGISTRY",
    "BespokeSolver",
    "adaptive_ode",
    "adaptive_sde",
    "bespoke",
    "deis",
    "dpm_solver_2",
    "dpm_solver_3",
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
    "heun",
    "ipndm",
    "linear_coefficients",
    "nfe",
    "pc_langevin",
    "restart",
    "sample",
    "unipc",
]

#: Sampler name -> function. One explicit table; the contract tests cover exactly these names.
REGISTRY: dict[str, Callable] = {
    "euler": euler,
    "heun": heun,
    "dpm_solver_2": dpm_solver_2,
    "dpm_solver_3": dpm_solver_3,
    "dpmpp_2s": dpmpp_2s,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "deis": deis,
    "ipndm": ipndm,
    "bespoke": bespoke,
    "euler_ancestral": euler_ancestral,
    "euler_maruyama": euler_maruyama,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "edm_stochastic": edm_stochastic,
    "restart": restart,
    "pc_langevin": pc_langevin,
    "adaptive_ode": adaptive_ode,
    "adaptive_sde": adaptive_sde,
}

#: Number of denoiser calls as a function of the number of steps ``n = len(sigmas) - 1`` and the
#: sampler's options (defaults filled in). Adaptive samplers are absent: their NFE depends on the run.
_NFE: dict[str, Callable[..., int]] = {
    "euler": lambda n, o: n,
    "heun": lambda n, o: 2 * n - 1,
    "dpm_solver_2": lambda n, o: 2 * n - 1,
    "dpm_solver_3": lambda n, o: 3 * n - 2,
    "dpmpp_2s": lambda n, o: 2 * n - 1,
    "dpmpp_2m": lambda n, o: n,
    "dpmpp_3m": lambda n, o: n,
    "unipc": lambda n, o: n,
    "deis": lambda n, o: n,
    "ipndm": lambda n, o: n,
    "bespoke": lambda n, o: n,
    "euler_ancestral": lambda n, o: n,
    "euler_maruyama": lambda n, o: n,
    "dpmpp_2m_sde": lambda n, o: n,
    "dpmpp_3m_sde": lambda n, o: n,
    "edm_stochastic": lambda n, o: 2 * n - 1,
    "restart": lambda n, o: 2 * n - 1 + 2 * o["restarts"] * o["restart_steps"],
    "pc_langevin": lambda n, o: n + o["n_corrector"] * (n - 1),
}

#: Samplers whose number of steps is chosen by error control (``nfe`` cannot be known in advance);
#: they report the calls they made in ``stats["nfe"]``.
ADAPTIVE: frozenset[str] = frozenset({"adaptive_ode", "adaptive_sde"})


def _lookup(name: str) -> Callable:
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; allowed: {sorted(REGISTRY)}")
    return REGISTRY[name]


def _options(name: str, options: dict) -> dict:
    """The sampler's keyword options with defaults filled in; a misspelt option is a TypeError."""
    params = inspect.signature(_lookup(name)).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{name}() got unexpected option(s) {unknown}; allowed: {allowed}")
    return {p: options.get(p, params[p].default) for p in allowed}


def _count(name: str, n: int, options: dict) -> int:
    if name in ADAPTIVE:
        raise ValueError(
            f"{name} is adaptive: its NFE is not known in advance (it depends on the tolerances and "
            "the denoiser); pass stats={} to the sampler and read stats['nfe'] after the call"
        )
    return _NFE[name](n, _options(name, options))


def nfe(name: str, sigmas: Tensor | Sequence[float], **options) -> int:
    """The exact number of denoiser calls ``REGISTRY[name]`` makes on ``sigmas`` with ``options``.

    Raises:
        ValueError: unknown name, invalid ``sigmas``, or an adaptive sampler (NFE not known in advance).
        TypeError: an option the sampler does not take.
    """
    s = check_sigmas(sigmas)
    _lookup(name)
    return _count(name, len(s) - 1, options)


def _steps_for(name: str, target: int, options: dict) -> int:
    """The number of steps ``n`` whose NFE is exactly ``target``, or a ValueError naming neighbours."""
    if not isinstance(target, int) or isinstance(target, bool) or target < 1:
        raise ValueError(f"nfe must be a positive integer; got {target!r}")
    least = _count(name, 2, options)
    if target < least:
        raise ValueError(
            f"nfe={target} is too small for {name}: it needs at least {least} (one full step of its "
            "order before the final step to sigma = 0)"
        )
    below, n = None, 2
    while True:
        got = _count(name, n, options)
        if got == target:
            return n
        if got > target:
            raise ValueError(
                f"{name} cannot make exactly nfe={target} denoiser calls; nearest achievable: "
                f"{below} ({n - 1} steps) or {got} ({n} steps)"
            )
        below, n = got, n + 1


def sample(
    denoiser: Callable,
    shape: Sequence[int],
    *,
    nfe: int | None = None,
    sampler: str = "dpmpp_2m",
    schedule: str | Callable = "karras",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    seed: int = 0,
    index_offset: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    sigmas: Tensor | Sequence[float] | None = None,
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
        sampler: a name in ``REGISTRY``.
        schedule: a name for ``scorekit.schedules.get_schedule`` or a callable
            ``(n, sigma_min, sigma_max) -> sigmas [n + 1]``.
        seed: the seed; row ``i`` of the result is sample number ``index_offset + i`` of this seed.
        index_offset: first sample number (for sharding: rank ``r`` draws rows ``start_r ...``).
        sigmas: explicit noise levels (overrides ``schedule``, ``sigma_min``, ``sigma_max``).
        **options: the sampler's own keyword options (misspelt ones are a TypeError).

    Returns:
        ``[B, ...]`` samples in ``dtype`` on ``device``.
    """
    fn = _lookup(sampler)
    _options(sampler, options)
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be [B, ...] with rank >= 2 and positive sizes; got {shape}")
    if sigmas is not None:
        s = check_sigmas(sigmas)
        if (
            nfe is not None
            and sampler not in ADAPTIVE
            and _count(sampler, len(s) - 1, options) != nfe
        ):
            raise ValueError(
                f"nfe={nfe} does not match the explicit sigmas: {sampler} makes "
                f"{_count(sampler, len(s) - 1, options)} calls on {len(s) - 1} steps"
            )
    elif sampler in ADAPTIVE:
        if nfe is not None:
            raise ValueError(
                f"{sampler} is adaptive: its NFE follows from its tolerances (rtol/atol), so nfe must "
                f"be None; got nfe={nfe}"
            )
        s = [float(sigma_max), float(sigma_min), 0.0]
    else:
        if nfe is None:
            raise ValueError(
                f"give nfe (the number of denoiser calls) or explicit sigmas for {sampler}"
            )
        n = _steps_for(sampler, nfe, options)
        if isinstance(schedule, str):
            from scorekit.schedules import get_schedule

            schedule = get_schedule(schedule)
        if not callable(schedule):
            raise TypeError(f"schedule must be a name or a callable; got {type(schedule).__name__}")
        s = check_sigmas(
            schedule(n, sigma_min, sigma_max), name=f"sigmas from schedule {schedule!r}"
        )
        if len(s) != n + 1:
            raise ValueError(f"schedule returned {len(s)} sigmas for n={n} steps; expected {n + 1}")
    device = torch.device(device if device is not None else "cpu")
    if not isinstance(index_offset, int) or index_offset < 0:
        raise ValueError(f"index_offset must be an integer >= 0; got {index_offset!r}")
    gens = row_generators(seed, range(index_offset, index_offset + shape[0]), device)
    x = torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype, device=device) for g in gens])
    x = x * s[0]
    sig = torch.tensor(s, dtype=torch.float64)
    return fn(denoiser, x, sig, generator=gens, progress=progress, **options)
