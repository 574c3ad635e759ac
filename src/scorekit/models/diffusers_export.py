"""A run whose network is a diffusers ``UNet2DModel`` written as a diffusers pipeline folder.

    DIR/unet/                  UNet2DModel.save_pretrained (config.json + safetensors), the run's weights
    DIR/scheduler/scheduler_config.json   EDMEulerScheduler(sigma_min, sigma_max, sigma_data)
    DIR/model_index.json       {"_class_name": "DDPMPipeline", "unet": ..., "scheduler": ...}

Only EDM runs (``--process edm --param edm``, scorekit's defaults) are written: diffusers'
``EDMEulerScheduler`` with ``prediction_type="epsilon"`` preconditions exactly as scorekit's
``EDMPrecond`` does (Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models", NeurIPS 2022, Table 1): ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``
(given to the UNet as its timestep), ``c_skip = sd^2 / (sigma^2 + sd^2)``,
``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, with the run's ``sigma_data``. So
``scorekit.models.from_diffusers(DIR)`` and diffusers' own ``precondition_inputs`` /
``precondition_noise`` / ``precondition_outputs`` around ``UNet2DModel.from_pretrained(DIR/unet)``
give the run's denoiser. A class-conditional run's UNet has ``K + 1`` class embeddings; class ``K``
is "no class" (scorekit's label -1: ``from_diffusers(DIR).as_run(null_label=K)``).

``model_index.json`` names ``DDPMPipeline`` so that ``DiffusionPipeline.from_pretrained`` loads the
two components; that pipeline's own sampling loop does not call ``scale_model_input`` (``c_in``), so
sample with scorekit or with a loop that applies the scheduler's preconditioning.

Every file is written atomically (the UNet is saved to a temporary folder, then moved into place).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from scorekit import nets
from scorekit._util import atomic_write_json
from scorekit.models.diffusers import require_diffusers
from scorekit.process import get_process

__all__ = ["DIFFUSERS_NETS", "check_pipeline", "save_diffusers_pipeline"]

#: Network types whose network is a diffusers class (``scorekit.nets``).
DIFFUSERS_NETS = ("diffusers-unet2d",)


def save_diffusers_pipeline(
    out_dir: str | os.PathLike,
    *,
    net_config: dict[str, Any],
    weights: dict[str, Tensor],
    process: str,
    param: str,
    sigma_data: float,
) -> Path:
    """Write ``unet/``, ``scheduler/`` and ``model_index.json`` into ``out_dir`` (new or empty).

    Raises ValueError (one line) unless the network is a diffusers class and the run is EDM.
    """
    check_pipeline(net_config, process, param)
    diffusers = require_diffusers()
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder")
    net = nets.build(net_config)
    net.load_state_dict(weights)  # refuses weights that do not fit before any file is written
    return _write(out, diffusers, net, process, sigma_data)


def check_pipeline(net_config: dict[str, Any], process: str, param: str) -> None:
    """A one-line ValueError unless a run of this network, process and parameterisation can be written."""
    if net_config.get("type") not in DIFFUSERS_NETS:
        raise ValueError(
            f"a diffusers pipeline needs a run whose network is a diffusers class "
            f'(--net \'{{"type": "diffusers-unet2d"}}\'); this run\'s is {net_config.get("type")!r}'
        )
    if process != "edm" or param != "edm":
        raise ValueError(
            f"a diffusers pipeline is written for EDM runs (--process edm --param edm, "
            f"diffusers' EDMEulerScheduler); this run is --process {process} --param {param}"
        )


def _write(out: Path, diffusers, net, process: str, sigma_data: float) -> Path:
    p = get_process(process)
    sched = diffusers.EDMEulerScheduler(
        sigma_min=float(p.sigma_min), sigma_max=float(p.sigma_max), sigma_data=float(sigma_data),
        sigma_schedule="karras", prediction_type="epsilon",
    )  # fmt: skip
    version = diffusers.__version__
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unet-", dir=out))
    try:
        net.unet.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out / "unet")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sched_cfg = {"_class_name": "EDMEulerScheduler", "_diffusers_version": version,
                 **{k: v for k, v in dict(sched.config).items() if not k.startswith("_")}}  # fmt: skip
    (out / "scheduler").mkdir(exist_ok=True)
    atomic_write_json(out / "scheduler" / "scheduler_config.json", sched_cfg)
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": version,
             "scheduler": ["diffusers", "EDMEulerScheduler"],
             "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    atomic_write_json(out / "model_index.json", index)
    return out
