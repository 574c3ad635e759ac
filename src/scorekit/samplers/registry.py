"""The sampler registry: one explicit table of names, and the exact denoiser-call counts.

Each sampler records its NFE formula beside its definition (``common.sampler``); this module reads
them. A new sampler costs one function (with its ``@sampler(nfe=...)`` line) and one line here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import Tensor

from scorekit._util import check_int, lookup
from scorekit.samplers.adaptive import adaptive_ode, adaptive_sde
from scorekit.samplers.bespoke import bespoke
from scorekit.samplers.common import check_sigmas
from scorekit.samplers.dc import dc_solver
from scorekit.samplers.dpm3 import dpm_solver_v3
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

__all__ = ["ADAPTIVE", "REGISTRY", "STOCHASTIC", "get_sampler", "nfe", "options_of", "steps_for"]

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
    "dc_solver": dc_solver,
    "dpm_solver_v3": dpm_solver_v3,
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
    "sa_solver": sa_solver,
    "adaptive_ode": adaptive_ode,
    "adaptive_sde": adaptive_sde,
}

#: Samplers whose number of steps is chosen by error control (``nfe`` cannot be known in advance);
#: they report the calls they made in ``stats["nfe"]``.
ADAPTIVE: frozenset[str] = frozenset(k for k, f in REGISTRY.items() if f.nfe_formula is None)

#: Samplers that draw noise along the way (they use ``generator``).
STOCHASTIC: frozenset[str] = frozenset(k for k, f in REGISTRY.items() if f.stochastic)


def get_sampler(name: str) -> Callable:
    """``REGISTRY[name]``, or a ValueError listing the valid names."""
    return lookup(REGISTRY, name, "sampler")


def options_of(name: str, options: dict) -> dict:
    """The sampler's keyword options with defaults filled in; a misspelt option is a TypeError."""
    params = inspect.signature(get_sampler(name)).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{name}() got unexpected option(s) {unknown}; allowed: {allowed}")
    return {p: options.get(p, params[p].default) for p in allowed}


def _count(name: str, n: int, options: dict) -> int:
    formula = get_sampler(name).nfe_formula
    if formula is None:
        raise ValueError(
            f"{name} is adaptive: its NFE is not known in advance (it depends on the tolerances and "
            "the denoiser); pass stats={} to the sampler and read stats['nfe'] after the call"
        )
    return formula(n, options_of(name, options))


def nfe(name: str, sigmas: Tensor | Sequence[float], **options) -> int:
    """The exact number of denoiser calls ``REGISTRY[name]`` makes on ``sigmas`` with ``options``.

    Raises:
        ValueError: unknown name, invalid ``sigmas``, or an adaptive sampler (NFE not known in advance).
        TypeError: an option the sampler does not take.
    """
    s = check_sigmas(sigmas)
    get_sampler(name)
    return _count(name, len(s) - 1, options)


def steps_for(name: str, target: int, options: dict) -> int:
    """The number of steps ``n`` whose NFE is exactly ``target``, or a ValueError naming neighbours.

    Every NFE formula is increasing in ``n``, so the search walks up from 2 steps (one full step of
    the sampler's order before the final step to sigma = 0).
    """
    try:
        check_int("nfe", target)
    except ValueError:
        raise ValueError(f"nfe must be a positive integer; got {target!r}") from None
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
