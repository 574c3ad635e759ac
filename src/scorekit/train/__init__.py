"""Training: denoising losses in the sigma frame, the loop (EMA, checkpoints, exact resume, DDP).

    from scorekit.train import TrainConfig, train
    result = train(TrainConfig(data="ring", out="runs/ring", steps=2000))
    # then, to sample: scorekit.runs.load_run("runs/ring") (inference is a layer above training)

Modules: ``loss`` (weighted DSM, flow matching, label dropout), ``loop`` (``train``), ``ema``,
``checkpoint`` (atomic, manifest-last, safetensors + JSON), ``distributed`` (torchrun / DDP),
``preview`` (the sample pictures drawn during training, and the sampling range of a trained model),
``quality`` (digits classifier, FD-digits), ``plots`` (PNG grids, scatters, loss curves).
Loading a run and sampling from it is inference: ``scorekit.runs``.
"""

from __future__ import annotations

from scorekit.denoiser import build_denoiser
from scorekit.train.ema import EMA, ema_beta
from scorekit.train.loop import DataOrder, TrainConfig, TrainResult, train
from scorekit.train.loss import (
    WEIGHTINGS,
    default_weighting,
    denoising_loss,
    drop_labels,
    flow_matching_loss,
    get_weighting,
)

__all__ = [
    "EMA",
    "WEIGHTINGS",
    "DataOrder",
    "TrainConfig",
    "TrainResult",
    "build_denoiser",
    "default_weighting",
    "denoising_loss",
    "drop_labels",
    "ema_beta",
    "flow_matching_loss",
    "get_weighting",
    "train",
]

# Names that moved to scorekit.runs (inference sits above training; train must not import it).
_MOVED = ("load_run", "generate", "draw", "decode", "sigma_range")


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"scorekit.train.{name} moved to scorekit.runs.{name}")
    raise AttributeError(f"module 'scorekit.train' has no attribute {name!r}")
