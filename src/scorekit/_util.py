"""Small helpers shared by every layer: broadcasting, sigma validation, the ODE drift, number
validation, name lookup in a registry, seed mixing and atomic file writes.

Everything here works in the sigma frame of DESIGN.md: ``x = x0 + sigma * noise``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "append_dims",
    "as_sigma",
    "atomic_write",
    "atomic_write_json",
    "check_finite",
    "check_int",
    "check_number",
    "lookup",
    "mix_seed",
    "to_d",
]

V = TypeVar("V")


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dimensions so ``v`` of shape ``[B]`` broadcasts against rank ``ndim``.

    Works for any rank (2-D tabular data and 4-D images alike), unlike ``v[:, None, None, None]``.
    """
    missing = ndim - v.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of rank {v.ndim} to rank {ndim}")
    return v.reshape(*v.shape, *([1] * missing))


def as_sigma(sigma: Tensor | float, x: Tensor, *, name: str = "sigma") -> Tensor:
    """Return ``sigma`` as a float tensor of shape ``[B]`` on ``x``'s device and dtype, validated.

    Accepts a Python number, a 0-d tensor (broadcast to the batch) or a ``[B]`` tensor.

    Raises:
        ValueError: if the shape does not match ``x``'s batch, or a value is negative or NaN.
    """
    if x.ndim < 1:
        raise ValueError(f"x must have a batch dimension, got a tensor of shape {tuple(x.shape)}")
    batch = x.shape[0]
    if not isinstance(sigma, Tensor):
        if not isinstance(sigma, numbers.Real) or isinstance(sigma, bool):
            raise TypeError(f"{name} must be a number or a tensor, got {type(sigma).__name__}")
        sigma = torch.full((batch,), float(sigma), device=x.device, dtype=x.dtype)
    else:
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        elif sigma.shape != (batch,):
            raise ValueError(
                f"{name} must be a scalar or have shape [B] = [{batch}] to match x of shape "
                f"{tuple(x.shape)}; got shape {tuple(sigma.shape)}"
            )
    if torch.isnan(sigma).any():
        raise ValueError(f"{name} contains NaN; allowed: values >= 0")
    if (sigma < 0).any():
        raise ValueError(f"{name} must be >= 0; got min {sigma.min().item():.4g}")
    return sigma


def to_d(x: Tensor, sigma: Tensor | float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE drift ``dx/dsigma = (x - D(x, sigma)) / sigma`` (= the noise estimate).

    ``sigma`` is a Python float (the samplers' host-side step values) or a ``[B]`` tensor.
    """
    if isinstance(sigma, Tensor):
        sigma = append_dims(sigma, x.ndim)
    return (x - denoised) / sigma


def check_finite(t: Tensor, what: str) -> Tensor:
    """Raise a clear error if ``t`` holds NaN or inf, instead of letting it spread silently."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten()
        raise FloatingPointError(
            f"{what} is not finite (NaN or inf) for batch rows {bad[:10].tolist()}"
            + (" ..." if bad.numel() > 10 else "")
        )
    return t


LOG_2PI = math.log(2 * math.pi)


# -- validation of user-given numbers and names ---------------------------------------------------


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_ok: bool = True,
    high_ok: bool = True,
    finite: bool = True,
    what: str = "",
) -> float:
    """``value`` as a finite float in the interval ``low .. high``, or a one-line error.

    ``low_ok`` / ``high_ok`` say whether the ends are allowed; ``finite=False`` admits ``+-inf``
    when the interval does. ``what`` is a short explanation put
    after the name (e.g. ``" (the intermediate point as a fraction of the step)"``).
    Raises TypeError for a non-number (``bool`` included), ValueError for NaN, inf or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}{what} must be a number; got {type(value).__name__} {value!r}")
    v = float(value)
    inside = (v >= low if low_ok else v > low) and (v <= high if high_ok else v < high)
    if math.isnan(v) or not inside or (finite and math.isinf(v)):
        if high == math.inf:
            allowed = f"a {'finite ' if finite else ''}number {'>=' if low_ok else '>'} {low:g}"
        elif low == -math.inf:
            allowed = f"a {'finite ' if finite else ''}number {'<=' if high_ok else '<'} {high:g}"
        else:
            allowed = f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        raise ValueError(f"{name}{what} must be {allowed}; got {value!r}")
    return v


def check_int(name: str, value: Any, *, least: int = 1, most: int | None = None) -> int:
    """``value`` as an int with ``least <= value <= most`` (``bool`` is refused), or a one-line error."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < least or (most is not None and value > most):
        allowed = f"an integer >= {least}" if most is None else f"an integer in [{least}, {most}]"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return int(value)


def lookup(table: Mapping[str, V], name: Any, what: str) -> V:
    """``table[name]``, or a one-line ValueError naming ``what`` was asked for and what is allowed."""
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {what} {name!r}; allowed: {sorted(table)}")
    return table[name]


# -- seeds ----------------------------------------------------------------------------------------


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from integers by numpy's ``SeedSequence`` hashing: nearby inputs give unrelated
    streams, and ``mix_seed(seed, i)`` is the seed of sample ``i`` in ``scorekit.sample``."""
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in ints]
    a, b = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return ((int(a) << 32) | int(b)) & (2**63 - 1)


# -- files ----------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    A temporary file in the same folder is written, flushed to disk and renamed over ``path``; the
    folder entry is synced too. The file gets the permissions of an ordinary new file under the
    user's umask (``mkstemp`` alone would leave it 0600).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _naming(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _naming(e, path) from None
        raise
    _fsync_dir(path.parent)


def _naming(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` (the file the caller asked for), not the hidden temporary file."""
    if e.errno is None:
        return e
    return type(e)(e.errno, e.strerror, str(path))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``atomic_write`` of ``obj`` as indented, key-sorted JSON with a final newline."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
