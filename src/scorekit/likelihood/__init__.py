"""Likelihoods of denoisers: probability-flow ODE log-likelihood, ELBO, bits/dim, OOD detection.

Everything is in the sigma frame (``x = x0 + sigma * noise``) and takes any denoiser
``D(x, sigma) -> x0_hat``; see each submodule for the maths.
"""

from __future__ import annotations

from scorekit.likelihood.discrete import (
    bits_per_dim,
    dequantize,
    dequantized_log_likelihood,
    log_det_normalization,
)
from scorekit.likelihood.elbo import ElboInfo, elbo
from scorekit.likelihood.ode import (
    ADAPTIVE_METHODS,
    LikelihoodInfo,
    ODESolveError,
    log_likelihood,
    prior_log_prob,
)
from scorekit.likelihood.ood import OODDetector, auroc, score_norm_features

__all__ = [
    "ADAPTIVE_METHODS",
    "ElboInfo",
    "LikelihoodInfo",
    "ODESolveError",
    "OODDetector",
    "auroc",
    "bits_per_dim",
    "dequantize",
    "dequantized_log_likelihood",
    "elbo",
    "log_det_normalization",
    "log_likelihood",
    "prior_log_prob",
    "score_norm_features",
]
