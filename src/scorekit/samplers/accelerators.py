"""Accelerators that wrap any sampler or denoiser: analytic teleport, exposure-bias corrections.

* ``teleport`` / ``with_teleport``: replace the high-noise part of a sampler by the exact PF-ODE flow
  of the data's Gaussian approximation ``N(m, U diag(lam) U^T)`` (Wang & Vastola 2024). In the sigma
  frame the flow from ``sigma0`` to ``sigma`` is linear and closed-form,

      x(sigma) = m + U diag(sqrt((lam + sigma^2) / (lam + sigma0^2))) U^T (x(sigma0) - m),

  so the denoiser calls a sampler would spend above ``sigma`` are saved. At high noise every data
  distribution's score is close to its Gaussian approximation's, so the error made is small.
* ``eps_scaling``: a denoiser from a denoiser whose noise prediction is divided by ``lambda``
  (Ning et al. 2024), ``D'(x, sigma) = x - (x - D(x, sigma)) / lambda(sigma)``.
* ``time_shift``: a denoiser from a denoiser evaluated at the noise level the sample actually has,
  estimated from its variance (Li et al. 2024), instead of the nominal one.

References:
    Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion
    Models and its Applications", TMLR 2024, Sec. 4 (analytic teleportation), eq. 9.
    Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024, Sec. 5 (Epsilon
    Scaling, eq. 13-14). Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling
    with Shifted Time Steps", ICLR 2024, Sec. 4 (Alg. 1: time-shift sampler).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma
from scorekit.samplers.registry import REGISTRY, get_sampler
from scorekit.samplers.registry import nfe as nfe_of

__all__ = ["GaussianFlow", "eps_scaling", "teleport", "time_shift", "with_teleport"]


class GaussianFlow:
    """The exact probability-flow ODE of ``N(mean, cov)`` in the sigma frame (final: no subclassing).

    Build it once from the data's Gaussian approximation (``scorekit.analytic.gaussian_approximation``
    gives one from data rows) and call ``flow(x, sigma_from, sigma_to)``.

    Args:
        mean: ``[d]``.
        cov: ``[d, d]`` symmetric positive semi-definite, or ``[d]`` diagonal variances.
    """

    def __init__(self, mean: Tensor, cov: Tensor):
        mean = torch.as_tensor(mean)
        if not mean.is_floating_point() or mean.ndim != 1:
            raise ValueError(
                f"mean must be a floating tensor of shape [d]; got {tuple(mean.shape)}"
            )
        d = mean.shape[0]
        cov = torch.as_tensor(cov, dtype=mean.dtype, device=mean.device)
        if cov.shape == (d,):
            evals, evecs = cov, None
        elif cov.shape == (d, d):
            if not torch.allclose(cov, cov.mT, rtol=1e-6, atol=1e-9):
                raise ValueError("cov must be symmetric")
            evals, evecs = torch.linalg.eigh(cov)
        else:
            raise ValueError(
                f"cov must have shape [d, d] or [d] with d = {d}; got {tuple(cov.shape)}"
            )
        if (evals < -1e-9 * evals.abs().max()).any():
            raise ValueError(
                f"cov must be positive semi-definite; smallest eigenvalue {evals.min():.3g}"
            )
        self.mean, self.evals, self.evecs, self.dim = mean, evals.clamp(min=0), evecs, d

    @classmethod
    def from_mixture(cls, mixture) -> GaussianFlow:
        """The Gaussian with a ``GaussianMixture``'s mean and covariance (its Gaussian approximation)."""
        return cls(mixture.mean, mixture.covariance)

    def __call__(self, x: Tensor, sigma_from, sigma_to) -> Tensor:
        """``x(sigma_to)`` from ``x(sigma_from)``, ``x`` ``[B, ...]`` with ``d`` values per row.

        ``sigma_from``, ``sigma_to``: numbers or ``[B]`` tensors, ``>= 0``; either direction works (the
        flow is invertible). Computed in the Gaussian's dtype, returned in ``x``'s.
        """
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} values per row; got shape {tuple(x.shape)}")
        y = flat.to(self.mean.dtype) - self.mean
        s0 = as_sigma(sigma_from, y, name="sigma_from")
        s1 = as_sigma(sigma_to, y, name="sigma_to")
        lam = self.evals
        scale = ((lam + append_dims(s1, 2) ** 2) / (lam + append_dims(s0, 2) ** 2)).sqrt()  # [B, d]
        if self.evecs is None:
            out = self.mean + scale * y
        else:
            out = self.mean + ((y @ self.evecs) * scale) @ self.evecs.mT
        return out.reshape(x.shape).to(x.dtype)



def teleport(gaussian: GaussianFlow, x: Tensor, sigma_from, sigma_to) -> Tensor:
    """Move ``x`` from ``sigma_from`` to ``sigma_to`` along the Gaussian approximation's exact PF-ODE.

    ``x(sigma) = m + U diag(sqrt((lam + sigma^2)/(lam + sigma0^2))) U^T (x(sigma0) - m)``
    (Wang & Vastola 2024, eq. 9, in the sigma frame). No denoiser calls.
    """
    return gaussian(x, sigma_from, sigma_to)


def with_teleport(sampler: Callable | str, gaussian: GaussianFlow) -> Callable:
    """A sampler that teleports analytically over its first interval, then runs ``sampler``.

    The wrapped sampler takes the usual ``(denoiser, x, sigmas, **options)`` with ``x`` at
    ``sigmas[0]``; it moves ``x`` to ``sigmas[1]`` with the Gaussian approximation's exact flow (no
    denoiser call) and runs ``sampler`` on ``sigmas[1:]``. So a schedule
    ``[sigma_max, sigma_t, ..., 0]`` costs the denoiser calls of ``sampler`` on ``[sigma_t, ..., 0]``,
    and ``samplers.optimized`` applied to the wrapped sampler also chooses where to teleport to.

    Args:
        sampler: a sampler function or a name in ``scorekit.samplers.REGISTRY``.
        gaussian: the data's Gaussian approximation as a ``GaussianFlow``.

    Returns:
        The wrapped sampler; its ``nfe(sigmas, **options)`` attribute counts its denoiser calls.
    """
    if isinstance(sampler, str):
        name, fn = sampler, get_sampler(sampler)
    elif callable(sampler):
        fn = sampler
        name = next((k for k, v in REGISTRY.items() if v is sampler), None)
    else:
        raise TypeError(f"sampler must be a function or a name; got {type(sampler).__name__}")
    if not isinstance(gaussian, GaussianFlow):
        raise TypeError(f"gaussian must be a GaussianFlow; got {type(gaussian).__name__}")

    @functools.wraps(fn)
    def teleported(denoiser, x, sigmas, **options):
        if len(sigmas) < 3:
            raise ValueError(
                f"sigmas needs at least 3 entries (sigma_max, the sigma to teleport to, ..., 0); "
                f"got {len(sigmas)}"
            )
        s0, s1 = sigmas[0], sigmas[1]  # kept as given: tensors carry gradients to the teleport
        f0, f1 = (float(v.detach()) if isinstance(v, Tensor) else float(v) for v in (s0, s1))
        if not f0 > f1 > 0:
            raise ValueError(f"need sigmas[0] > sigmas[1] > 0 to teleport; got {f0}, {f1}")
        return fn(denoiser, gaussian(x, s0, s1), sigmas[1:], **options)

    def nfe(sigmas, **options) -> int:
        if name is None:
            raise ValueError("nfe is known only for samplers from scorekit.samplers.REGISTRY")
        return nfe_of(name, sigmas[1:], **options)

    teleported.nfe = nfe
    # A registered sampler's formula on one step fewer; a user's function has no known count.
    formula = None if name is None else REGISTRY[name].nfe_formula
    teleported.nfe_formula = None if formula is None else lambda n, o: formula(n - 1, o)
    teleported.__name__ = f"teleport_{getattr(fn, '__name__', 'sampler')}"
    return teleported


def eps_scaling(denoiser: Callable, lam: float | Callable[[Tensor], Tensor]) -> Callable:
    """Epsilon scaling: the denoiser whose noise prediction is divided by ``lambda``.

    ``eps' = eps / lambda`` with ``eps = (x - D) / sigma``, i.e. ``D'(x, sigma) = x - (x - D) / lambda``.
    ``lambda`` slightly above 1 (Ning et al. use ``lambda_t = k t + b``, ``b ~ 1.0..1.005``) shrinks
    the predicted noise to counter exposure bias of a *trained* network; with an exact denoiser there
    is no exposure bias and ``lambda = 1`` (the identity) is optimal.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> x0_hat``.
        lam: a number ``> 0`` or a function ``sigma [B] -> lambda [B]``.

    References:
        Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024, eq. 13-14.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable; got {type(denoiser).__name__}")
    if not callable(lam):
        lam_f = float(lam)
        if not lam_f > 0:
            raise ValueError(f"lam must be > 0; got {lam}")

    def scaled(x: Tensor, sigma: Tensor, **cond) -> Tensor:
        d = denoiser(x, sigma, **cond)
        if callable(lam):
            lam_b = as_sigma(lam(sigma), x, name="lam(sigma)")
            if (lam_b == 0).any():
                raise ValueError("lam(sigma) must be > 0")
            return x - (x - d) / append_dims(lam_b, x.ndim)
        return x - (x - d) / lam_f

    return scaled


def time_shift(
    denoiser: Callable,
    *,
    data_var: float,
    max_shift: float = 0.1,
) -> Callable:
    """Time-shift sampling: evaluate the denoiser at the noise level the sample actually shows.

    For a row ``x`` with ``d`` coordinates of data variance ``data_var`` at nominal noise ``sigma``, the
    per-row variance over coordinates estimates ``data_var + sigma_hat^2``; the wrapped denoiser is
    called at ``sigma' = clamp(sigma_hat, (1 - max_shift) sigma, sigma)``, never above the nominal level
    (Li et al. shift only to earlier, less noisy, time steps, within a window). It applies where rows have
    many coordinates whose mean variance is known (images, normalised to ``data_var``); for low-
    dimensional rows the estimate is noise and ``max_shift`` should be 0.

    In the sigma frame the shift changes only the noise level the model sees; the sampler's step
    (from ``sigma`` to the next level) is unchanged, as in the paper's Alg. 1.

    References:
        Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time
        Steps", ICLR 2024, Sec. 4 and Alg. 1.
    """
    if not data_var > 0:
        raise ValueError(f"data_var must be > 0; got {data_var}")
    if not 0 <= max_shift < 1:
        raise ValueError(f"max_shift must be in [0, 1); got {max_shift}")

    def shifted(x: Tensor, sigma: Tensor, **cond) -> Tensor:
        s = as_sigma(sigma, x)
        flat = x.reshape(x.shape[0], -1)
        var = flat.var(dim=1, unbiased=True)
        s_hat = (var - data_var).clamp(min=0).sqrt()
        s_eval = torch.minimum(torch.maximum(s_hat, (1 - max_shift) * s), s)
        return denoiser(x, s_eval, **cond)

    return shifted
