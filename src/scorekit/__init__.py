"""scorekit: score-based generative modelling in one frame, ``x = x0 + sigma * noise``.

A model is a denoiser ``D(x, sigma) ~ E[x0 | x]``; samplers, guidance, inverse solvers and
likelihoods are written once in that frame. See DESIGN.md for the contracts.

``import scorekit`` is light: the submodules (``scorekit.samplers``, ``scorekit.analytic``, ...) and
``scorekit.sample`` load on first access, as scipy's do.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: The public submodules, loaded on first attribute access.
SUBMODULES = (
    "analytic",
    "bench",
    "cli",
    "data",
    "denoiser",
    "guidance",
    "inverse",
    "likelihood",
    "metrics",
    "models",
    "nets",
    "pfode",
    "process",
    "runs",
    "samplers",
    "schedules",
    "threads",
    "train",
)

__all__ = ["SUBMODULES", "__version__", "sample", *SUBMODULES]


def __getattr__(name: str):
    if name == "sample":  # lives with the samplers
        return importlib.import_module("scorekit.samplers").sample
    if name in SUBMODULES:
        return importlib.import_module(f"scorekit.{name}")
    raise AttributeError(f"module 'scorekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
