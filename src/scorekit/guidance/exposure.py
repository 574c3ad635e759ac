"""Exposure-bias corrections: denoisers built from a denoiser (so they work with every sampler).

* ``eps_scaling``: the noise prediction divided by ``lambda`` (Ning et al. 2024),
  ``D'(x, sigma) = x - (x - D(x, sigma)) / lambda(sigma)``. Cost: the wrapped denoiser's.
* ``time_shift``: the denoiser evaluated at the noise level the sample actually has, estimated from
  its variance (Li et al. 2024), instead of the nominal one. Cost: the wrapped denoiser's.

References:
    Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024, Sec. 5 (Epsilon
    Scaling, eq. 13-14). Li et al., "Alleviating Exposure Bias in Diffusion Models through Sampling
    with Shifted Time Steps", ICLR 2024, Sec. 4 (Alg. 1: time-shift sampler).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, as_sigma

__all__ = ["eps_scaling", "time_shift"]


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
