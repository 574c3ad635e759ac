"""Operators named by a string, for the command line and the demo: ``named("inpaint-left", shape)``.

A spec is ``NAME`` or ``NAME:key=value,key=value``; ``shape`` is one sample's shape (``[C, H, W]`` for
images, ``[d]`` for vectors):

==================  ===========================================================================
name                operator
==================  ===========================================================================
denoise             ``Identity`` (the measurement is the noisy sample itself)
inpaint-left        ``Mask``: the left half of every image missing (vectors: the first half);
inpaint-right       likewise ``-right``, ``-top``, ``-bottom`` (images only for top and bottom)
inpaint-box         ``Mask`` with a missing rectangle ``top, left, height, width`` (default: the
                    centred box of half the height and width)
inpaint-random      ``Mask`` with a fraction ``p`` (default 0.5) of values missing, drawn with ``seed``
downsample-N        ``Downsample(N)``: N x N average pooling (images; N divides H and W)
blur-gauss          ``Blur(sigma=...)`` Gaussian blur (default ``sigma = 1`` pixel), circular padding, or
                    reflect padding with ``reflect=1`` (no SVD then)
blur-uniform        ``Blur(size=...)`` box blur (default ``size = 3``, odd); ``reflect=1`` as above
==================  ===========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from scorekit.inverse.operators import Blur, Downsample, Identity, Mask, Operator

__all__ = ["NAMES", "named"]

NAMES = ("denoise", "inpaint-left", "inpaint-right", "inpaint-top", "inpaint-bottom", "inpaint-box",
         "inpaint-random", "downsample-N", "blur-gauss", "blur-uniform")  # fmt: skip
_KEYS = {"inpaint-box": ("top", "left", "height", "width"), "inpaint-random": ("p", "seed"),
         "blur-gauss": ("sigma", "reflect"), "blur-uniform": ("size", "reflect")}  # fmt: skip


def _parse(spec: str) -> tuple[str, dict[str, float]]:
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"operator must be a name like 'inpaint-left'; got {spec!r}")
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq:
            raise ValueError(f"operator {spec!r}: parameters are key=number pairs; got {item!r}")
    return name, params


def _image(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"operator {name!r} needs image data [C, H, W]; got shape {list(shape)}")
    return shape  # type: ignore[return-value]


def _half_mask(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.float64)
    side = name.split("-")[1]
    if len(shape) == 1 and side in ("left", "right"):
        h = shape[0] // 2
        mask[:h] = 0 if side == "left" else 1
        mask[h:] = 1 if side == "left" else 0
        return mask
    _, hh, ww = _image(name, shape)
    if side == "left":
        mask[..., : ww // 2] = 0
    elif side == "right":
        mask[..., ww // 2 :] = 0
    elif side == "top":
        mask[..., : hh // 2, :] = 0
    else:
        mask[..., hh // 2 :, :] = 0
    return mask


def _padding(p: dict) -> str:
    flag = p.get("reflect", 0)
    if flag not in (0, 1):
        raise ValueError(f"blur: reflect must be 0 (circular padding) or 1 (reflect); got {flag}")
    return "reflect" if flag else "circular"


def named(spec: str, shape: Sequence[int]) -> Operator:
    """The operator named by ``spec`` (module table) for samples of ``shape``; one-line errors."""
    shape = tuple(int(v) for v in shape)
    name, p = _parse(spec)
    base = "downsample-N" if name.startswith("downsample-") else name
    if base not in NAMES:
        raise ValueError(f"unknown operator {name!r}; allowed: {list(NAMES)}")
    allowed = _KEYS.get(base, ())
    for key in p:
        if key not in allowed:
            raise ValueError(
                f"operator {name!r} takes no parameter {key!r}; allowed: {list(allowed)}"
            )
    if base == "denoise":
        return Identity(shape)
    if base in ("inpaint-left", "inpaint-right", "inpaint-top", "inpaint-bottom"):
        return Mask(_half_mask(base, shape))
    if base == "inpaint-random":
        frac = p.get("p", 0.5)
        if not 0 <= frac < 1:
            raise ValueError(
                f"inpaint-random: p (the missing fraction) must be in [0, 1); got {frac}"
            )
        g = torch.Generator().manual_seed(int(p.get("seed", 0)))
        return Mask((torch.rand(shape, generator=g, dtype=torch.float64) >= frac).double())
    _, h, w = _image(name, shape)
    if base == "inpaint-box":
        bh, bw = int(p.get("height", h // 2)), int(p.get("width", w // 2))
        top, left = int(p.get("top", (h - bh) // 2)), int(p.get("left", (w - bw) // 2))
        if not (0 <= top and 0 <= left and bh > 0 and bw > 0 and top + bh <= h and left + bw <= w):
            raise ValueError(
                f"inpaint-box: the box {top},{left} size {bh}x{bw} is not inside {h}x{w}"
            )
        mask = torch.ones(shape, dtype=torch.float64)
        mask[:, top : top + bh, left : left + bw] = 0
        return Mask(mask)
    if base == "downsample-N":
        factor = name.removeprefix("downsample-")
        if not factor.isdigit() or int(factor) < 1:
            raise ValueError(f"operator {name!r}: N must be a positive integer, e.g. downsample-2")
        return Downsample(int(factor), shape)
    if base == "blur-gauss":
        sigma = p.get("sigma", 1.0)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"blur-gauss: sigma must be a finite number > 0; got {sigma}")
        return Blur(shape, sigma=sigma, padding=_padding(p))
    size = p.get("size", 3)
    if size != int(size):
        raise ValueError(f"blur-uniform: size must be an odd positive integer; got {size}")
    return Blur(shape, size=int(size), padding=_padding(p))
