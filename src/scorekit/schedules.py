"""Sigma schedules: functions returning a decreasing ``sigmas`` tensor ``[n + 1]`` that ends in 0.

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022,
    eq. 5 (the rho schedule).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SCHEDULES", "get_schedule", "karras", "loglinear"]


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1; got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    *,
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, then 0.

    Returns ``n + 1`` entries: ``n`` decreasing positive sigmas from ``sigma_max`` to ``sigma_min``,
    then 0. With ``n = 1`` the single positive entry is ``sigma_max``.
    """
    _check_range(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).to(dtype=dtype, device=device)


def loglinear(
    n: int, sigma_min: float, sigma_max: float, *, dtype=torch.float64, device=None
) -> Tensor:
    """``n`` sigmas uniform in ``log sigma`` (uniform log-SNR) from ``sigma_max`` to ``sigma_min``, then 0."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    log_s = torch.lerp(
        torch.tensor(sigma_max, dtype=torch.float64).log(),
        torch.tensor(sigma_min, dtype=torch.float64).log(),
        ramp,
    )
    return _append_zero(log_s.exp()).to(dtype=dtype, device=device)


#: Schedule name -> function ``(n, sigma_min, sigma_max, **options) -> sigmas [n + 1]``.
SCHEDULES = {"karras": karras, "loglinear": loglinear}


def get_schedule(name: str):
    """A schedule function by name (see ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name]
