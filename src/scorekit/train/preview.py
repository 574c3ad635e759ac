"""The training run's sample preview, and the noise range sampling from a trained model uses.

A model trained on a process has seen noise levels in ``[sigma_min, sigma_max]`` of that process;
``sampling_range`` narrows it to where sampling spends its steps well (see its docstring). Both the
training loop's preview pictures and ``scorekit.runs.draw`` sample over this range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from scorekit.denoiser import build_denoiser
from scorekit.process import get_process
from scorekit.samplers import sample
from scorekit.train.plots import save_samples

__all__ = ["sampling_range", "save_preview"]


def sampling_range(process: str, sigma_data: float) -> tuple[float, float]:
    """``(sigma_lo, sigma_hi)``: the process's trained range, narrowed for sampling.

    ``sigma_lo = max(sigma_min, 2e-3)``: below it the last step changes nothing visible and costs
    accuracy. ``sigma_hi = min(sigma_max, 80, 20 sigma_data)``: the prior ``N(0, sigma_max^2 I)``
    differs from the noised data's marginal by a relative variance of ``(sd / sigma_max)^2``, 0.25% at
    20 sd; starting higher spends steps on nothing (EDM's 80 is 160 sd for images of sd 0.5), which at
    NFE 10 costs visible accuracy.
    """
    p = get_process(process)
    return max(float(p.sigma_min), 2e-3), min(float(p.sigma_max), 80.0, 20.0 * float(sigma_data))


def save_preview(
    net: nn.Module,
    info: dict[str, Any],
    path: str | Path,
    *,
    process: str,
    param: str,
    n: int,
    nfe: int,
    sampler: str,
    device: torch.device,
) -> None:
    """Draw ``n`` samples (seed 0, Karras schedule over ``sampling_range``) from the raw network
    ``net`` and save them as a grid or scatter (``plots.save_samples``); the global RNG is untouched."""
    denoiser = build_denoiser(net, process=process, param=param, sigma_data=info["sigma_data"])
    lo, hi = sampling_range(process, info["sigma_data"])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        x = sample(
            denoiser, (n, *info["shape"]), nfe=nfe, sampler=sampler, schedule="karras",
            sigma_min=lo, sigma_max=hi, seed=0, device=device,
        )  # fmt: skip
    path = Path(path)
    save_samples(path, x, info, title=f"step {path.stem[5:].lstrip('0') or 0}")
