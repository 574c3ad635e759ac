"""Data sets: built-in 2-D shapes and scikit-learn's digits, and loaders for users' files.

``load(name_or_path)`` returns a ``Dataset`` whose ``x`` is already normalised: vectors have each
feature shifted and scaled to zero mean and unit standard deviation, images are mapped affinely from
their pixel range to [-1, 1]. ``dataset.normalization`` is the map, JSON-able, with ``encode`` (data
units -> model units) and ``decode`` (model units -> the data's own units and array layout), so
samples can be written back in the user's units.

Built-in data sets (``BUILTIN``; made in code or shipped with scikit-learn, nothing is downloaded):

    moons          20,000 points, two interleaving half circles (labels: 2 moons)
    swiss_roll     20,000 points on the 2-D spiral (t cos t, t sin t), t in [1.5 pi, 4.5 pi] (no labels)
    ring           20,000 points from 8 Gaussians (std 0.1) on a circle of radius sqrt(1.98): the same
                   distribution as ``scorekit.analytic.target("ring8")`` (labels: 8 components)
    checkerboard   20,000 points uniform on the 8 dark squares of a 4x4 board on [-2, 2]^2 (labels: 8)
    pinwheel       20,000 points on 5 spiral arms (Johnson et al. 2016) (labels: 5 arms)
    digits         scikit-learn's 1,797 8x8 handwritten digits, pixels 0..16, as [N, 1, 8, 8] in
                   [-1, 1] (labels: 0-9)

The 2-D sets are drawn from a ``torch.Generator`` seeded with ``seed``, so a (name, seed) pair always
gives the same points; ``digits`` is fixed (``seed`` is unused).

Users' files:

    .npy      [N, d] vectors; [N, H, W] grayscale images; [N, C, H, W] images; or [N, H, W, C] images,
              recognised when the last axis is 1 or 3 and axis 1 is not. Loaded with
              ``allow_pickle=False``. Image pixel range: uint8 -> [0, 255], uint16 -> [0, 65535];
              floats within [0, 1] -> [0, 1], within [-1, 1] -> [-1, 1]; anything else (other
              integer types, wider floats such as digits' 0..16) -> the data's own [min, max].
    .csv      numeric columns, one example per row; an optional header row (a first row in which no
              cell is a number); a column named ``label`` becomes the labels (non-negative integers
              are kept as class indices, anything else is treated as class names, sorted).
    folder    PNG/JPEG images (``.png``, ``.jpg``, ``.jpeg``), all the same size, grayscale or RGB
              (grayscale ones are repeated to RGB when the folder mixes both; an alpha channel is
              accepted only when fully opaque). Either images directly in the folder (no labels) or
              one subfolder per class (subfolder names, sorted, become the classes). Hidden files
              (``.name``) are ignored.

Errors are ``ValueError`` naming the file and what is wrong (row, column, value, sizes); nothing is
silently dropped.

References:
    Johnson et al., "Composing graphical models with neural networks for structured representations and
    fast inference", NeurIPS 2016 (the pinwheel data set). Alpaydin & Kaynak, "Optical Recognition of
    Handwritten Digits", UCI 1998 (the digits, via ``sklearn.datasets.load_digits``).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, final

import numpy as np
import torch
from torch import Tensor

__all__ = ["BUILTIN", "MAX_CLASSES", "Dataset", "Normalization", "holdout_mask", "load", "split"]

_LAYOUTS = ("vector", "NCHW", "NHW", "NHWC")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_FILE_EXTENSIONS = (".npy", ".csv")

#: The most classes a data set may have (a bound on what a label column can make us allocate).
MAX_CLASSES = 1000


# --------------------------------------------------------------------------------------------------
# Normalisation and the data set record.


@final
@dataclass(frozen=True)
class Normalization:
    """The affine map between the data's own units and layout and the model's: ``x = (raw - shift) / scale``.

    Attributes:
        shift: per-feature values ``[d]`` for vectors, or one value for images.
        scale: same length as ``shift``; positive.
        layout: the raw layout: ``"vector"`` (``[N, d]``), ``"NCHW"``, ``"NHW"`` (grayscale,
            no channel axis) or ``"NHWC"``. Model tensors are ``[N, d]`` or ``[N, C, H, W]``.

    ``encode(raw)`` accepts a tensor or array in the raw layout and returns a float32 tensor in the
    model layout; ``decode(x)`` inverts it (float32, raw layout). ``decode(encode(raw)) == raw`` up to
    float32 rounding.
    """

    shift: tuple[float, ...]
    scale: tuple[float, ...]
    layout: str

    def __post_init__(self):
        object.__setattr__(self, "shift", tuple(float(v) for v in self.shift))
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        if self.layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}; got {self.layout!r}")
        if len(self.shift) != len(self.scale) or not self.shift:
            raise ValueError(
                f"shift and scale must be non-empty and of equal length; got {len(self.shift)} "
                f"and {len(self.scale)}"
            )
        if self.layout != "vector" and len(self.shift) != 1:
            raise ValueError(
                f"image normalisation takes one shift and scale; got {len(self.shift)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.scale):
            raise ValueError(f"scale must be finite and > 0; got {self.scale}")
        if not all(math.isfinite(s) for s in self.shift):
            raise ValueError(f"shift must be finite; got {self.shift}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``Normalization.from_dict`` inverts it."""
        return {"shift": list(self.shift), "scale": list(self.scale), "layout": self.layout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        keys = {"shift", "scale", "layout"}
        if not isinstance(d, dict) or set(d) != keys:
            raise ValueError(
                f"a normalisation dict needs exactly the keys {sorted(keys)}; got {d!r}"
            )
        return cls(tuple(d["shift"]), tuple(d["scale"]), d["layout"])

    def _params(self, x: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        shift = torch.tensor(self.shift, dtype=torch.float64, device=x.device)
        scale = torch.tensor(self.scale, dtype=torch.float64, device=x.device)
        if self.layout != "vector":
            shift, scale = shift.reshape([1] * ndim), scale.reshape([1] * ndim)
        return shift, scale

    def encode(self, raw: Tensor | np.ndarray) -> Tensor:
        """Raw data (raw layout and units) -> model tensor ``[N, d]`` or ``[N, C, H, W]``, float32."""
        raw = torch.as_tensor(np.asarray(raw) if not isinstance(raw, Tensor) else raw)
        raw = raw.to(torch.float64)
        expected = {"vector": 2, "NCHW": 4, "NHW": 3, "NHWC": 4}[self.layout]
        if raw.ndim != expected:
            raise ValueError(
                f"encode expects the raw layout {self.layout} (rank {expected}); got shape "
                f"{tuple(raw.shape)}"
            )
        if self.layout == "vector" and raw.shape[1] != len(self.shift):
            raise ValueError(f"encode expects [N, {len(self.shift)}]; got {tuple(raw.shape)}")
        if self.layout == "NHW":
            raw = raw[:, None]
        elif self.layout == "NHWC":
            raw = raw.permute(0, 3, 1, 2)
        shift, scale = self._params(raw, raw.ndim)
        return ((raw - shift) / scale).to(torch.float32).contiguous()

    def decode(self, x: Tensor) -> Tensor:
        """Model tensor -> raw data in the data's own units and layout, float32."""
        x = torch.as_tensor(x).to(torch.float64)
        expected = 2 if self.layout == "vector" else 4
        if x.ndim != expected:
            raise ValueError(f"decode expects a rank-{expected} tensor; got shape {tuple(x.shape)}")
        if self.layout == "vector" and x.shape[1] != len(self.shift):
            raise ValueError(f"decode expects [N, {len(self.shift)}]; got {tuple(x.shape)}")
        shift, scale = self._params(x, x.ndim)
        raw = x * scale + shift
        if self.layout == "NHW":
            if raw.shape[1] != 1:
                raise ValueError(f"decode for layout NHW expects one channel; got {tuple(x.shape)}")
            raw = raw[:, 0]
        elif self.layout == "NHWC":
            raw = raw.permute(0, 2, 3, 1)
        return raw.to(torch.float32).contiguous()


@final
@dataclass(frozen=True, eq=False)
class Dataset:
    """A normalised data set.

    Attributes:
        x: float32 ``[N, d]`` (``kind="vector"``) or ``[N, C, H, W]`` (``kind="image"``, in [-1, 1]).
        labels: int64 ``[N]`` in ``0..num_classes-1``, or ``None``.
        num_classes: number of classes (0 when there are no labels).
        kind: ``"vector"`` or ``"image"``.
        shape: the per-example shape, ``x.shape[1:]``.
        name: the built-in name or the path it was loaded from.
        normalization: the map from the data's own units (``decode`` goes back).
        class_names: one name per class (``()`` when there are no labels).
    """

    x: Tensor
    labels: Tensor | None
    num_classes: int
    kind: str
    shape: tuple[int, ...]
    name: str
    normalization: Normalization
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.kind not in ("vector", "image"):
            raise ValueError(f"kind must be 'vector' or 'image'; got {self.kind!r}")
        if self.x.dtype != torch.float32 or self.x.ndim != (2 if self.kind == "vector" else 4):
            raise ValueError(
                f"x must be float32 [N, d] or [N, C, H, W] for kind {self.kind!r}; got "
                f"{self.x.dtype} {tuple(self.x.shape)}"
            )
        if tuple(self.shape) != tuple(self.x.shape[1:]):
            raise ValueError(f"shape {self.shape} does not match x's {tuple(self.x.shape[1:])}")
        if self.labels is None:
            if self.num_classes != 0:
                raise ValueError(f"num_classes must be 0 without labels; got {self.num_classes}")
        else:
            if self.labels.dtype != torch.long or self.labels.shape != self.x.shape[:1]:
                raise ValueError(
                    f"labels must be int64 [N] = [{self.x.shape[0]}]; got {self.labels.dtype} "
                    f"{tuple(self.labels.shape)}"
                )
            if len(self.labels) and (
                self.labels.min() < 0 or self.labels.max() >= self.num_classes
            ):
                raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for {self.num_classes} classes"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        # The default dataclass repr would print every tensor element.
        return (
            f"Dataset(name={self.name!r}, kind={self.kind!r}, n={len(self)}, shape={self.shape}, "
            f"num_classes={self.num_classes})"
        )

    def _subset(self, idx: Tensor) -> Dataset:
        labels = None if self.labels is None else self.labels[idx]
        return Dataset(
            self.x[idx],
            labels,
            self.num_classes,
            self.kind,
            self.shape,
            self.name,
            self.normalization,
            self.class_names,
        )


def _vector_dataset(
    raw: np.ndarray | Tensor,
    name: str,
    labels: Tensor | None = None,
    num_classes: int = 0,
    class_names: tuple[str, ...] = (),
) -> Dataset:
    """Per-feature standardisation (a constant feature keeps scale 1) of ``raw [N, d]``."""
    raw64 = torch.as_tensor(np.asarray(raw, dtype=np.float64))
    mean = raw64.mean(0)
    std = raw64.std(0, correction=0) if raw64.shape[0] > 1 else torch.zeros_like(mean)
    std = torch.where(std > 0, std, torch.ones_like(std))
    norm = Normalization(tuple(mean.tolist()), tuple(std.tolist()), "vector")
    x = norm.encode(raw64)
    return Dataset(x, labels, num_classes, "vector", tuple(x.shape[1:]), name, norm, class_names)


def _image_dataset(
    raw: np.ndarray,
    layout: str,
    pixel_range: tuple[float, float],
    name: str,
    labels: Tensor | None = None,
    num_classes: int = 0,
    class_names: tuple[str, ...] = (),
) -> Dataset:
    """The affine map of ``pixel_range`` onto [-1, 1]: ``x = (raw - mid) / half``."""
    lo, hi = pixel_range
    half = (hi - lo) / 2 if hi > lo else 1.0
    norm = Normalization(((hi + lo) / 2,), (half,), layout)
    x = norm.encode(raw)
    return Dataset(x, labels, num_classes, "image", tuple(x.shape[1:]), name, norm, class_names)


# --------------------------------------------------------------------------------------------------
# Built-in data sets.

_N_POINTS = 20_000


def _moons(g: torch.Generator) -> tuple[Tensor, Tensor]:
    # Upper moon (cos t, sin t) and lower moon (1 - cos t, 1/2 - sin t), t ~ U(0, pi), noise std 0.05.
    labels = torch.arange(_N_POINTS) % 2
    t = math.pi * torch.rand(_N_POINTS, generator=g, dtype=torch.float64)
    upper = torch.stack([t.cos(), t.sin()], 1)
    lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], 1)
    pts = torch.where(labels[:, None] == 0, upper, lower)
    return pts + 0.05 * torch.randn(_N_POINTS, 2, generator=g, dtype=torch.float64), labels


def _swiss_roll(g: torch.Generator) -> tuple[Tensor, None]:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(_N_POINTS, generator=g, dtype=torch.float64))
    pts = torch.stack([t * t.cos(), t * t.sin()], 1)
    return pts + 0.3 * torch.randn(_N_POINTS, 2, generator=g, dtype=torch.float64), None


def _ring(g: torch.Generator) -> tuple[Tensor, Tensor]:
    # Matches analytic.target("ring8"): radius sqrt(2 (1 - 0.01)), std 0.1, so each coordinate has
    # variance r**2 / 2 + 0.01 = 1 exactly.
    labels = torch.randint(0, 8, (_N_POINTS,), generator=g)
    ang = labels.to(torch.float64) * (2 * math.pi / 8)
    r = math.sqrt(2 * (1 - 0.01))
    means = r * torch.stack([ang.cos(), ang.sin()], 1)
    return means + 0.1 * torch.randn(_N_POINTS, 2, generator=g, dtype=torch.float64), labels


def _checkerboard(g: torch.Generator) -> tuple[Tensor, Tensor]:
    # Square (i, j) of the 4x4 board on [-2, 2]^2 is dark when i + j is even; 8 dark squares.
    corners = torch.tensor(
        [(i - 2.0, j - 2.0) for i in range(4) for j in range(4) if (i + j) % 2 == 0],
        dtype=torch.float64,
    )
    labels = torch.randint(0, 8, (_N_POINTS,), generator=g)
    return corners[labels] + torch.rand(_N_POINTS, 2, generator=g, dtype=torch.float64), labels


def _pinwheel(g: torch.Generator) -> tuple[Tensor, Tensor]:
    # Johnson et al. 2016: a point (1 + radial noise, tangential noise) rotated by the arm's angle plus
    # rate * exp(radius), which bends each arm into a spiral.
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.05, 0.25
    labels = torch.randint(0, arms, (_N_POINTS,), generator=g)
    feats = torch.randn(_N_POINTS, 2, generator=g, dtype=torch.float64)
    feats = feats * torch.tensor([radial_std, tangential_std], dtype=torch.float64)
    feats[:, 0] += 1.0
    angle = labels.to(torch.float64) * (2 * math.pi / arms) + rate * feats[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    return torch.stack(
        [c * feats[:, 0] - s * feats[:, 1], s * feats[:, 0] + c * feats[:, 1]], 1
    ), labels


def _points(make: Callable[[torch.Generator], tuple[Tensor, Tensor | None]], k: int):
    def builder(name: str, seed: int) -> Dataset:
        pts, labels = make(torch.Generator().manual_seed(seed))
        names = tuple(str(i) for i in range(k))
        return _vector_dataset(pts, name, labels, k if labels is not None else 0, names)

    return builder


def _digits(name: str, seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    names = tuple(str(i) for i in range(10))
    return _image_dataset(bunch.images, "NHW", (0.0, 16.0), name, labels, 10, names)


#: Built-in data set name -> builder ``(name, seed) -> Dataset``.
BUILTIN: dict[str, Callable[[str, int], Dataset]] = {
    "moons": _points(_moons, 2),
    "swiss_roll": _points(_swiss_roll, 0),
    "ring": _points(_ring, 8),
    "checkerboard": _points(_checkerboard, 8),
    "pinwheel": _points(_pinwheel, 5),
    "digits": _digits,
}


# --------------------------------------------------------------------------------------------------
# Users' files.


def _check_finite(arr: np.ndarray, path: Path, rows: list[int] | None = None, what: str = "row"):
    """Raise naming the first rows holding NaN or inf; ``rows`` maps array rows to file line numbers."""
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad)
        shown = [rows[i] if rows is not None else int(i) for i in idx[:5]]
        more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
        raise ValueError(
            f"{path}: NaN or inf values in {what}s {shown}{more} ({len(idx)} affected)"
        )


def _image_range(arr: np.ndarray) -> tuple[float, float]:
    if arr.dtype == np.uint8:
        return 0.0, 255.0
    if arr.dtype == np.uint16:
        return 0.0, 65535.0
    lo, hi = float(arr.min()), float(arr.max())
    if np.issubdtype(arr.dtype, np.floating):
        for a, b in ((0.0, 1.0), (-1.0, 1.0)):
            if a <= lo and hi <= b:
                return a, b
    return lo, hi


def _load_npy(path: Path) -> Dataset:
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path}: cannot read as a .npy array ({err})") from None
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{path}: expected a numeric array; got dtype {arr.dtype}")
    if arr.ndim < 2 or arr.ndim > 4:
        raise ValueError(
            f"{path}: expected shape [N, d], [N, H, W], [N, C, H, W] or [N, H, W, C]; got "
            f"{arr.shape}" + (" (reshape a 1-D array to [N, 1])" if arr.ndim == 1 else "")
        )
    if arr.shape[0] == 0 or arr.size == 0:
        raise ValueError(f"{path}: the array is empty (shape {arr.shape})")
    _check_finite(arr, path)
    if arr.ndim == 2:
        return _vector_dataset(arr, str(path))
    layout = "NHW"
    if arr.ndim == 4:
        layout = "NHWC" if arr.shape[3] in (1, 3) and arr.shape[1] not in (1, 3) else "NCHW"
    return _image_dataset(arr, layout, _image_range(arr), str(path))


def _parse_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _load_csv(path: Path) -> Dataset:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read as UTF-8 CSV text ({err})") from None
    if not rows:
        raise ValueError(f"{path}: the file is empty (no rows)")
    first = [c.strip() for c in rows[0][1]]
    header = None
    if all(_parse_float(c) is None for c in first):
        header, rows = first, rows[1:]
        if not rows:
            raise ValueError(f"{path}: the file has a header row but no data rows")
    ncols = len(header) if header is not None else len(rows[0][1])
    label_col = None
    if header is not None:
        lowered = [h.lower() for h in header]
        if lowered.count("label") > 1:
            raise ValueError(f"{path}: more than one 'label' column in the header {header}")
        if "label" in lowered:
            label_col = lowered.index("label")
    if ncols - (label_col is not None) < 1:
        raise ValueError(f"{path}: no feature columns (header {header})")

    feats = np.empty((len(rows), ncols - (label_col is not None)), dtype=np.float64)
    label_cells: list[str] = []
    line_numbers = []
    for i, (line, row) in enumerate(rows):
        if len(row) != ncols:
            raise ValueError(
                f"{path}: row {line} has {len(row)} columns, expected {ncols} "
                f"(as in the {'header' if header is not None else 'first row'})"
            )
        line_numbers.append(line)
        k = 0
        for j, cell in enumerate(row):
            cell = cell.strip()
            if j == label_col:
                if not cell:
                    raise ValueError(f"{path}: row {line}, column 'label': empty label")
                label_cells.append(cell)
                continue
            value = _parse_float(cell)
            if value is None:
                col = f"{j + 1}" + (f" ({header[j]!r})" if header is not None else "")
                raise ValueError(f"{path}: row {line}, column {col}: non-numeric value {cell!r}")
            feats[i, k] = value
            k += 1
    _check_finite(feats, path, line_numbers)

    if label_col is None:
        return _vector_dataset(feats, str(path))
    as_num = [_parse_float(c) for c in label_cells]
    if all(v is not None and v >= 0 and float(v).is_integer() for v in as_num):
        too_big = [
            (line, v) for line, v in zip(line_numbers, as_num, strict=True) if v >= MAX_CLASSES
        ]
        if too_big:
            raise ValueError(
                f"{path}: row {too_big[0][0]}, column 'label': class id {too_big[0][1]:.6g} is too "
                f"large; allowed: class ids 0..K-1 with K <= {MAX_CLASSES}, or class names"
            )
        ints = [int(v) for v in as_num]  # type: ignore[arg-type]
        k = max(ints) + 1
        return _vector_dataset(
            feats, str(path), torch.tensor(ints), k, tuple(str(i) for i in range(k))
        )
    names = sorted(set(label_cells))
    if len(names) > MAX_CLASSES:
        raise ValueError(
            f"{path}: column 'label' has {len(names)} distinct classes; allowed: at most "
            f"{MAX_CLASSES} (is a feature column named 'label'?)"
        )
    index = {n: i for i, n in enumerate(names)}
    labels = torch.tensor([index[c] for c in label_cells])
    return _vector_dataset(feats, str(path), labels, len(names), tuple(names))


def _read_image(path: Path) -> np.ndarray:
    """An image as uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA")
            elif mode == "1":
                im = im.convert("L")
            elif mode not in ("L", "RGB", "RGBA", "LA"):
                raise ValueError(
                    f"{path}: unsupported image mode {mode!r}; use 8-bit grayscale or RGB"
                )
            arr = np.asarray(im)
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: cannot read as an image ({err})") from None
    if im.mode in ("RGBA", "LA"):
        if (arr[..., -1] != 255).any():
            raise ValueError(
                f"{path}: the image has a transparent alpha channel; flatten it to RGB or grayscale"
            )
        arr = arr[..., :-1]
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
    return arr


def _image_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            raise ValueError(f"{p}: unexpected folder; class folders must hold images only")
        if p.suffix.lower() not in _IMAGE_EXTENSIONS:
            raise ValueError(
                f"{p}: unknown image extension {p.suffix!r}; allowed: {list(_IMAGE_EXTENSIONS)}"
            )
        files.append(p)
    return files


def _load_folder(path: Path) -> Dataset:
    entries = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")]
    if not entries:
        raise ValueError(f"{path}: the folder is empty")
    dirs = [p for p in entries if p.is_dir()]
    if dirs and len(dirs) != len(entries):
        loose = next(p for p in entries if not p.is_dir())
        raise ValueError(
            f"{path}: mixes class subfolders ({dirs[0].name}, ...) with loose files ({loose.name}, "
            "...); put every image in a class folder, or use no subfolders"
        )
    if dirs:
        class_names = tuple(d.name for d in dirs)
        files, labels = [], []
        for k, d in enumerate(dirs):
            found = _image_files(d)
            if not found:
                raise ValueError(f"{d}: the class folder is empty")
            files += found
            labels += [k] * len(found)
    else:
        class_names, files, labels = (), _image_files(path), []

    images = []
    for p in files:
        arr = _read_image(p)
        if images and arr.shape[:2] != images[0].shape[:2]:
            h0, w0 = images[0].shape[:2]
            raise ValueError(
                f"{p}: image size {arr.shape[1]}x{arr.shape[0]} (WxH) differs from the first image "
                f"{files[0]} ({w0}x{h0}); all images must have the same size"
            )
        images.append(arr)
    if any(a.ndim == 3 for a in images):
        images = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in images]
    raw = np.stack(images)
    layout = "NHWC" if raw.ndim == 4 else "NHW"
    label_t = torch.tensor(labels) if dirs else None
    return _image_dataset(
        raw, layout, (0.0, 255.0), str(path), label_t, len(class_names), class_names
    )


# --------------------------------------------------------------------------------------------------
# Public entry points.


def load(name_or_path: str | os.PathLike, *, seed: int = 0) -> Dataset:
    """Load a built-in data set by name (``BUILTIN``) or a user's ``.npy`` / ``.csv`` / image folder.

    Args:
        name_or_path: a name in ``BUILTIN`` or a path.
        seed: seeds the generated 2-D data sets (the same seed gives the same points).

    Raises:
        ValueError: unknown name or extension, or a file that cannot be read as documented in the
            module docstring (the message names the file and the problem).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    name = os.fspath(name_or_path)
    if name in BUILTIN:
        return BUILTIN[name](name, seed)
    path = Path(name)
    if not path.exists():
        raise ValueError(
            f"{name!r} is neither a built-in data set nor an existing path; built-in: "
            f"{sorted(BUILTIN)}; files: {list(_FILE_EXTENSIONS)} or a folder of images "
            f"({', '.join(_IMAGE_EXTENSIONS)})"
        )
    if path.is_dir():
        return _load_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".csv":
        return _load_csv(path)
    raise ValueError(
        f"{path}: unknown extension {path.suffix!r}; allowed: {list(_FILE_EXTENSIONS)} or a folder "
        f"of images ({', '.join(_IMAGE_EXTENSIONS)})"
    )


def split(dataset: Dataset, *, holdout: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split into ``(train, test)`` deterministically, holding out a fraction ``holdout``.

    With labels the split is stratified: each class keeps ``round(holdout * n_class)`` examples in the
    test part. Both parts keep the original order and share ``dataset.normalization`` (computed on the
    whole set). ``holdout_mask`` gives the held-out rows as a mask ``[N]``.
    """
    is_test = holdout_mask(dataset, holdout=holdout, seed=seed)
    return dataset._subset((~is_test).nonzero().flatten()), dataset._subset(
        is_test.nonzero().flatten()
    )


def holdout_mask(dataset: Dataset, *, holdout: float = 0.2, seed: int = 0) -> Tensor:
    """The rows ``split`` holds out, as a bool mask ``[N]`` (True: test)."""
    if not 0.0 < float(holdout) < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout!r}")
    g = torch.Generator().manual_seed(seed)
    n = len(dataset)
    groups = (
        [torch.arange(n)]
        if dataset.labels is None
        else [(dataset.labels == k).nonzero().flatten() for k in range(dataset.num_classes)]
    )
    test_parts = []
    for idx in groups:
        k = round(holdout * len(idx))
        test_parts.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[torch.cat(test_parts)] = True
    if is_test.all() or not is_test.any():
        raise ValueError(
            f"holdout={holdout} leaves an empty {'train' if is_test.all() else 'test'} part for "
            f"{n} examples"
        )
    return is_test
