"""Use a trained run: load its EMA denoiser, draw samples, decode them, picture them.

``load_run(run_dir)`` reads only JSON and safetensors (no code runs), rebuilds the network from its
JSON config and returns ``(denoiser, info)``: ``denoiser(x [B, *shape], sigma [B], class_labels=None)``
is the sigma-frame denoiser of the EMA weights, in eval mode; ``info`` describes the data (see
``load_run``). Samples live in the normalised space the model was trained in; ``decode`` maps them to
the data's own units and shape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from scorekit.denoiser import build_denoiser
from scorekit.process import get_process
from scorekit.train import checkpoint as ckpt

__all__ = ["decode", "draw", "generate", "load_run", "picture", "pixel_range", "sigma_range"]


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
    """
    from scorekit import nets

    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    folder = ckpt.latest(run_dir)
    if folder is None:
        raise FileNotFoundError(
            f"no complete checkpoint in {str(run_dir)!r} (is it a training run?)"
        )
    tensors, state = ckpt.load(folder)
    net = nets.build(state["net"])
    net.load_state_dict(tensors[weights])
    cfg = state["config"]
    info = dict(state["data"])
    info["num_classes"] = int(state["net"].get("num_classes", 0) or 0)
    lo, hi = sigma_range(cfg["process"])
    info.update(
        process=cfg["process"],
        param=cfg["param"],
        sigma_min=lo,
        sigma_max=hi,
        step=int(state["step"]),
        config=cfg,
    )
    denoiser = build_denoiser(
        net, process=cfg["process"], param=cfg["param"], sigma_data=info["sigma_data"]
    )
    return denoiser.to(device).eval().requires_grad_(False), info


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
    sampler: str = "ipndm",
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
    from scorekit.samplers import sample

    lo, hi = sigma_range(process or info["process"])
    lo = max(lo, 2e-3)  # below this the last step changes nothing visible and costs accuracy
    # The prior N(0, sigma_max^2 I) differs from the noised data's marginal by a relative variance of
    # (sd / sigma_max)^2, 0.25% at 20 sd; starting higher spends steps on nothing (EDM's 80 is 160 sd
    # for images of sd 0.5), which at NFE 10 costs visible accuracy.
    hi = min(hi, 80.0, 20.0 * float(info.get("sigma_data", 4.0)))
    d = _bind(denoiser, info, guidance, label)
    with torch.no_grad():
        return sample(
            d,
            (n, *info["shape"]),
            nfe=nfe,
            sampler=sampler,
            schedule=schedule,
            sigma_min=lo,
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
    import torch.distributed as tdist
    from tqdm.auto import tqdm

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


def _bind(denoiser, info, guidance, label):
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

    def conditional(x, sigma):
        return denoiser(x, sigma, class_labels=torch.full((x.shape[0],), label, device=x.device))

    if guidance is None:
        return conditional

    def guided(x, sigma):
        d_u = denoiser(x, sigma, class_labels=torch.full((x.shape[0],), -1, device=x.device))
        return d_u + guidance * (conditional(x, sigma) - d_u)

    return guided


def decode(x: Tensor, info: dict[str, Any]) -> np.ndarray:
    """Samples in the normalised space -> numpy array in the data's own units and shape."""
    from scorekit.data import Normalization

    return np.asarray(Normalization.from_dict(info["normalization"]).decode(x.detach().cpu()))


def picture(path: str | os.PathLike, x: Tensor, info: dict[str, Any], *, title: str = "") -> None:
    """A PNG of samples ``x`` (normalised space): an image grid, or a 2-D scatter over the data's axes."""
    from scorekit.train.plots import save_grid, save_scatter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if info["kind"] == "image":
        lo, hi = pixel_range(info)
        imgs = decode(x, info)
        save_grid(path, imgs.reshape(len(imgs), *info["shape"]), vmin=lo, vmax=hi, title=title)
    else:
        save_scatter(path, decode(x, info).reshape(len(x), -1), title=title)


def pixel_range(info: dict[str, Any]) -> tuple[float, float]:
    """The data's pixel range in its own units: images are normalised to [-1, 1], so decode -1 and 1."""
    from scorekit.data import Normalization

    norm = Normalization.from_dict(info["normalization"])
    probe = (
        torch.tensor([-1.0, 1.0]).reshape(2, *([1] * len(info["shape"]))).expand(2, *info["shape"])
    )
    lo_hi = np.asarray(norm.decode(probe))
    return float(lo_hi.min()), float(lo_hi.max())
