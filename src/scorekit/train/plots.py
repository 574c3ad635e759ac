"""PNG pictures of training: sample grids (images), scatter plots (2-D), loss curves.

``save_samples`` pictures model-space samples of a run in the data's own units (``decode`` with the
run's normalisation, ``pixel_range`` for images); ``scorekit.runs`` uses the same three.

Drawn with matplotlib's object API on an Agg canvas, so no global backend is switched and no
display is needed. Files are written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scorekit._util import atomic_write
from scorekit.data import Normalization

__all__ = [
    "decode",
    "pixel_range",
    "save_figure",
    "save_grid",
    "save_loss_curve",
    "save_panel",
    "save_samples",
    "save_scatter",
]


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> None:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def _tile(images: np.ndarray, cols: int | None = None, *, vmin: float, vmax: float) -> np.ndarray:
    """``[N, C, H, W]`` -> one ``[rows*(H+1)-1, cols*(W+1)-1, C]`` mosaic in [0, 1] (1-pixel gaps)."""
    n, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.nan)  # NaN gaps are drawn white
    scaled = np.clip((images - vmin) / max(vmax - vmin, 1e-12), 0, 1).transpose(0, 2, 3, 1)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = scaled[i]
    return grid


def _show(ax, images: np.ndarray, *, vmin: float, vmax: float, cols: int | None = None) -> None:
    if images.ndim == 3:  # [N, H, W] greyscale
        images = images[:, None]
    grid = _tile(images, cols, vmin=vmin, vmax=vmax)
    if grid.shape[2] == 1:
        cmap = matplotlib.colormaps["gray_r" if vmin >= 0 else "gray"].with_extremes(bad="white")
        ax.imshow(grid[:, :, 0], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.nan_to_num(grid, nan=1.0), interpolation="nearest")
    ax.set_axis_off()


def save_grid(
    path: str | os.PathLike,
    images: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    title: str = "",
    cols: int | None = None,
) -> None:
    """A grid of images ``[N, C, H, W]`` (or ``[N, H, W]``), pixel range ``[vmin, vmax]``."""
    images = np.asarray(images, dtype=np.float64)
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot()
    _show(ax, images, vmin=vmin, vmax=vmax, cols=cols)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def save_scatter(
    path: str | os.PathLike,
    points: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Scatter of 2-D points ``[N, 2]``, optionally over reference points (grey)."""
    points = np.asarray(points)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    if reference is not None:
        ax.scatter(*np.asarray(reference)[:, :2].T, s=2, c="0.75", label="data", rasterized=True)
    ax.scatter(*points[:, :2].T, s=2, c="C0", label="samples", rasterized=True)
    ax.set_aspect("equal")
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def save_panel(
    path: str | os.PathLike,
    real: np.ndarray,
    generated: np.ndarray,
    *,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "",
) -> None:
    """Real next to generated: two image grids, or two 2-D scatter plots on shared axes."""
    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    fig = Figure(figsize=(10, 5))
    axes = fig.subplots(1, 2)
    if real.ndim == 2:  # vectors: scatter the first two coordinates
        for ax, pts, name in zip(axes, (real, generated), ("real", "generated"), strict=True):
            ax.scatter(*pts[:, :2].T, s=2, rasterized=True)
            ax.set_title(name)
            ax.set_aspect("equal")
        lim = np.abs(np.concatenate([real[:, :2], generated[:, :2]])).max() * 1.05
        for ax in axes:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    else:
        lo = float(real.min()) if vmin is None else vmin
        hi = float(real.max()) if vmax is None else vmax
        for ax, imgs, name in zip(axes, (real, generated), ("real", "generated"), strict=True):
            _show(ax, imgs, vmin=lo, vmax=hi)
            ax.set_title(name)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def save_loss_curve(
    path: str | os.PathLike, steps: Sequence[int], losses: Sequence[float], *, title: str = ""
) -> None:
    """Training loss against step (log scale), raw and smoothed."""
    steps, losses = np.asarray(steps), np.asarray(losses, dtype=np.float64)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss (per log window)")
    if len(losses) >= 5:
        k = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"moving mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def decode(x: torch.Tensor, info: dict[str, Any]) -> np.ndarray:
    """Samples in a run's normalised space -> numpy array in the data's own units and shape.

    ``info`` is a run's data description (``scorekit.runs.load_run``); its ``normalization`` dict is
    ``scorekit.data.Normalization.to_dict``'s.
    """
    return np.asarray(Normalization.from_dict(info["normalization"]).decode(x.detach().cpu()))


def pixel_range(info: dict[str, Any]) -> tuple[float, float]:
    """The data's pixel range in its own units: images are normalised to [-1, 1], so decode -1 and 1."""
    norm = Normalization.from_dict(info["normalization"])
    probe = (
        torch.tensor([-1.0, 1.0]).reshape(2, *([1] * len(info["shape"]))).expand(2, *info["shape"])
    )
    lo_hi = np.asarray(norm.decode(probe))
    return float(lo_hi.min()), float(lo_hi.max())


def save_samples(
    path: str | os.PathLike, x: torch.Tensor, info: dict[str, Any], *, title: str = ""
) -> None:
    """A PNG of samples ``x`` (normalised space): an image grid, or a 2-D scatter over the data's axes."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if info["kind"] == "image":
        lo, hi = pixel_range(info)
        imgs = decode(x, info)
        save_grid(path, imgs.reshape(len(imgs), *info["shape"]), vmin=lo, vmax=hi, title=title)
    else:
        save_scatter(path, decode(x, info).reshape(len(x), -1), title=title)
