"""Sigma schedules: functions returning a decreasing ``sigmas`` tensor ``[n + 1]`` that ends in 0.

Every schedule returns ``n`` decreasing positive sigmas from ``sigma_max`` to ``sigma_min``, then 0,
as float64 (or the ``dtype`` asked for). The fixed schedules are registered in ``SCHEDULES`` with the
signature ``(n, sigma_min, sigma_max, **options)``.

================  =================================================================================
schedule          ``sigma_i`` for ``u_i = i / (n - 1)``, ``i = 0 .. n-1``
================  =================================================================================
karras            ``(smax^(1/rho) + u_i (smin^(1/rho) - smax^(1/rho)))^rho``  (EDM eq. 5)
loglinear         ``exp(lerp(log smax, log smin, u_i))``  (uniform log-SNR)
polyexponential   ``exp(log smin + (1 - u_i)^rho (log smax - log smin))``  (rho = 1: loglinear)
uniform_t         ``process.sigma(lerp(t(smax), t(smin), u_i))``  (uniform in a process's time)
two_phase         log-uniform down to ``sigma_split``, then karras (rho) to ``smin``: dense steps
                  where a multimodal distribution's modes separate
================  =================================================================================

``spectral_band`` is a rule, not a schedule: the top and the bottom of the noise band in which a sampler
should spend its calls, read from the data's covariance spectrum (no fitting); ``sample(sampler="auto")``
lays its steps there.

``scorekit.samplers.optimized`` fits a schedule to one denoiser and sampler (it runs the sampler, so
it lives above the samplers, with ``fit_bespoke``). ``pf_ode_reference`` (from ``scorekit.pfode``) is
re-exported here for the tests and benchmarks that measure schedules against it.

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022,
    eq. 5 (the rho schedule). Sabour, Fidler & Kreis, "Align Your Steps: Optimizing Sampling Schedules
    in Diffusion Models", ICML 2024 (optimising a schedule per model and sampler). Song et al.,
    "Denoising Diffusion Implicit Models", ICLR 2021 (uniform time steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import check_int, lookup
from scorekit.pfode import pf_ode_reference
from scorekit.process import get_process

__all__ = [
    "SCHEDULES",
    "check_range",
    "get_schedule",
    "karras",
    "loglinear",
    "pf_ode_reference",
    "polyexponential",
    "spectral_band",
    "two_phase",
    "uniform_t",
]


def check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    """Validate a schedule's number of steps and its noise range (one-line errors)."""
    check_int("n (number of steps)", n)
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf; got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def ramp(n: int) -> Tensor:
    """``u_i = i / (n - 1)`` for ``i = 0 .. n-1`` (``[0.]`` when ``n = 1``), float64."""
    return torch.linspace(0, 1, n, dtype=torch.float64)


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
    check_range(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    u = ramp(n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + u * (lo - hi)) ** rho).to(dtype=dtype, device=device)


def loglinear(
    n: int, sigma_min: float, sigma_max: float, *, dtype=torch.float64, device=None
) -> Tensor:
    """``n`` sigmas uniform in ``log sigma`` (uniform log-SNR) from ``sigma_max`` to ``sigma_min``, then 0."""
    check_range(n, sigma_min, sigma_max)
    log_s = torch.lerp(
        torch.tensor(sigma_max, dtype=torch.float64).log(),
        torch.tensor(sigma_min, dtype=torch.float64).log(),
        ramp(n),
    )
    return _append_zero(log_s.exp()).to(dtype=dtype, device=device)


def polyexponential(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 1.0,
    *,
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """A power ramp in log space: ``log sigma_i = log smin + (1 - u_i)^rho (log smax - log smin)``.

    ``u_i = i / (n - 1)``. ``rho = 1`` is ``loglinear``; ``rho > 1`` takes larger log-steps at high
    noise and smaller ones near ``sigma_min``; ``rho < 1`` the opposite. Then 0 is appended.
    """
    check_range(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    log_s = lo + (1 - ramp(n)) ** rho * (hi - lo)
    return _append_zero(log_s.exp()).to(dtype=dtype, device=device)


def uniform_t(
    n: int,
    sigma_min: float,
    sigma_max: float,
    *,
    process="vp",
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """``n`` sigmas uniform in a process's own time ``t``: ``sigma_i = sigma(lerp(t(smax), t(smin), u_i))``.

    ``process`` is a ``scorekit.process.Process`` or a name from ``scorekit.process.PROCESSES``
    (``"ddpm"`` gives DDIM's uniform time steps on DDPM's linear table, continuously interpolated;
    ``"vp"`` Song et al.'s VP SDE). ``sigma_min`` and ``sigma_max`` must lie in the process's range.
    Then 0 is appended.
    """
    check_range(n, sigma_min, sigma_max)
    proc = get_process(process)
    lo, hi = proc.sigma_min, proc.sigma_max
    tol = 1e-9 * hi
    if sigma_min < lo * (1 - 1e-9) or sigma_max > hi + tol:
        raise ValueError(
            f"uniform_t: [sigma_min, sigma_max] = [{sigma_min:.6g}, {sigma_max:.6g}] must lie inside "
            f"the range of process {proc!r}"
        )
    ends = proc.t(torch.tensor([sigma_max, sigma_min], dtype=torch.float64))
    t = torch.lerp(ends[0], ends[1], ramp(n))
    sig = proc.sigma(t)
    # Pin the ends exactly (t(sigma(t)) round trips are accurate, not exact).
    sig[0] = sigma_max
    sig[-1] = sigma_min if n > 1 else sigma_max
    if not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"uniform_t: process {proc!r} gave non-decreasing sigmas for n={n}")
    return _append_zero(sig).to(dtype=dtype, device=device)


def two_phase(
    n: int,
    sigma_min: float,
    sigma_max: float,
    *,
    sigma_split: float | None = None,
    n_low: int | None = None,
    rho: float = 7.0,
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """Log-uniform steps from ``sigma_max`` down to ``sigma_split``, then a karras ramp to ``sigma_min``.

    The first ``n_high = n - n_low`` sigmas are ``sigma_max (sigma_split / sigma_max)^(i / n_high)``,
    ``i = 0 .. n_high-1`` (equal log-steps ending one step above ``sigma_split``); the last ``n_low``
    are ``karras(n_low, sigma_min, sigma_split, rho)`` (starting at ``sigma_split``); then 0.
    Defaults: ``sigma_split = sqrt(sigma_min sigma_max)`` (the middle of the log range) and
    ``n_low = round(0.3 n)`` clamped to ``[2, n - 1]``; ``n >= 3``.

    Why: on a multimodal distribution the probability-flow ODE decides which mode a sample ends in over
    a band of intermediate noise levels (for unit-scale data with well-separated modes, roughly
    sigma 40 down to 2). A sample that starts near the boundary between two basins ends in the wrong
    mode unless the solver is accurate over that whole band, and one such "flip" costs more RMS error
    than all the discretisation error below it. Both karras (rho = 7) and log-linear steps spend most
    of their budget below sigma 1, where a sample's mode is settled. This schedule puts ``n_high``
    equal log-steps across the band and a short karras ramp below it. ``sigma_max`` is where the
    sampler starts (after an analytic teleport, the sigma teleported to). Measured on the 64-D
    mixture ``gmm64`` in ``scorekit bench samplers``, where ``sigma_split`` and ``n_low`` are chosen
    on calibration noise.
    """
    check_range(n, sigma_min, sigma_max)
    if n < 3:
        raise ValueError(f"two_phase needs n >= 3 steps (two phases and a karras ramp); got n={n}")
    if sigma_split is None:
        sigma_split = math.sqrt(sigma_min * sigma_max)
    if n_low is None:
        n_low = min(n - 1, max(2, round(0.3 * n)))
    if not sigma_min < sigma_split < sigma_max:
        raise ValueError(
            f"sigma_split must lie strictly between sigma_min={sigma_min} and sigma_max={sigma_max}; "
            f"got {sigma_split}"
        )
    if isinstance(n_low, bool) or not isinstance(n_low, int) or not 2 <= n_low <= n - 1:
        raise ValueError(
            f"n_low must be an integer in [2, n - 1] = [2, {n - 1}] (the high phase needs a step and "
            f"the karras ramp must reach sigma_min); got {n_low!r}"
        )
    n_high = n - n_low
    log_hi = torch.lerp(
        torch.tensor(math.log(sigma_max), dtype=torch.float64),
        torch.tensor(math.log(sigma_split), dtype=torch.float64),
        torch.arange(n_high, dtype=torch.float64) / n_high,
    )
    low = karras(n_low, sigma_min, sigma_split, rho=rho)
    return torch.cat([log_hi.exp(), low]).to(dtype=dtype, device=device)


def spectral_band(evals, *, top: float, last: float) -> tuple[float, float]:
    """The band ``(sigma_top, sigma_last)`` of a covariance spectrum: ``top sqrt(max lam)`` and
    ``last sqrt(mean lam)``.

    ``evals`` are the eigenvalues ``lam`` of the data's covariance (``[d]``; a ``[d, d]`` covariance
    is accepted and its eigenvalues taken). Why these two numbers:

    * Above ``sigma_top`` the noised data ``p_sigma`` is close to its Gaussian approximation
      ``N(m, Sigma + sigma^2 I)``: the denoiser ``D(x, sigma) = m + Sigma (Sigma + sigma^2 I)^-1
      (x - m) + O(sigma^-4)`` is linear, and its probability-flow ODE has the closed form of
      ``samplers.accelerators.GaussianFlow`` (the teleport start). Non-Gaussian structure (modes,
      curved supports) lives at length scales at most ``sqrt(max lam)``, so it shows only once
      ``sigma`` falls to a few times that: ``top`` of 1 to 16 (chosen per NFE by the random suite).
    * The last nonzero sigma sets the final Tweedie jump ``x = D(x, sigma_last)``: too low and the
      calls above it are spread too thinly, too high and the jump's error (the ODE shrinks the
      within-mode spread by ``sqrt(v / (v + sigma^2))``, the jump by ``v / (v + sigma^2)``) dominates.
      It scales with the data, so it is a multiple of the RMS data scale ``sqrt(mean lam)``.

    Both are equivariant: scaling the data by ``a`` scales the band by ``a``.
    """
    lam = torch.as_tensor(evals, dtype=torch.float64)
    if lam.ndim == 2 and lam.shape[0] == lam.shape[1]:
        lam = torch.linalg.eigvalsh(0.5 * (lam + lam.mT))
    if lam.ndim != 1 or lam.numel() == 0 or not bool(torch.isfinite(lam).all()):
        raise ValueError(
            f"evals must be finite covariance eigenvalues [d] or a covariance [d, d]; got shape "
            f"{tuple(lam.shape)}"
        )
    if float(lam.max()) <= 0:
        raise ValueError(f"evals must have a positive largest eigenvalue; got {float(lam.max())}")
    if not (top > 0 and last > 0 and math.isfinite(top) and math.isfinite(last)):
        raise ValueError(f"top and last must be positive and finite; got top={top}, last={last}")
    lam = lam.clamp(min=0)
    hi, lo = top * math.sqrt(float(lam.max())), last * math.sqrt(float(lam.mean()))
    if not lo < hi:
        raise ValueError(
            f"spectral_band: sigma_last = {lo:.4g} (last={last} x RMS scale) must lie below "
            f"sigma_top = {hi:.4g} (top={top} x sqrt(max eigenvalue))"
        )
    return hi, lo


#: Schedule name -> function ``(n, sigma_min, sigma_max, **options) -> sigmas [n + 1]``.
SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "karras": karras,
    "loglinear": loglinear,
    "polyexponential": polyexponential,
    "uniform_t": uniform_t,
    "two_phase": two_phase,
}


def get_schedule(name: str):
    """A schedule function by name (see ``SCHEDULES``; ``samplers.optimized`` is called directly)."""
    return lookup(SCHEDULES, name, "schedule")


def __getattr__(name: str):
    # ``optimized`` runs a sampler, so it lives above the samplers (``scorekit.samplers.fitted``);
    # importing it from here would be an upward import. Say where it went instead of a bare error.
    if name == "optimized":
        raise AttributeError(
            "scorekit.schedules.optimized moved to scorekit.samplers.optimized (a fitted schedule runs "
            "a sampler, so it lives with the fitted solvers in scorekit.samplers.fitted)"
        )
    raise AttributeError(f"module 'scorekit.schedules' has no attribute {name!r}")
