"""Discrete data: uniform dequantisation and bits per dimension.

Data on a grid of integer levels ``k in {0, ..., bins - 1}^d`` (pixel values) have probabilities,
not densities. A continuous model of the dequantised variable ``x~ = k + u`` with
``u ~ U[-1/2, 1/2)^d`` defines a discrete model ``P(k) = int_{bin(k)} p(x~) dx~`` over unit bins,
and by Jensen (Theis et al. 2016, eq. 8; Ho et al. 2019, Section 3.1)::

    log P(k) >= E_u[ log p_X~(k + u) ].

The model works in normalised units ``y = (x~ - shift) / scale`` (per dimension or scalar), so
``p_X~(x~) = p_Y(y) |det dy/dx~| = p_Y(y) prod_i scale_i^-1`` and

    log P(k) >= E_u[ log p_Y((k + u - shift) / scale) ] - sum_i log scale_i          (nats)
    bits/dim  = -( log p_Y(y) + log|det dy/dx~| ) / (d ln 2),   log|det dy/dx~| = -sum_i log scale_i.

Bins are centred on the levels (``u`` from ``-1/2``): the bins still partition space, and a model
trained on the level values puts its mass around them, which a bin ``[k, k + 1)`` would cut in half.
``centered=False`` gives the ``[k, k + 1)`` convention of Theis et al.

Variational dequantisation (Ho et al. 2019, a learned flow ``q(u | k)``) is not implemented: it
needs a second model trained per data set, which is not cheap.

References:
    Theis, van den Oord & Bethge, "A note on the evaluation of generative models", ICLR 2016.
    Ho, Chen, Srinivas, Duan & Abbeel, "Flow++: Improving Flow-Based Generative Models with
    Variational Dequantization and Architecture Design", ICML 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["bits_per_dim", "dequantize", "dequantized_log_likelihood", "log_det_normalization"]


def dequantize(
    levels: Tensor, *, generator: torch.Generator | None = None, centered: bool = True
) -> Tensor:
    """``levels + u`` with ``u ~ U[-1/2, 1/2)`` (or ``U[0, 1)`` if not ``centered``), same shape.

    ``levels`` must hold whole numbers (any dtype); the result is floating point.
    """
    if not isinstance(levels, Tensor):
        raise TypeError(f"levels must be a torch.Tensor; got {type(levels).__name__}")
    x = levels if levels.is_floating_point() else levels.to(torch.get_default_dtype())
    if not torch.isfinite(x).all() or not (x == torch.round(x)).all():
        raise ValueError("levels must be finite whole numbers (the integer level of each value)")
    dev = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    return x + (u - 0.5 if centered else u)


def log_det_normalization(scale: Tensor | float, dim: int) -> float:
    """``log|det dy/dx~|`` for ``y = (x~ - shift) / scale``: ``-sum_i log scale_i`` over ``dim`` values."""
    scale = torch.as_tensor(scale, dtype=torch.float64)
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError(f"scale must be finite and > 0; got {scale.tolist()}")
    if scale.numel() == 1:
        return -dim * math.log(float(scale))
    if scale.numel() != dim:
        raise ValueError(f"scale must be a scalar or have {dim} values; got {scale.numel()}")
    return -float(scale.log().sum())


def bits_per_dim(log_p: Tensor, *, dim: int, log_det_jacobian: float = 0.0) -> Tensor:
    """``-(log_p + log_det_jacobian) / (dim ln 2)``: nats in the model's units to bits per dimension.

    Args:
        log_p: ``[B]`` log-densities in nats of the normalised (model-unit) points.
        dim: values per row ``d``.
        log_det_jacobian: ``log|det dy/dx~|`` of the normalisation from data units (one unit per
            level) to model units (:func:`log_det_normalization`).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1; got {dim!r}")
    return -(log_p + log_det_jacobian) / (dim * math.log(2))


def dequantized_log_likelihood(
    log_prob: Callable[[Tensor], Tensor],
    levels: Tensor,
    *,
    scale: Tensor | float,
    shift: Tensor | float,
    n_samples: int = 1,
    centered: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Lower bound on ``log P(levels)`` in nats (data units, unit bins), ``[B]``, and its std error.

    ``E_u[log p_Y((levels + u - shift) / scale)] + log|det dy/dx~|`` estimated with ``n_samples``
    dequantisation draws per row (module docstring).

    Args:
        log_prob: maps normalised points ``[B, ...]`` to log-densities ``[B]`` in nats (e.g.
            ``lambda y: log_likelihood(D, y, sigma_min=..., sigma_max=...)``).
        levels: ``[B, ...]`` integer levels.
        scale, shift: the normalisation ``y = (x~ - shift) / scale`` (scalars or per-value tensors
            broadcastable to one row).
        n_samples: dequantisation draws per row (the std error needs ``>= 2``; else zeros).
        dtype: floating dtype of the normalised points passed to ``log_prob``.

    Returns:
        ``(log P lower bound [B], standard error over the draws [B])``.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1; got {n_samples!r}")
    if levels.ndim < 2:
        raise ValueError(f"levels must have shape [B, ...]; got {tuple(levels.shape)}")
    d = levels[0].numel()
    log_det = log_det_normalization(scale, d)
    scale_t = torch.as_tensor(scale, dtype=dtype, device=levels.device)
    shift_t = torch.as_tensor(shift, dtype=dtype, device=levels.device)
    if scale_t.numel() > 1:
        scale_t = scale_t.reshape(levels.shape[1:])
    if shift_t.numel() > 1:
        shift_t = shift_t.reshape(levels.shape[1:])
    draws = []
    for _ in range(n_samples):
        x = dequantize(levels.to(dtype), generator=generator, centered=centered)
        draws.append(log_prob((x - shift_t) / scale_t) + log_det)
    draws = torch.stack(draws, 1)
    se = draws.std(1) / math.sqrt(n_samples) if n_samples > 1 else torch.zeros_like(draws[:, 0])
    return draws.mean(1), se
