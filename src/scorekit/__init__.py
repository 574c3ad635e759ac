"""scorekit: score-based generative modelling in one frame, ``x = x0 + sigma * noise``.

A model is a denoiser ``D(x, sigma) ~ E[x0 | x]``; samplers, guidance, inverse solvers and
likelihoods are written once in that frame. See DESIGN.md for the contracts.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "sample"]


def __getattr__(name: str):
    # ``scorekit.sample`` lives with the samplers; import lazily to keep ``import scorekit`` light.
    if name == "sample":
        from scorekit.samplers import sample

        return sample
    raise AttributeError(f"module 'scorekit' has no attribute {name!r}")
