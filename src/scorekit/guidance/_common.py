"""Checks shared by the guidance rules: one-line errors naming the argument, what was given and what
is allowed, and the checked call of a denoiser that is one of several."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from scorekit._util import check_number
from scorekit.samplers.common import PresetNoise

Denoiser = Callable[..., Tensor]


def check_scale(scale: Any, name: str = "scale") -> float:
    """A guidance scale: a finite number ``>= 0`` (0: unconditional, 1: conditional)."""
    return check_number(name, scale, low=0)


def check_denoiser(name: str, d: Any) -> Denoiser:
    if not callable(d):
        raise TypeError(f"{name} must be a denoiser D(x, sigma) -> x0_hat; got {type(d).__name__}")
    return d


def check_interval(interval: Any) -> tuple[float, float] | None:
    """``None`` or ``(lo, hi)`` with ``0 <= lo < hi <= inf``: guidance applies for ``lo < sigma <= hi``."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"interval must be None or a pair (sigma_lo, sigma_hi) of numbers; got {interval!r}"
        ) from None
    if math.isnan(lo) or math.isnan(hi) or lo < 0 or math.isinf(lo) or not hi > lo:
        raise ValueError(
            f"interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi <= inf; got {interval!r}"
        )
    return lo, hi


def call(name: str, d: Denoiser, x: Tensor, sigma: Tensor, **cond) -> Tensor:
    """``d(x, sigma, **cond)``, or a one-line error if it does not return a tensor of ``x``'s shape."""
    out = d(x, sigma, **cond)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{name} must return a tensor of x's shape {tuple(x.shape)}; got {got}")
    return out


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row inner product ``<a_i, b_i>`` over all non-batch dimensions, ``[B]``."""
    return (a * b).flatten(1).sum(1)


def refuse_preset_noise(generator: Any, rule: str) -> None:
    """Rules that draw uniforms too (resampling, picking candidates) cannot take a ``PresetNoise``
    which hands out normal draws only: a one-line error at once."""
    if isinstance(generator, PresetNoise):
        raise TypeError(
            f"generator: a PresetNoise hands out normal draws only; {rule} also draws uniforms; "
            "allowed: None, a torch.Generator or one per row"
        )
