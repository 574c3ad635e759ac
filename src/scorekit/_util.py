"""Small helpers shared by every layer: broadcasting, sigma validation, the ODE drift.

Everything here works in the sigma frame of DESIGN.md: ``x = x0 + sigma * noise``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["append_dims", "as_sigma", "check_finite", "to_d"]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so ``v`` of shape ``[B]`` broadcasts against rank ``ndim``.

    Works for any rank (2-D tabular data and 4-D images alike), unlike ``v[:, None, None, None]``.
    """
    missing = ndim - v.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of rank {v.ndim} to rank {ndim}")
    return v.reshape(*v.shape, *([1] * missing))


def as_sigma(sigma: Tensor | float, x: Tensor, *, name: str = "sigma") -> Tensor:
    """Return ``sigma`` as a float tensor of shape ``[B]`` on ``x``'s device and dtype, validated.

    Accepts a Python number, a 0-d tensor (broadcast to the batch) or a ``[B]`` tensor.

    Raises:
        ValueError: if the shape does not match ``x``'s batch, or a value is negative or NaN.
    """
    if x.ndim < 1:
        raise ValueError(f"x must have a batch dimension, got a tensor of shape {tuple(x.shape)}")
    batch = x.shape[0]
    if not isinstance(sigma, Tensor):
        if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool):
            raise TypeError(f"{name} must be a number or a tensor, got {type(sigma).__name__}")
        sigma = torch.full((batch,), float(sigma), device=x.device, dtype=x.dtype)
    else:
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        elif sigma.shape != (batch,):
            raise ValueError(
                f"{name} must be a scalar or have shape [B] = [{batch}] to match x of shape "
                f"{tuple(x.shape)}; got shape {tuple(sigma.shape)}"
            )
    if torch.isnan(sigma).any():
        raise ValueError(f"{name} contains NaN; allowed: values >= 0")
    if (sigma < 0).any():
        raise ValueError(f"{name} must be >= 0; got min {sigma.min().item():.4g}")
    return sigma


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE drift ``dx/dsigma = (x - D(x, sigma)) / sigma``; ``sigma`` is ``[B]``."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def check_finite(t: Tensor, what: str) -> Tensor:
    """Raise a clear error if ``t`` holds NaN or inf, instead of letting it spread silently."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten()
        raise FloatingPointError(
            f"{what} is not finite (NaN or inf) for batch rows {bad[:10].tolist()}"
            + (" ..." if bad.numel() > 10 else "")
        )
    return t


LOG_2PI = math.log(2 * math.pi)
