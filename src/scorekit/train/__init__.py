"""Training: denoising losses in the sigma frame, the loop (EMA, checkpoints, exact resume, DDP).

    from scorekit.train import TrainConfig, train, load_run
    result = train(TrainConfig(data="ring", out="runs/ring", steps=2000))
    denoiser, info = load_run("runs/ring")        # EMA weights, eval mode; info: shape, process, ...

Modules: ``loss`` (weighted DSM, flow matching, label dropout), ``loop`` (``train``), ``ema``,
``checkpoint`` (atomic, manifest-last, safetensors + JSON), ``distributed`` (torchrun / DDP),
``run`` (load a run, draw and decode samples), ``quality`` (digits classifier, FD-digits),
``plots`` (PNG grids, scatters, loss curves).
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
from scorekit.train.run import decode, draw, generate, load_run, sigma_range

__all__ = [
    "EMA",
    "WEIGHTINGS",
    "DataOrder",
    "TrainConfig",
    "TrainResult",
    "build_denoiser",
    "decode",
    "default_weighting",
    "denoising_loss",
    "draw",
    "drop_labels",
    "ema_beta",
    "flow_matching_loss",
    "generate",
    "get_weighting",
    "load_run",
    "sigma_range",
    "train",
]
