"""Parallel sampling: Picard iterations over the whole trajectory (ParaDiGMS), in the sigma frame.

A sequential sampler takes ``N`` rounds of denoiser calls, one per step. Written as
``x_{i+1} = x_i + Delta_i(x_i)``, the whole trajectory is the fixed point of

    x_{t+j}^{k+1} = x_t^k + sum_{i=t}^{t+j-1} Delta_i(x_i^k),        j = 1 .. p,

so one batched denoiser call on a window of ``p`` states updates all of them at once (a Picard
iteration). After ``k`` rounds the first ``k`` states of the window are exactly the sequential ones;
in practice the window converges much sooner, slides past the states whose change fell below the
tolerance, and the sample needs far fewer sequential rounds than steps, at the price of more
denoiser evaluations in total (``p`` states per round).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, check_int, check_number
from scorekit.samplers.common import finish, prepare

__all__ = ["parallel_euler"]


def parallel_euler(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    window: int | None = None,
    tol: float = 1e-3,
    stats: dict | None = None,
) -> Tensor:
    """``euler`` (DDIM) on ``sigmas`` by Picard iterations over a sliding window (ParaDiGMS, Alg. 1).

    Step ``i`` is ``Delta_i(x) = (sigma_{i+1} / sigma_i - 1) (x - D(x, sigma_i))`` (the last one,
    to ``sigma = 0``, gives ``x = D``). Each round evaluates the denoiser once, batched over the
    ``window`` states of the window (``[p B, ...]``), replaces them by ``x_t + cumsum(Delta)``, and
    slides the window to the first state whose squared change per coordinate, in the worst row of
    the batch, exceeds ``tol^2 sigma^2`` (``tol^2`` at ``sigma = 0``); at least one state is exact per
    round, so the loop ends after at most ``N`` rounds, and with ``tol = 0`` it reproduces ``euler``
    exactly (to rounding). New window states start from the last state computed.

    Args:
        x: ``[B, ...]`` at ``sigmas[0]``; ``sigmas``: as for every sampler.
        window: states per round (default: all ``N``); ``tol``: the per-state tolerance above.
        stats: if given, filled with ``rounds`` (sequential batched calls), ``evaluations`` (states
            denoised per sample in total) and ``steps`` (``N``, the rounds of ``euler``).

    Returns:
        ``[B, ...]``: the sample, equal to ``euler``'s within the tolerance. The rows share the
        window, so a row's result can differ with its batch, within the tolerance. Not in
        ``REGISTRY``: it is a way to run ``euler``, whose cost is rounds (latency) and evaluations
        (work), not a fixed NFE.

    References:
        Shih, Belkhale, Ermon, Sadigh & Anari, "Parallel Sampling of Diffusion Models", NeurIPS
        2023, Sec. 3 and Alg. 1 (ParaDiGMS: Picard iterations, sliding window, tolerance scaled by
        the noise variance).
    """
    check_number("tol", tol, low=0)
    s, _ = prepare(denoiser, x, sigmas)
    n = len(s) - 1
    p = min(n, n if window is None else check_int("window", window, least=1))
    batch = x.shape[0]
    traj = [x] + [x.clone() for _ in range(n)]  # states at sigmas[0 .. N]
    t, rounds, evals = 0, 0, 0
    while t < n:
        w = min(p, n - t)
        xs = torch.cat(traj[t : t + w])
        d = denoiser(xs, torch.cat([x.new_full((batch,), s[i]) for i in range(t, t + w)]))
        if not isinstance(d, Tensor) or d.shape != xs.shape or d.dtype != xs.dtype:
            got = f"{tuple(d.shape)} {d.dtype}" if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"denoiser must return a tensor of x's shape and dtype; got {got}")
        rounds, evals = rounds + 1, evals + w
        ratio = torch.tensor([s[i + 1] / s[i] - 1 for i in range(t, t + w)], dtype=x.dtype)
        delta = append_dims(ratio.repeat_interleave(batch).to(x.device), x.ndim) * (xs - d)
        cum = torch.cumsum(delta.reshape(w, *x.shape), 0)
        stride = w
        for j in range(w):  # state t + 1 + j; the first not yet converged sets the stride
            new = traj[t] + cum[j]
            scale = s[t + 1 + j] ** 2 if s[t + 1 + j] > 0 else 1.0
            change = (new - traj[t + 1 + j]).square().reshape(batch, -1).mean(1).max()
            if stride == w and float(change) > tol**2 * scale:
                stride = max(1, j)
            traj[t + 1 + j] = new
        for k in range(t + w + 1, min(t + stride + w, n) + 1):  # new window states: the last one
            traj[k] = traj[t + w].clone()
        t += stride
    if stats is not None:
        stats.update(rounds=rounds, evaluations=evals, steps=n)
    return finish(traj[n])
