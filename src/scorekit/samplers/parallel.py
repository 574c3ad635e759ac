"""Parallel sampling: Picard iterations over the whole trajectory (ParaDiGMS), in the sigma frame.

A sequential sampler takes ``N`` rounds of denoiser calls, one per step. Written as
``x_{i+1} = x_i + Delta_i(x_i)``, the whole trajectory is the fixed point of

    x_{t+j}^{k+1} = x_t^k + sum_{i=t}^{t+j-1} Delta_i(x_i^k),        j = 1 .. p,

so one batched denoiser call on a window of ``p`` states updates all of them at once (a Picard
iteration). After ``k`` rounds the first ``k`` states of the window are exactly the sequential ones;
in practice the window converges much sooner, slides past the states whose change fell below the
tolerance, and the sample needs far fewer sequential rounds than steps, at the price of more
denoiser evaluations in total (``p`` states per round).

The same holds for any sampler whose points of evaluation and result are fixed affine maps of the
start and of the denoiser outputs so far (Euler, DPM-Solver++ 2M/3M, UniPC, DEIS, iPNDM, Heun, ...):

    e_i = alpha_i x_0 + sum_{j < i} beta_{ij} D(e_j, sigma^(j)),     i = 0 .. M,

``e_0 .. e_{M-1}`` the ``M`` points where the sequential sampler calls the denoiser and ``e_M`` its
result. ``linear_step_map`` reads ``alpha, beta`` and the call levels off one probing run of the
sampler (a batch of unit inputs, checked on random ones), and ``parallel_sample`` runs the Picard
iteration on the calls: each round denoises a window of points at once and recomputes every later
point from the map. The linear part is exact (no Picard error from it), only the denoiser's
dependence on the points is iterated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, check_int, check_number
from scorekit.samplers.common import finish, prepare
from scorekit.samplers.registry import ADAPTIVE, STOCHASTIC, get_sampler

__all__ = ["linear_step_map", "parallel_euler", "parallel_sample"]


def _checked(d, xs: Tensor) -> Tensor:
    """The denoiser's output for the stacked points ``xs``, or a one-line error if it is not a tensor
    of their shape and dtype."""
    if not isinstance(d, Tensor) or d.shape != xs.shape or d.dtype != xs.dtype:
        got = f"{tuple(d.shape)} {d.dtype}" if isinstance(d, Tensor) else type(d).__name__
        raise ValueError(f"denoiser must return a tensor of x's shape and dtype; got {got}")
    return d


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
        d = _checked(
            denoiser(xs, torch.cat([x.new_full((batch,), s[i]) for i in range(t, t + w)])), xs
        )
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


def linear_step_map(
    sampler: str | Callable, sigmas: Tensor, **options
) -> tuple[Tensor, Tensor, list[float]]:
    """The affine map of a deterministic sampler on ``sigmas``: ``(alpha [M + 1], beta [M + 1, M],
    levels)`` with ``e_i = alpha_i x_0 + sum_{j < i} beta_ij D_j`` (module docstring), ``levels[j]``
    the noise level of call ``j`` and ``M`` the calls it makes.

    One run of ``sampler`` (a registry name or a function with the sampler signature) on ``M + 4``
    one-dimensional float64 rows: row 0 starts at 1 with ``D = 0`` (``alpha``), row ``1 + k`` starts
    at 0 with ``D = 1`` at call ``k`` only (column ``k`` of ``beta``), and three rows with random
    starts and outputs check that the map reproduces what the sampler did (a sampler whose points
    are not affine in these, or whose calls differ per row, is refused). The probe's denoiser
    ignores its input, so the run costs the sampler's arithmetic, no network call.

    Raises:
        ValueError: a stochastic or adaptive sampler, or a sampler that is not a fixed affine map.
    """
    name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "sampler")
    if options.get("statistics") is not None:
        raise ValueError(
            f"{name}: statistics= (dpm_solver_v3's EMS) differ per coordinate, and a step map read "
            "off one coordinate needs them shared; run it without statistics or sequentially"
        )
    if isinstance(sampler, str):
        if sampler in STOCHASTIC or sampler in ADAPTIVE:
            raise ValueError(
                f"sampler {sampler!r} is stochastic or adaptive: it has no fixed step map to iterate"
            )
        sampler = get_sampler(sampler)
    g = torch.Generator().manual_seed(0)
    seen: list[tuple[Tensor, Tensor]] = []
    rand: list[Tensor] = []

    def probe(x: Tensor, sigma: Tensor) -> Tensor:
        k = len(seen)
        seen.append((x[:, 0].clone(), sigma.clone()))
        out = torch.zeros_like(x)
        if k + 1 < x.shape[0] - 3:
            out[k + 1] = 1.0
        rand.append(torch.randn(3, generator=g, dtype=torch.float64))
        out[-3:, 0] = rand[-1]
        return out

    def run(rows: int) -> Tensor:
        seen.clear(), rand.clear()
        x0 = torch.zeros(rows, 1, dtype=torch.float64)
        x0[0], x0[-3:, 0] = 1.0, torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
        return sampler(probe, x0, sigmas, **options)

    out = run(4)  # counts the calls M
    m = len(seen)
    out = run(m + 4)
    if len(seen) != m:
        raise ValueError(f"{name} made {m} and then {len(seen)} calls on the same sigmas")
    points = [e for e, _ in seen] + [out[:, 0]]
    alpha = torch.stack([e[0] for e in points])
    beta = torch.stack([e[1 : m + 1] for e in points])
    levels = []
    for _, sig in seen:
        if not bool((sig == sig[0]).all()):
            raise ValueError(f"{name} calls the denoiser at different levels per row")
        levels.append(float(sig[0]))
    d = torch.stack(rand, 1) if m else torch.zeros(3, 0, dtype=torch.float64)  # [3, M]
    want = alpha[:, None] * torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64) + beta @ d.T
    got = torch.stack([e[-3:] for e in points])
    if not torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max().clamp(min=1))):
        raise ValueError(
            f"{name} is not a fixed affine map of its start and denoiser outputs on these sigmas "
            "(parallel_sample needs one)"
        )
    return alpha, beta, levels


def parallel_sample(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    sampler: str | Callable = "dpmpp_2m",
    window: int | None = None,
    tol: float = 1e-3,
    stats: dict | None = None,
    **options,
) -> Tensor:
    """``sampler`` on ``sigmas`` by Picard iterations over its denoiser calls (ParaDiGMS, general form).

    With the sampler's affine map ``e_i = alpha_i x_0 + sum_{j < i} beta_ij D_j`` (``linear_step_map``;
    ``e_0 .. e_{M-1}`` its points of evaluation, ``e_M`` its result), each round evaluates
    ``D_j = D(e_j, sigma^(j))`` for the ``window`` points ``t .. t + p - 1`` in one batched call
    (``[p B, ...]``), sets the outputs of the later, not yet evaluated calls to the last one
    evaluated, recomputes every point ``e_{t+1} .. e_M`` from the map, and slides ``t`` to the first
    point of the window whose squared change per coordinate, in the worst row, exceeds ``tol^2
    sigma^2`` (``tol^2`` at ``sigma = 0``). ``e_{t+1}`` is exact after every round, so it ends after at
    most ``M`` rounds; with ``tol = 0`` it is the sequential sampler (to rounding).

    Args:
        x: ``[B, ...]`` at ``sigmas[0]``; ``sigmas``: as for every sampler.
        sampler: a deterministic registry name (default ``dpmpp_2m``) or a sampler function;
            ``options``: its options.
        window: points per round (default: all ``M``); ``tol``: the per-point tolerance above.
        stats: if given, filled with ``rounds`` (sequential batched denoiser calls), ``evaluations``
            (points denoised per sample in total) and ``steps`` (``M``, the sequential sampler's calls).

    Returns:
        ``[B, ...]``: the sample, equal to the sequential sampler's within the tolerance. The rows
        share the window, so a row's result can differ with its batch, within the tolerance.

    References:
        Shih, Belkhale, Ermon, Sadigh & Anari, "Parallel Sampling of Diffusion Models", NeurIPS
        2023, Sec. 3-4 (Picard iteration of a sampler's fixed step map, sliding window, tolerance).
    """
    check_number("tol", tol, low=0)
    s, _ = prepare(denoiser, x, sigmas)
    alpha, beta, levels = linear_step_map(sampler, torch.tensor(s, dtype=torch.float64), **options)
    m = len(levels)
    p = min(m, m if window is None else check_int("window", window, least=1))
    batch, flat = x.shape[0], x.reshape(x.shape[0], -1)
    a, b = alpha.to(x.dtype).to(x.device), beta.to(x.dtype).to(x.device)
    pts = a[:, None, None] * flat  # [M + 1, B, F]: every point from D = 0 as the first guess
    d = torch.zeros(m, *flat.shape, dtype=x.dtype, device=x.device)
    t, rounds, evals = 0, 0, 0
    while t < m:
        w = min(p, m - t)
        xs = pts[t : t + w].reshape(w * batch, *x.shape[1:])
        sig = torch.cat([x.new_full((batch,), levels[j]) for j in range(t, t + w)])
        out = _checked(denoiser(xs, sig), xs)
        rounds, evals = rounds + 1, evals + w
        d[t : t + w] = out.reshape(w, *flat.shape)
        d[t + w :] = d[t + w - 1]  # calls not evaluated yet: the latest output
        new = a[:, None, None] * flat + torch.einsum("ij,jbf->ibf", b, d)
        stride = w
        for j in range(1, w):  # point t + j was evaluated this round: did it move?
            scale = levels[t + j] ** 2 if levels[t + j] > 0 else 1.0
            change = (new[t + j] - pts[t + j]).square().mean(1).max()
            if float(change) > tol**2 * scale:
                stride = j
                break
        pts = new
        t += stride
    if stats is not None:
        stats.update(rounds=rounds, evaluations=evals, steps=m)
    return finish(pts[m].reshape(x.shape))
