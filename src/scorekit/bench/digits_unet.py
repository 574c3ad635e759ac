"""A diffusers-recipe DDPM UNet on the 8x8 digits: a real, imperfect eps-prediction network for benchmarks.

``train_ddpm_unet(out_dir, minutes=10)`` trains (for 10 CPU-minutes) a ``diffusers.UNet2DModel`` (1.6M parameters, 1 channel,
8x8, three resolutions 8-4-2 with self-attention at 4x4) the way diffusers' ``train_unconditional.py``
example trains a DDPM:

    DDPMScheduler(1000 steps, linear betas 1e-4 .. 0.02, prediction_type="epsilon")
    t ~ U{0..999},  eps ~ N(0, I),  x_t = scheduler.add_noise(x0, eps, t)
    loss = MSE(unet(x_t, t), eps),  AdamW (weight decay 1e-6),  EMA with warm-up (power 3/4)

on scikit-learn's digits scaled to [-1, 1], with a stratified held-out part (``heldout_digits``) that is
never trained on. The learning rate (1e-3, linear warm-up over 100 steps, cosine decay over the time
budget) is raised from the example's 1e-4 because the budget is minutes on one CPU thread, not hours on
a GPU. The EMA weights are saved with ``save_pretrained`` (safetensors) together with the scheduler's
config and a ``training.json`` (steps, seconds, final loss, split), into a temporary folder that is
renamed to ``out_dir`` when complete; a complete ``out_dir`` is reused as it is.

``load_ddpm_unet(dir)`` wraps the saved network with scorekit's own adapters (``DiscreteProcess`` built
from the scheduler's betas, ``EpsPred``, ``NetDenoiser``): a sigma-frame denoiser ``D(x, sigma)`` for any
scorekit sampler. Loading reads JSON and safetensors only.

References:
    Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (the recipe). von Platen et al.,
    "Diffusers: State-of-the-art diffusion models", 2022 (``UNet2DModel``, ``DDPMScheduler``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from scorekit import data as sdata
from scorekit._util import atomic_write_json
from scorekit.denoiser import EpsPred, NetDenoiser
from scorekit.process import DiscreteProcess

__all__ = ["heldout_digits", "load_ddpm_unet", "train_ddpm_unet", "training_digits"]

#: The held-out fraction of the digits and the split's seed (stratified, ``scorekit.data.split``).
HOLDOUT = 0.2
SPLIT_SEED = 0

_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
)
_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
)


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ModuleNotFoundError(
            "the digits UNet benchmark needs diffusers: pip install 'scorekit[test]'",
            name="diffusers",
        ) from None
    return diffusers


def training_digits() -> Tensor:
    """The digits the UNet trains on, ``[N, 1, 8, 8]`` in [-1, 1] (the complement of ``heldout_digits``)."""
    return sdata.split(sdata.load("digits"), holdout=HOLDOUT, seed=SPLIT_SEED)[0].x


def heldout_digits() -> Tensor:
    """The held-out digits (20 %, stratified), ``[N, 1, 8, 8]`` in [-1, 1]; never trained on."""
    return sdata.split(sdata.load("digits"), holdout=HOLDOUT, seed=SPLIT_SEED)[1].x


def _complete(path: Path) -> bool:
    return (path / "training.json").is_file() and (path / "unet").is_dir()


def train_ddpm_unet(
    out_dir: str | os.PathLike,
    *,
    minutes: float = 10.0,
    seed: int = 0,
    threads: int = 1,
    batch: int = 64,
    progress: bool = True,
) -> Path:
    """Train the digits UNet for ``minutes`` of CPU time into ``out_dir`` (reused if complete).

    The budget is this process's CPU time (``time.process_time``), not wall time, so the network is
    about the same on a busy machine as on an idle one (with ``threads=1``: CPU-minutes of one core).

    Args:
        out_dir: the folder to create; a complete one (``training.json`` present) is returned unchanged.
        minutes: training budget in CPU minutes of this process (> 0).
        seed: seeds the initial weights, the batches, the noise and the time steps.
        threads: torch CPU threads while training (restored afterwards).
        batch: examples per step.

    Returns:
        ``out_dir`` as a Path, holding ``unet/`` (EMA weights), ``scheduler/`` and ``training.json``.
    """
    out = Path(out_dir)
    if _complete(out):
        return out
    if not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    if out.exists():
        raise ValueError(f"{out} exists but is not a complete digits-UNet folder; remove it first")
    diffusers = _diffusers()
    from diffusers.training_utils import EMAModel

    out.parent.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        torch.manual_seed(seed)
        unet = diffusers.UNet2DModel(**_UNET)
        sched = diffusers.DDPMScheduler(**_SCHEDULER)
        ema = EMAModel(
            unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75
        )
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-6)
        x_all = training_digits()
        g = torch.Generator().manual_seed(seed)
        budget, start, step, losses = minutes * 60.0, time.process_time(), 0, []
        wall = time.perf_counter()
        while (elapsed := time.process_time() - start) < budget:
            warm = min(1.0, (step + 1) / 100)
            for group in opt.param_groups:
                group["lr"] = 1e-3 * warm * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            x0 = x_all[torch.randint(0, len(x_all), (batch,), generator=g)]
            eps = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, _SCHEDULER["num_train_timesteps"], (batch,), generator=g)
            loss = nn.functional.mse_loss(unet(sched.add_noise(x0, eps, t), t).sample, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.step(unet.parameters())
            losses.append(float(loss.detach()))
            step += 1
            if progress and step % 200 == 0:
                print(f"digits-unet step {step} loss {sum(losses[-200:]) / 200:.4f} "
                      f"{elapsed / 60:.1f}/{minutes:g} min", flush=True)  # fmt: skip
        ema.copy_to(unet.parameters())
        unet.save_pretrained(tmp / "unet")
        sched.save_pretrained(tmp / "scheduler")
        info = {
            "steps": step,
            "cpu_seconds": round(time.process_time() - start, 1),
            "wall_seconds": round(time.perf_counter() - wall, 1),
            "batch": batch,
            "seed": seed,
            "threads": int(threads),
            "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
            "parameters": sum(p.numel() for p in unet.parameters()),
            "holdout": HOLDOUT,
            "split_seed": SPLIT_SEED,
        }
        atomic_write_json(tmp / "training.json", info)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(old_threads)
    return out


class _UNetEps(nn.Module):
    """``F(x_t, t)``: the UNet's eps prediction, the raw network that ``NetDenoiser`` expects."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.unet(x_t, t).sample


def load_ddpm_unet(path: str | os.PathLike, *, sigma_data: float | None = 0.5) -> NetDenoiser:
    """The sigma-frame denoiser of a folder written by ``train_ddpm_unet`` (eval mode, float32, CPU).

    The process is ``DiscreteProcess`` on the scheduler's linear betas; the adapter is ``EpsPred``
    (``D = x - sigma F(alpha x, t(sigma))``, with ``t`` continuous between the table's steps).
    ``sigma_data`` is the data scale it declares (``scorekit.denoiser.data_scale``): 0.5, what
    ``scorekit.models.from_diffusers`` declares for diffusers' pixel models, so ``scorekit.sample``
    starts it at sigma 10 as it would the same UNet loaded by ``from_diffusers`` (which also clips
    the x0 estimate as its scheduler config says; this loader does not); ``None`` declares none
    (sigma_max 80).
    """
    path = Path(path)
    if not _complete(path):
        raise ValueError(
            f"{path} is not a folder written by train_ddpm_unet (no training.json/unet)"
        )
    diffusers = _diffusers()
    cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if cfg.get("beta_schedule") != "linear" or cfg.get("prediction_type") != "epsilon":
        raise ValueError(
            f"{path}: scheduler must be linear betas with epsilon prediction, got "
            f"{cfg.get('beta_schedule')!r} / {cfg.get('prediction_type')!r}"
        )
    process = DiscreteProcess.linear(
        int(cfg["num_train_timesteps"]), float(cfg["beta_start"]), float(cfg["beta_end"])
    )
    unet = diffusers.UNet2DModel.from_pretrained(
        path / "unet", use_safetensors=True, low_cpu_mem_usage=False
    )
    den = NetDenoiser(_UNetEps(unet), EpsPred(process), sigma_data=sigma_data)
    return den.eval().requires_grad_(False)
