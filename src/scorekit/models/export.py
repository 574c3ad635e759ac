"""A trained scorekit network written as a self-contained folder, and loaded back without running code.

The layout (``FORMAT = "scorekit-export"``, version 1)::

    DIR/model.safetensors   the network's weights (a run's EMA weights by default), float32
    DIR/config.json         {"format", "version", "net": scorekit.nets config, "process", "param",
                             "sigma_data", "sigma_min", "sigma_max", "data": {name, kind, shape,
                             num_classes, normalization}, "training": {step, elapsed_s, first_loss,
                             last_loss, data_sha256, config}, "weights": "ema" or "model",
                             "sha256": {"model.safetensors": ...}}
    DIR/README.md           a short model card: what it is, how to load it, the training figures

``load_exported(DIR)`` reads JSON and safetensors only (the network is rebuilt by
``scorekit.nets.build`` from its bounded JSON config, never unpickled), checks the weights' SHA-256,
and returns ``(denoiser, info)`` as ``scorekit.runs.load_run`` does; the denoiser's outputs are
bit-identical to the run's. ``scorekit export --run RUN --out DIR`` writes it from a training run.
Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from scorekit import nets
from scorekit._util import atomic_write, atomic_write_json
from scorekit.denoiser import build_denoiser
from scorekit.process import get_process

__all__ = ["FORMAT", "VERSION", "load_exported", "model_card", "save_exported"]

FORMAT, VERSION = "scorekit-export", 1
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
DATA_KEYS = ("name", "kind", "shape", "num_classes", "normalization")


def save_exported(
    out_dir: str | os.PathLike,
    *,
    net_config: dict[str, Any],
    weights: dict[str, Tensor],
    data: dict[str, Any],
    process: str,
    param: str,
    sigma_data: float,
    training: dict[str, Any] | None = None,
    which: str = "ema",
    overwrite: bool = False,
) -> Path:
    """Write the export layout into ``out_dir`` (created; refused if it holds files, unless ``overwrite``).

    ``weights`` is the network's state dict (checked against ``net_config`` by building the network
    and loading them before anything is written); ``data`` holds ``DATA_KEYS``; ``training`` the
    figures for the model card.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose a new folder or pass --overwrite")
    net = nets.build(net_config)
    net.load_state_dict(weights)  # refuses weights that do not fit before any file is written
    p = get_process(process)
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in weights.items()})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "net": net_config,
        "process": process,
        "param": param,
        "sigma_data": float(sigma_data),
        "sigma_min": float(p.sigma_min),
        "sigma_max": float(p.sigma_max),
        "data": {k: data[k] for k in DATA_KEYS if k in data},
        "training": training or {},
        "weights": which,
        "parameters": nets.num_parameters(net),
        "sha256": {WEIGHTS: hashlib.sha256(blob).hexdigest()},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, blob)
    atomic_write_json(out / CONFIG, config)
    atomic_write(out / CARD, model_card(config).encode())
    return out


def model_card(config: dict[str, Any]) -> str:
    """The README.md of an export: what the model is, how to load it, its training figures."""
    data, tr = config["data"], config.get("training", {})
    name = data.get("name", "model")
    lines = [
        f"# scorekit model: {name}",
        "",
        f"A denoiser `D(x, sigma) ~ E[x0 | x]` trained by scorekit on `{name}` "
        f"({data.get('kind', '?')} data, one example of shape {data.get('shape')}, "
        f"{data.get('num_classes', 0) or 'no'} classes).",
        "",
        "| | |",
        "| --- | --- |",
        f"| network | {config['net'].get('type', '?')}, {config.get('parameters', '?')} parameters |",
        f"| process / parameterisation | {config['process']} / {config['param']} |",
        f"| sigma range | {config['sigma_min']:.4g} .. {config['sigma_max']:.4g} "
        f"(sigma_data {config['sigma_data']:.4g}) |",
        f"| weights | {config['weights']} |",
    ]
    for key, label in (("step", "training steps"), ("elapsed_s", "training time (s)"),
                       ("first_loss", "first loss"), ("last_loss", "last logged loss"),
                       ("data_sha256", "training data SHA-256")):  # fmt: skip
        if tr.get(key) is not None:
            v = tr[key]
            lines.append(f"| {label} | {v:.4g} |" if isinstance(v, float) else f"| {label} | {v} |")
    lines += [
        "",
        "Load it (JSON and safetensors only; no code from this folder runs):",
        "",
        "```python",
        "from scorekit.models import load_exported",
        "import scorekit",
        "denoiser, info = load_exported('THIS_FOLDER')",
        "x = scorekit.sample(denoiser, (16, *info['shape']), nfe=10, sampler='dpmpp_2m',",
        "                    sigma_min=info['sigma_min'], sigma_max=info['sigma_max'])",
        "```",
        "",
        "Samples are in the normalised units the model was trained in; `info['normalization']` maps "
        "them back (`scorekit.data.Normalization.from_dict(...).decode(x)`).",
        "",
    ]
    return "\n".join(lines)


def load_exported(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """``(denoiser, info)`` of an export folder; ``info`` has the keys of ``scorekit.runs.load_run``'s.

    Raises ``FileNotFoundError`` if a file is missing and ``ValueError`` (one line) if the config is
    not this format, the weights' checksum differs, or the weights do not fit the network config.
    """
    folder = Path(folder)
    for f in (CONFIG, WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder}: no {f} (not a scorekit export folder)")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG}: not a {FORMAT} config")
    if config.get("version") != VERSION:
        raise ValueError(
            f"{folder / CONFIG}: version {config.get('version')!r}; this scorekit reads {VERSION}"
        )
    blob = (folder / WEIGHTS).read_bytes()
    want = config.get("sha256", {}).get(WEIGHTS)
    if want != hashlib.sha256(blob).hexdigest():
        raise ValueError(f"{folder / WEIGHTS}: its SHA-256 is not the one config.json records")
    net = nets.build(config["net"])  # bounded by scorekit.nets.LIMITS
    try:
        net.load_state_dict(st_load(blob))
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS}: the weights do not fit config.json's network: "
                         f"{str(e).splitlines()[0]}") from None  # fmt: skip
    denoiser = build_denoiser(net, process=config["process"], param=config["param"],
                              sigma_data=config["sigma_data"])  # fmt: skip
    data, training = config["data"], config.get("training", {})
    info = {
        **data,
        "num_classes": int(data.get("num_classes", 0) or 0),
        "sigma_data": config["sigma_data"],
        "process": config["process"],
        "param": config["param"],
        "sigma_min": config["sigma_min"],
        "sigma_max": config["sigma_max"],
        "step": training.get("step"),
        "config": training.get("config", {}),
    }
    return denoiser.to(device).eval().requires_grad_(False), info
