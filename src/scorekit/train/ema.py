"""Exponential moving average of a network's weights (the weights used for sampling).

After each optimiser step ``theta_ema <- beta * theta_ema + (1 - beta) * theta``. ``beta`` is either
a fixed decay per step or set by a half-life counted in training examples, as in EDM:
``beta = 0.5 ** (batch / halflife)``, so the average forgets half its past after ``halflife``
examples whatever the batch size. An optional ramp-up caps the half-life at ``rampup * nimg`` early
in training (``nimg`` = examples seen so far), so the average is not dominated by the random
initialisation.

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022
    (Appendix F.3 / Table 7: EMA half-life and ramp-up). Polyak & Juditsky, "Acceleration of
    Stochastic Approximation by Averaging", SIAM J. Control Optim. 1992.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "ema_beta"]


def ema_beta(ema: float, *, batch: int, nimg: int, rampup: float | None = 0.05) -> float:
    """The EMA factor ``beta`` of one step.

    Args:
        ema: a per-step decay if ``0 <= ema < 1`` (``0``: EMA = current weights); a half-life in
            training examples if ``ema >= 1``.
        batch: examples per optimiser step (global batch).
        nimg: examples seen after this step (for the ramp-up).
        rampup: cap the half-life at ``rampup * nimg`` (``None``: no cap). Half-life mode only.
    """
    if not ema >= 0:
        raise ValueError(
            f"ema must be a decay in [0, 1) or a half-life >= 1 in examples, got {ema}"
        )
    if ema < 1:
        return float(ema)
    halflife = ema if rampup is None else min(ema, rampup * nimg)
    return 0.5 ** (batch / max(halflife, 1e-8))


class EMA:
    """An averaged copy of ``model`` (``EMA.module``), updated in place by ``update``.

    Parameters are averaged; buffers (e.g. normalisation statistics) are copied.
    """

    def __init__(self, model: nn.Module):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, beta: float) -> None:
        """``ema <- beta * ema + (1 - beta) * model`` for every parameter; buffers copied."""
        ema_p = list(self.module.parameters())
        p = [q.detach() for q in model.parameters()]
        if beta == 0.0:
            torch._foreach_copy_(ema_p, p)
        else:
            torch._foreach_lerp_(ema_p, p, 1.0 - beta)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
