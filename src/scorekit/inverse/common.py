"""Plumbing shared by the posterior samplers: input checks, the DDIM step, Gram solves, autograd.

All solvers work in the sigma frame ``x = x0 + sigma n`` (DESIGN.md) with a measurement
``y = A(x0) + sigma_y n_y``. Two pieces recur:

* the DDIM step from ``x`` at ``s0`` to ``s1`` around a clean estimate ``d`` with ``eps = (x - d)/s0``,

      x' = d + sqrt(s1^2 - c^2) eps + c z,      c = eta s1 sqrt(1 - s1^2 / s0^2),

  (``eta = 0``: the ODE / DDIM step; ``eta = 1``: the DDPM posterior ``q(x' | x, x0 = d)``);
* solves with the Gram matrix ``(r2 A A^T + sy2 I) v = b``, by the operator's SVD when it has one
  (``U diag(1 / (r2 s^2 + sy2)) U^T b`` plus ``b / sy2`` off the range of ``U``), else by conjugate
  gradients on ``forward`` / ``adjoint``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims
from scorekit.inverse.operators import Operator
from scorekit.samplers.common import finish

__all__ = [
    "cg",
    "check_option",
    "check_problem",
    "ddim_step",
    "finish_watched",
    "gram_solve",
    "solver",
    "spectral_measurement",
    "vjp",
    "watch",
]


def solver(*, nfe: Callable[[int, dict], int], vjp: Callable[[int, dict], int]) -> Callable:
    """Record, beside a posterior sampler's definition, its exact cost on ``n = len(sigmas) - 1`` steps.

    ``nfe(n, options)`` is the number of denoiser evaluations per output row (a call on ``K`` rows per
    output row, as TDS's ``K`` particles make, counts ``K``), ``vjp(n, options)`` the backward passes
    through the denoiser per output row; ``options`` are the solver's keyword options with defaults
    filled in. ``scorekit.inverse.nfe`` / ``vjps`` read them (the same pattern as
    ``scorekit.samplers.common.sampler``).
    """

    def mark(fn: Callable) -> Callable:
        fn.nfe_formula, fn.vjp_formula = nfe, vjp
        return fn

    return mark


def check_problem(
    solver: str,
    y: Tensor,
    operator: Operator,
    x: Tensor,
    sigma_y: float,
    *,
    linear: bool = True,
    svd: bool = False,
) -> float:
    """Validate a posterior sampler's inputs; return ``sigma_y`` as a float. One-line errors."""
    if not isinstance(operator, Operator):
        raise TypeError(
            f"operator must be a scorekit.inverse Operator; got {type(operator).__name__}"
        )
    if linear and not operator.linear:
        raise ValueError(f"{solver} needs a linear operator; got non-linear {operator!r}")
    if svd and not operator.has_svd:
        raise ValueError(
            f"{solver} needs an operator with an SVD; got {operator!r} (has_svd = False); allowed: "
            "Identity, Mask, Matrix, Downsample, point-symmetric Blur, or Matrix(as_matrix(op))"
        )
    if not isinstance(x, Tensor) or tuple(x.shape[1:]) != operator.in_shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"x must have shape [B, *{list(operator.in_shape)}] for {operator!r}; got {got}"
        )
    want = (x.shape[0], *operator.out_shape)
    if not isinstance(y, Tensor) or tuple(y.shape) != want:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"y must have the operator's output shape [B, ...] = {list(want)}; got {got}"
        )
    if not torch.isfinite(y).all():
        raise ValueError("y must be finite; got NaN or inf")
    if isinstance(sigma_y, Tensor) and sigma_y.numel() == 1:
        sigma_y = float(sigma_y)
    ok = isinstance(sigma_y, (int, float)) and not isinstance(sigma_y, bool)
    if not (ok and math.isfinite(sigma_y) and sigma_y >= 0):
        raise ValueError(f"sigma_y must be a finite number >= 0; got {sigma_y!r}")
    return float(sigma_y)


def check_option(name: str, value: float, low: float, high: float = math.inf) -> None:
    """Raise unless ``low <= value <= high`` (a finite real number)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}]; got {value!r}")


def ddim_step(
    d: Tensor, x: Tensor, s0: float, s1: float, eta: float, noise: Tensor | None
) -> Tensor:
    """``d + sqrt(s1^2 - c^2) (x - d)/s0 + c z`` with ``c = eta s1 sqrt(1 - s1^2/s0^2)`` (module doc)."""
    c = eta * s1 * math.sqrt(max(0.0, 1.0 - (s1 / s0) ** 2))
    out = d + (math.sqrt(max(0.0, s1 * s1 - c * c)) / s0) * (x - d)
    return out if c == 0 else out + c * noise


def cg(matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int) -> Tensor:
    """``iters`` conjugate-gradient iterations for ``M v = b`` from ``v = 0``, row by row.

    ``M`` must be symmetric positive semi-definite per row (``matvec`` maps ``[B, ...]`` to ``[B, ...]``,
    rows independent). A row whose residual is exactly 0 stops moving (no 0/0). Exactly ``iters``
    calls of ``matvec``.

    References:
        Hestenes & Stiefel, "Methods of Conjugate Gradients for Solving Linear Systems", 1952.
    """
    v = torch.zeros_like(b)
    r, p = b, b
    rr = r.flatten(1).square().sum(1)
    for _ in range(iters):
        mp = matvec(p)
        pmp = (p * mp).flatten(1).sum(1)
        alpha = torch.where(pmp > 0, rr / pmp.clamp(min=torch.finfo(b.dtype).tiny), 0.0)
        v = v + append_dims(alpha, b.ndim) * p
        r = r - append_dims(alpha, b.ndim) * mp
        rr_new = r.flatten(1).square().sum(1)
        beta = torch.where(rr > 0, rr_new / rr.clamp(min=torch.finfo(b.dtype).tiny), 0.0)
        p = r + append_dims(beta, b.ndim) * p
        rr = rr_new
    return v


def gram_solve(op: Operator, b: Tensor, r2: float, sy2: float, *, iters: int = 50) -> Tensor:
    """``(r2 A A^T + sy2 I)^+ b`` for ``b`` ``[B, *out_shape]`` (pseudo-inverse where singular).

    By the SVD when ``op.has_svd`` (exact), else by ``iters`` conjugate-gradient iterations on
    ``forward``/``adjoint`` (no network calls).
    """
    if op.has_svd:
        s2 = op.singular_values.to(b).square()
        den = r2 * s2 + sy2
        inv = torch.where(den > 0, 1.0 / den.clamp(min=torch.finfo(b.dtype).tiny), 0.0)
        ub = op.svd_ut(b)
        out = op.svd_u(ub * inv)
        if sy2 > 0:  # the part of b off the range of U
            out = out + (b - op.svd_u(ub)) / sy2
        return out
    return cg(lambda v: r2 * op.forward(op.adjoint(v)) + sy2 * v, b, iters)


def vjp(out: Tensor, x: Tensor, v: Tensor, *, retain: bool = True) -> Tensor:
    """``(d out / d x)^T v`` by one backward pass (``x`` requires grad, ``out`` depends on it)."""
    (g,) = torch.autograd.grad(out, x, grad_outputs=v, retain_graph=retain)
    return g


def spectral_measurement(op: Operator, y: Tensor, sy: float) -> tuple[Tensor, Tensor, Tensor]:
    """The measurement in the operator's spectral basis: ``yb = (U^T y) / s`` ``[B, d]`` (0 off the
    observed set), per-coordinate noise ``sigma_y / s`` ``[d]`` (inf off it) and the observed-set mask
    ``[d]`` (``s_j > 1e-10 max s``), so that ``yb_j = (V^T x0)_j + (sigma_y / s_j) n_j`` there."""
    s, d = op.singular_values.to(y), op.in_dim
    full = torch.zeros(d, dtype=y.dtype, device=y.device)
    full[: len(s)] = s
    observed = full > 1e-10 * float(full.max().clamp(min=1e-300))
    inv = torch.where(observed, 1.0 / torch.where(observed, full, 1.0), 0.0)
    ub = torch.zeros(y.shape[0], d, dtype=y.dtype, device=y.device)
    ub[:, : len(s)] = op.svd_ut(y)
    sb = torch.where(observed, sy * inv, math.inf)
    return ub * inv, sb, observed


def watch(x: Tensor, i: int, first: Tensor | None) -> Tensor:
    """The first step ``i`` at which the state ``x`` (entering step ``i``) held NaN or inf, as a 0-d
    tensor on ``x``'s device (-1: none yet); no host synchronisation, so it can run every step."""
    if first is None:
        first = torch.full((), -1, dtype=torch.long, device=x.device)
    bad = ~torch.isfinite(x).all()
    return torch.where((first < 0) & bad, torch.full_like(first, i), first)


def finish_watched(x: Tensor, first: Tensor | None, sigmas: list[float], solver: str) -> Tensor:
    """``finish(x)``, but first raise naming the step where the state stopped being finite (one sync)."""
    if first is not None and int(first) >= 0:
        i = int(first)
        where = "the starting state x" if i == 0 else f"the state after step {i - 1}"
        raise FloatingPointError(
            f"{solver}: {where} (at sigma = {sigmas[i]:.4g}) holds NaN or inf; a step diverged "
            "(allowed: finite states; try more steps or a smaller step-size option)"
        )
    return finish(x)
