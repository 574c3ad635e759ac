"""Inverse problems: measurement operators and posterior samplers with a diffusion prior."""

from __future__ import annotations

from scorekit.inverse.operators import (
    OPERATORS,
    Blur,
    Compose,
    Downsample,
    Identity,
    Mask,
    Matrix,
    Operator,
    Saturate,
    as_matrix,
)

__all__ = [
    "OPERATORS",
    "Blur",
    "Compose",
    "Downsample",
    "Identity",
    "Mask",
    "Matrix",
    "Operator",
    "Saturate",
    "as_matrix",
]
