"""Accelerators that wrap any sampler: the analytic teleport start.

* ``teleport`` / ``with_teleport``: replace the high-noise part of a sampler by the exact PF-ODE flow
  of the data's Gaussian approximation ``N(m, U diag(lam) U^T)`` (Wang & Vastola 2024). In the sigma
  frame the flow from ``sigma0`` to ``sigma`` is linear and closed-form,

      x(sigma) = m + U diag(sqrt((lam + sigma^2) / (lam + sigma0^2))) U^T (x(sigma0) - m),

  so the denoiser calls a sampler would spend above ``sigma`` are saved. At high noise every data
  distribution's score is close to its Gaussian approximation's, so the error made is small.

The exposure-bias corrections ``eps_scaling`` and ``time_shift`` are denoisers built from denoisers,
so they live in ``scorekit.guidance.exposure``.

References:
    Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion
    Models and its Applications", TMLR 2024, Sec. 4 (analytic teleportation), eq. 9.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma
from scorekit.samplers.registry import REGISTRY, get_sampler
from scorekit.samplers.registry import nfe as nfe_of

__all__ = ["GaussianFlow", "teleport", "with_teleport"]


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
