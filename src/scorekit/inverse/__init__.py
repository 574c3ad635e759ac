"""Inverse problems: measurement operators and posterior samplers with a diffusion prior.

Given ``y = A(x0) + sigma_y n`` and a denoiser ``D(x, sigma) ~ E[x0 | x]`` of the prior, every solver
draws approximate samples of ``p(x0 | y)`` with the sampler-style signature

    name(denoiser, y, operator, x, sigmas, *, sigma_y, generator=None, callback=None, progress=False,
         <options>) -> x0

with ``x`` ``[B, *operator.in_shape]`` the starting state at ``sigmas[0]`` (noise times ``sigmas[0]``),
``y`` ``[B, *operator.out_shape]`` (one measurement per row; repeat it to draw several samples of one
posterior) and ``sigmas`` 1-D, strictly decreasing, ending in 0 (``scorekit.schedules``).

``REGISTRY`` maps each name to its function; ``nfe(name, sigmas, **options)`` is the exact number of
denoiser evaluations per output row (a call on ``K`` particles per row counts ``K``) and
``vjps(name, sigmas, **options)`` the backward passes through the denoiser (autograd) per output row,
for ``N = len(sigmas) - 1`` steps; each formula sits beside its solver (``common.solver``). ``DEFAULT``
is the solver to use without further knowledge (docs/inverse-problems.md, measured on held-out
problems):

=========  ====  ====================  =========  =====================================================
solver     NFE   VJP                   operator   notes
=========  ====  ====================  =========  =====================================================
dps        N     N                     any        differentiable ``A`` (non-linear too); ignores sigma_y
pigdm      N     N                     linear     isotropic Gaussian ``p(x0 | x)``; SVD or CG Gram solve
mmps       N     N (cg_iters + 1)      linear     Tweedie covariance ``sigma^2 dD/dx``, CG
ddrm       N     0                     SVD        spectral variational step (Kawar et al. 2022)
ddnm       N     0                     SVD        range-space correction (DDNM+)
diffpir    N     0                     linear     proximal data step, partial re-noising
tds        N K   (N-1) K (cg+1+lz)     any        SMC, K = ``particles``; Tweedie twist and variance (lz Lanczos)
dmps       N     0                     linear     uninformative-prior likelihood, closed form
daps       N K   0                     linear     K = ``ode_steps``; exact Gaussian x0 | x, y draw
repaint    *     0                     SVD        * (N - 1) U + 1, U = ``resample``; noiseless
mcg        N     N                     SVD        DPS step + RePaint replacement; noiseless
pnp_gibbs  N K   0                     linear     split Gibbs, K = ``inner_steps`` reverse steps/level
red_diff   N     0                     linear     variational (point mass): an optimiser, not a sampler
flowdps    N     0                     linear     data step on the flow's clean part; ignores sigma_y
=========  ====  ====================  =========  =====================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from scorekit._util import lookup
from scorekit.inverse.annealed import daps, dmps
from scorekit.inverse.diffpir import diffpir
from scorekit.inverse.gibbs import pnp_gibbs
from scorekit.inverse.guided import dps, mmps, pigdm
from scorekit.inverse.named import named
from scorekit.inverse.operators import (
    OPERATORS,
    Blur,
    Compose,
    Downsample,
    Identity,
    Mask,
    Matrix,
    Operator,
    Saturate,
    as_matrix,
)
from scorekit.inverse.replace import mcg, repaint
from scorekit.inverse.smc import particles_for_budget, tds
from scorekit.inverse.spectral import ddnm, ddrm
from scorekit.inverse.variational import flowdps, red_diff
from scorekit.samplers.common import check_sigmas, row_generators
from scorekit.schedules import karras

__all__ = [
    "DEFAULT",
    "OPERATORS",
    "REGISTRY",
    "Blur",
    "Compose",
    "Downsample",
    "Identity",
    "Mask",
    "Matrix",
    "Operator",
    "Saturate",
    "as_matrix",
    "budget_options",
    "daps",
    "ddnm",
    "ddrm",
    "diffpir",
    "dmps",
    "dps",
    "flowdps",
    "mcg",
    "mmps",
    "named",
    "nfe",
    "options_of",
    "pigdm",
    "pnp_gibbs",
    "posterior_samples",
    "red_diff",
    "repaint",
    "steps_for_budget",
    "tds",
    "vjps",
]

#: The default posterior sampler (``scorekit restore``, the demo): TDS with the Tweedie twist, 6 particles
#: and the Tweedie-variance step, chosen on the bench's tuning sets and checked on its held-out set
#: (docs/inverse-problems.md).
DEFAULT = "tds"

#: Posterior sampler name -> function.
REGISTRY: dict[str, Callable] = {
    "dps": dps,
    "pigdm": pigdm,
    "mmps": mmps,
    "ddrm": ddrm,
    "ddnm": ddnm,
    "diffpir": diffpir,
    "tds": tds,
    "dmps": dmps,
    "daps": daps,
    "repaint": repaint,
    "mcg": mcg,
    "pnp_gibbs": pnp_gibbs,
    "red_diff": red_diff,
    "flowdps": flowdps,
}


def options_of(name: str, options: dict) -> dict:
    """The solver's keyword options with defaults filled in; a misspelt option is a TypeError."""
    params = inspect.signature(lookup(REGISTRY, name, "posterior sampler")).parameters
    allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY]
    for key in options:
        if key not in allowed:
            raise TypeError(f"{name} has no option {key!r}; allowed: {allowed}")
    return {p: options.get(p, params[p].default) for p in allowed}


def nfe(name: str, sigmas: Tensor | Sequence[float], **options) -> int:
    """The exact number of denoiser evaluations per output row ``REGISTRY[name]`` makes on ``sigmas``.

    A call on ``K`` rows per output row (TDS's ``K`` particles) counts ``K``: this is the cost of one
    posterior sample. The formula sits beside each solver (``common.solver``).
    """
    o = options_of(name, options)
    return REGISTRY[name].nfe_formula(len(check_sigmas(sigmas)) - 1, o)


def vjps(name: str, sigmas: Tensor | Sequence[float], **options) -> int:
    """The exact number of backward passes through the denoiser per output row ``REGISTRY[name]`` makes."""
    o = options_of(name, options)
    return REGISTRY[name].vjp_formula(len(check_sigmas(sigmas)) - 1, o)


def budget_options(fn: Callable, budget: int, options: dict) -> dict:
    """``options`` with what a budget of ``budget`` network evaluations per sample decides filled in:
    TDS's ``particles`` when not given (``None``) is ``smc.particles_for_budget(budget)`` (chosen with
    the budget, not from the steps: every budget of 20 or more is at least 94% spent). Pass the result
    to both ``steps_for_budget`` and the solver."""
    if fn is tds and options.get("particles") is None and isinstance(budget, int) and budget >= 1:
        return {**options, "particles": particles_for_budget(budget)}
    return dict(options)


def steps_for_budget(
    fn: Callable, budget: int, sigma_min: float, sigma_max: float, options: dict
) -> int:
    """The most steps whose cost per sample (``fn.nfe_formula``) is at most ``budget``, with the options
    ``budget_options(fn, budget, options)`` (run the solver with those); a ValueError if even one step
    costs more."""
    options = budget_options(fn, budget, options)
    full = options_of(fn.__name__, options)
    if fn.nfe_formula(1, full) > budget:
        raise ValueError(
            f"nfe={budget} is too small for {fn.__name__} with {options or 'its defaults'}: one step "
            f"costs {fn.nfe_formula(1, full)}"
        )
    n = 1
    while fn.nfe_formula(n + 1, full) <= budget:
        n += 1
    return n


def posterior_samples(
    denoiser: Callable,
    y: Tensor,
    operator: Operator,
    *,
    sigma_y: float,
    n: int,
    nfe: int,
    solver: str,
    sigma_min: float,
    sigma_max: float,
    seed: int = 0,
    batch: int = 64,
    progress: bool = False,
    **options,
) -> Tensor:
    """``[M, n, *operator.in_shape]`` samples of ``p(x0 | y_j)`` for ``y`` ``[M, *operator.out_shape]``.

    ``solver`` names ``scorekit.inverse.REGISTRY`` (``options`` are its keyword options); the schedule
    is ``karras(steps, sigma_min, sigma_max)`` with the most steps whose cost per sample fits ``nfe``
    (TDS without ``particles``: ``particles_for_budget(nfe)`` particles, see ``budget_options``).
    """
    fn = lookup(REGISTRY, solver, "posterior sampler")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if tuple(y.shape[1:]) != operator.out_shape:
        raise ValueError(
            f"the measurement must have the operator's output shape {list(operator.out_shape)} per "
            f"row; got {list(y.shape[1:])}"
        )
    options = budget_options(fn, nfe, options)
    steps = steps_for_budget(fn, nfe, sigma_min, sigma_max, options)
    sigmas = karras(steps, sigma_min, sigma_max, dtype=y.dtype, device=y.device)
    m = y.shape[0]
    rows = [(j, i) for j in range(m) for i in range(n)]
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        idx = [j * n + i for j, i in chunk]
        gens = row_generators(seed, idx, device=y.device)
        x = torch.stack(
            [
                torch.randn(operator.in_shape, generator=g, dtype=y.dtype, device=y.device)
                for g in gens
            ]
        )
        yb = y[[j for j, _ in chunk]]
        out.append(
            fn(
                denoiser,
                yb,
                operator,
                x * sigmas[0],
                sigmas,
                sigma_y=sigma_y,
                generator=gens,
                progress=progress,
                **options,
            )
        )
    return torch.cat(out).reshape(m, n, *operator.in_shape)
