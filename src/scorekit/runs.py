"""Inference on a trained run: load its EMA denoiser, draw samples, decode them, picture them.

    from scorekit.runs import load_run, generate, decode
    denoiser, info = load_run("runs/ring")      # EMA weights, eval mode; info: shape, process, ...
    x = generate(denoiser, info, 1000, nfe=10)  # [1000, *shape] in the model's normalised space
    points = decode(x, info)                    # numpy, in the data's own units and layout

``load_run(run_dir)`` reads only JSON and safetensors (no code runs), rebuilds the network from its
JSON config and returns ``(denoiser, info)``: ``denoiser(x [B, *shape], sigma [B], class_labels=None)``
is the sigma-frame denoiser of the EMA weights, in eval mode; ``info`` describes the data (see
``load_run``). Samples live in the normalised space the model was trained in; ``decode`` maps them to
the data's own units and shape. ``load_levels`` reads a data file in its own units, checked against
the run's layout (for likelihoods).

This module sits above ``scorekit.train`` (it reads train's checkpoint format and uses its sampling
range and pictures); training never imports it.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from tqdm.auto import tqdm

from scorekit import data as sdata
from scorekit import nets
from scorekit.denoiser import build_denoiser
from scorekit.guidance import cfg
from scorekit.process import get_process
from scorekit.samplers import sample
from scorekit.train import checkpoint as ckpt
from scorekit.train.plots import decode, pixel_range, save_samples
from scorekit.train.preview import sampling_range

__all__ = [
    "decode",
    "draw",
    "generate",
    "load_levels",
    "load_run",
    "picture",
    "pixel_range",
    "sigma_range",
]


def load_run(
    run_dir: str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The denoiser of a training run's newest complete checkpoint, and what it was trained on.

    Args:
        run_dir: a folder written by ``scorekit train`` (or ``scorekit.train.train``).
        weights: ``"ema"`` (the averaged weights, for sampling) or ``"model"`` (the raw weights).
        device: where to put the network.

    Returns:
        ``(denoiser, info)``. ``denoiser`` is a ``torch.nn.Module`` in eval mode satisfying the
        denoiser contract, on ``device``, float32. ``info`` is a dict with ``name``, ``kind``
        (``"vector"`` or ``"image"``), ``shape`` (one example, e.g. ``[2]`` or ``[1, 8, 8]``),
        ``num_classes`` (0 if the run is unconditional), ``normalization`` (a dict for
        ``scorekit.data.Normalization.from_dict``), ``sigma_data``, ``process``, ``param``,
        ``sigma_min`` / ``sigma_max`` (the process's range, for sampling and likelihoods),
        ``step`` and ``config`` (the training configuration).

    Raises:
        FileNotFoundError: if ``run_dir`` has no complete checkpoint.
        scorekit.train.checkpoint.CheckpointError: (a ValueError) if the checkpoint's files, network
            config (bounded by ``scorekit.nets.LIMITS``) or weights are not what they should be.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    folder = ckpt.latest(run_dir)
    if folder is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {str(run_dir)!r} (is it a training run?)"
        )
    tensors, state = ckpt.load(folder)
    try:
        denoiser, info = _rebuild(state, tensors[weights])
    except RuntimeError as e:  # torch's load_state_dict: shapes or names that do not fit
        raise ckpt.CheckpointError(
            f"checkpoint {folder}: its {weights} weights do not fit its network config: "
            f"{_first_line(e)}"
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ckpt.CheckpointError(f"checkpoint {folder}: {_first_line(e)}") from None
    return denoiser.to(device).eval().requires_grad_(False), info


def _rebuild(state: dict[str, Any], weights: dict[str, Tensor]):
    """``(denoiser, info)`` from a checkpoint's state and one group of its weights."""
    config, info = state["config"], dict(state["data"])
    net = nets.build(state["net"])  # bounded: scorekit.nets.LIMITS and MAX_PARAMETERS
    net.load_state_dict(weights)
    # The example shape sizes every batch drawn; it must be the network's (bounded) shape.
    fits = [net.dim] if isinstance(net, nets.MLP) else [net.in_channels, *net.image_size]
    if list(info.get("shape", ())) != fits:
        raise ValueError(
            f"state.json's data shape {info.get('shape')!r} is not its network's {fits}"
        )
    info["num_classes"] = int(state["net"].get("num_classes", 0) or 0)
    lo, hi = sigma_range(config["process"])
    info.update(process=config["process"], param=config["param"], sigma_min=lo, sigma_max=hi,
                step=int(state["step"]), config=config)  # fmt: skip
    denoiser = build_denoiser(
        net, process=config["process"], param=config["param"], sigma_data=info["sigma_data"]
    )
    return denoiser, info


def _first_line(e: BaseException) -> str:
    """An exception as one line: a missing key is named as such, torch's lists are cut to the first."""
    if isinstance(e, KeyError):
        return f"state.json or the tensors lack {e}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


def sigma_range(process: str) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` of a process by name: the noise levels a model of it was trained on."""
    p = get_process(process)
    return float(p.sigma_min), float(p.sigma_max)


def draw(
    denoiser,
    info: dict[str, Any],
    n: int,
    *,
    nfe: int,
    sampler: str = "dpmpp_2m",
    schedule: str = "karras",
    seed: int = 0,
    device: str | torch.device = "cpu",
    index_offset: int = 0,
    guidance: float | None = None,
    label: int | None = None,
    process: str | None = None,
    progress: bool = False,
) -> Tensor:
    """``n`` samples ``[n, *shape]`` in the model's normalised space; sample ``i`` depends on ``(seed, index_offset + i)``.

    With ``label`` the class is bound into the denoiser (``class_labels``); with ``guidance`` ``w``
    as well, classifier-free guidance ``D_u + w (D_c - D_u)`` with ``D_u`` the label-dropped branch
    (Ho & Salimans 2022, eq. 6 in the denoiser form).
    """
    lo, hi = sampling_range(process or info["process"], info.get("sigma_data", 4.0))
    d = _bind(denoiser, info, guidance, label)
    with torch.no_grad():
        return sample(
            d,
            (n, *info["shape"]),
            nfe=nfe,
            sampler=sampler,
            schedule=schedule,
            sigma_min=None
            if lo <= 0.002
            else lo,  # None: sample()'s grid to 0.002, last point dropped
            sigma_max=hi,
            seed=seed,
            device=device,
            index_offset=index_offset,
            progress=progress,
        )


def generate(
    denoiser,
    info: dict[str, Any],
    n: int,
    *,
    batch: int = 1000,
    dist=None,
    progress: bool = True,
    **draw_options,
) -> Tensor | None:
    """``n`` samples drawn in chunks of ``batch``, split across the ranks of ``dist`` if given.

    Rank ``r`` of ``N`` draws the contiguous sample numbers ``[r n / N, (r + 1) n / N)`` (with the
    same seed, so sample ``i`` is the same whatever ``N`` and ``batch``); rank 0 gathers them and
    returns ``[n, *shape]`` on the CPU, the other ranks return ``None``. ``draw_options`` go to ``draw``.
    """
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be >= 1, got n={n}, batch={batch}")
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    lo, hi = rank * n // world, (rank + 1) * n // world
    parts = []
    # delay: no bar at all when the first chunk fails validation (the error stands alone).
    bar = tqdm(total=hi - lo, disable=not progress or rank != 0, unit="sample", delay=0.5)
    for start in range(lo, hi, batch):
        m = min(batch, hi - start)
        parts.append(draw(denoiser, info, m, index_offset=start, **draw_options).cpu())
        bar.update(m)
    bar.close()
    mine = torch.cat(parts) if parts else torch.empty(0, *info["shape"])
    if world == 1:
        return mine
    # Gather equal-sized padded shards (gloo and nccl need equal sizes), then trim.
    width = -(-n // world)
    dev = dist.device
    padded = torch.zeros(width, *info["shape"], device=dev)
    padded[: len(mine)] = mine.to(dev)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(gathered, padded)
    if rank != 0:
        return None
    sizes = [(r + 1) * n // world - r * n // world for r in range(world)]
    return torch.cat([g[:k].cpu() for g, k in zip(gathered, sizes, strict=True)])


def _bind(denoiser, info: dict[str, Any], guidance: float | None, label: int | None):
    """The denoiser to sample: unchanged, the class ``label`` bound in, or CFG towards it.

    With a label, ``D_c = denoiser(., ., class_labels=label)``; with ``guidance = w`` as well,
    ``scorekit.guidance.cfg(D_c, D_u, w)`` with ``D_u`` the label-dropped branch (``class_labels=-1``).
    """
    if label is None:
        if guidance is not None:
            raise ValueError("--guidance needs --label (the class to guide towards)")
        return denoiser
    k = int(info.get("num_classes", 0) or 0)
    if k == 0:
        raise ValueError(
            "this run is unconditional (trained without --cond); --label is not allowed"
        )
    if not 0 <= label < k:
        raise ValueError(f"label must be in 0..{k - 1}, got {label}")
    conditional = partial(_with_label, denoiser, label)
    if guidance is None:
        return conditional
    return cfg(conditional, partial(_with_label, denoiser, -1), guidance)


def _with_label(denoiser, label: int, x: Tensor, sigma: Tensor) -> Tensor:
    """``denoiser(x, sigma)`` with every row's class label ``label`` (-1: no label)."""
    return denoiser(x, sigma, class_labels=torch.full((x.shape[0],), label, device=x.device))


def picture(path: str | os.PathLike, x: Tensor, info: dict[str, Any], *, title: str = "") -> None:
    """A PNG of samples ``x`` (normalised space): an image grid, or a 2-D scatter over the data's axes."""
    save_samples(path, x, info, title=title)


def load_levels(data: str, info: dict, *, split: str = "all", holdout: float | None = None,
                seed: int = 0) -> Tensor:  # fmt: skip
    """The data in its own units and layout (``[N, ...]`` float64), checked against the run.

    Raises ``ValueError`` when the examples do not have the run's shape once normalised.
    """
    ds = sdata.load(data, seed=seed)
    if split != "all":
        frac = holdout if holdout is not None else float(info["config"].get("holdout", 0.0))
        if not 0 < frac < 1:
            raise ValueError(
                f"--split {split} needs a holdout fraction in (0, 1); the run used {frac} "
                "(give --holdout)"
            )
        train, test = sdata.split(ds, holdout=frac, seed=int(info["config"].get("seed", 0)))
        ds = test if split == "test" else train
    raw = ds.normalization.decode(ds.x).to(torch.float64)
    norm = sdata.Normalization.from_dict(info["normalization"])
    try:
        model_x = norm.encode(raw)
    except ValueError as e:
        raise ValueError(f"--data {data}: does not fit the run's data layout: {e}") from None
    want = tuple(info["shape"])
    if tuple(model_x.shape[1:]) != want:
        raise ValueError(
            f"--data {data}: examples have shape {tuple(model_x.shape[1:])} in model units; the run "
            f"was trained on shape {list(want)}"
        )
    return raw
