"""One evaluation problem (a target, its noise and the exact ODE solution) and how a run is measured."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scorekit.analytic import target
from scorekit.pfode import pf_ode_reference
from scorekit.process import DiscreteProcess

__all__ = ["Counted", "Problem", "diagnostics", "rms_error"]


def rms_error(x: Tensor, ref: Tensor) -> float:
    """``sqrt(mean_b |x_b - ref_b|^2 / d)``: RMS distance per coordinate, in data units."""
    diff = (x - ref).reshape(x.shape[0], -1)
    return float(diff.square().mean().sqrt())


def diagnostics(gm, out: Tensor, ref: Tensor, ref_comp: Tensor) -> dict:
    """Mode flips (samples whose most likely component differs from the reference's) and the median
    per-sample RMS error: the RMS is dominated by the few samples that flip."""
    if not torch.isfinite(out).all():
        return {"flips": -1, "median": math.nan, "error_without_flips": math.nan}
    per = (out - ref).reshape(out.shape[0], -1).square().mean(1)
    flips = gm.responsibilities(out, 0.0).argmax(1) != ref_comp
    kept = per[~flips]
    return {
        "flips": int(flips.sum()),
        "median": float(per.sqrt().median()),
        "error_without_flips": float(kept.mean().sqrt()) if kept.numel() else math.nan,
    }


class Counted:
    """A denoiser that counts its calls."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.denoiser(x, sigma)


@dataclass(frozen=True)
class Problem:
    """A target ``gm`` with start noise ``x_t`` ``[B, d]`` at ``sigma_max`` and the exact PF-ODE
    solution ``ref`` ``[B, d]`` from it; ``ref_comp`` ``[B]`` is each solution's nearest component.
    ``sigma_min`` is the last sigma of the fixed schedules (the DDPM table's)."""

    name: str
    gm: object
    x_t: Tensor
    ref: Tensor
    ref_comp: Tensor
    sigma_max: float
    sigma_min: float

    @classmethod
    def draw(cls, name: str, rows: int, seed: int, rtol: float) -> Problem:
        """``rows`` samples of noise from ``seed`` for target ``name``, solved with ``rtol = atol``."""
        table = DiscreteProcess.linear()
        gm = target(name)
        g = torch.Generator().manual_seed(seed)
        x_t = table.sigma_max * torch.randn(rows, gm.dim, generator=g, dtype=torch.float64)
        ref = pf_ode_reference(gm, x_t, table.sigma_max, 0.0, rtol=rtol, atol=rtol)
        ref_comp = gm.responsibilities(ref, 0.0).argmax(1)
        return cls(name, gm, x_t, ref, ref_comp, table.sigma_max, table.sigma_min)

    def diagnostics(self, out: Tensor) -> dict:
        """Flips, median and error without flips of ``out`` ``[B, d]`` (see ``diagnostics``)."""
        return diagnostics(self.gm, out, self.ref, self.ref_comp)
