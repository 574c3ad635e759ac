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
start and of the denoiser outputs so far (Euler, DPM-Solver++ 2M/3M, UniPC, DEIS, iPNDM, Heun, ...),
and for a stochastic one once its noise is drawn up front (then ``e_i`` gains ``sum_k gamma_ik z_k``):

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
from scorekit.samplers.common import GeneratorLike, PresetNoise, finish, prepare, randn_like
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
    sampler: str | Callable, sigmas: Tensor, *, with_noise: bool = False, **options
) -> tuple[Tensor, ...]:
    """The affine map of a sampler on ``sigmas``: ``(alpha [M + 1], beta [M + 1, M], levels)`` with
    ``e_i = alpha_i x_0 + sum_{j < i} beta_ij D_j`` (module docstring), ``levels[j]`` the noise level
    of call ``j`` and ``M`` the calls it makes; with ``with_noise=True``, ``(alpha, beta, gamma
    [M + 1, K], levels)`` with ``e_i = alpha_i x_0 + sum_j beta_ij D_j + sum_k gamma_ik z_k``, ``z_k``
    the sampler's ``k``-th noise draw (``K = 0`` for a deterministic sampler).

    One run of ``sampler`` (a registry name or a function with the sampler signature) on ``M + K + 4``
    one-dimensional float64 rows, its noise given by a ``PresetNoise``: row 0 starts at 1 with ``D = 0``
    and ``z = 0`` (``alpha``), row ``1 + j`` starts at 0 with ``D = 1`` at call ``j`` only (column
    ``j`` of ``beta``), row ``1 + M + k`` has ``z = 1`` at draw ``k`` only (column ``k`` of ``gamma``),
    and three rows with random starts, outputs and draws check that the map reproduces what the
    sampler did (a sampler whose points are not affine in these, or whose calls differ per row, is
    refused). The probe's denoiser ignores its input, so the run costs the sampler's arithmetic, no
    network call.

    Raises:
        ValueError: an adaptive sampler; a stochastic one without ``with_noise=True``; a sampler that
            is not a fixed affine map of its start, outputs and draws (named in the message).
    """
    name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "sampler")
    if options.get("statistics") is not None:
        raise ValueError(
            f"{name}: statistics= (dpm_solver_v3's EMS) differ per coordinate, and a step map read "
            "off one coordinate needs them shared; run it without statistics or sequentially"
        )
    if "generator" in options:
        raise TypeError(f"{name}: linear_step_map sets the noise itself; do not pass generator=")
    if isinstance(sampler, str):
        if sampler in ADAPTIVE:
            raise ValueError(
                f"sampler {sampler!r} is adaptive (its calls depend on the data): it has no fixed "
                "step map to iterate"
            )
        if sampler in STOCHASTIC and not with_noise:
            raise ValueError(
                f"sampler {sampler!r} is stochastic: its step map needs its noise draws "
                "(with_noise=True)"
            )
        sampler = get_sampler(sampler)
    g = torch.Generator().manual_seed(0)
    seen: list[tuple[Tensor, Tensor]] = []
    rand: list[Tensor] = []
    rand_z: list[Tensor] = []
    dims = {"m": 0}

    def probe(x: Tensor, sigma: Tensor) -> Tensor:
        k = len(seen)
        seen.append((x[:, 0].clone(), sigma.clone()))
        out = torch.zeros_like(x)
        if k + 1 < x.shape[0] - 3:
            out[k + 1] = 1.0
        rand.append(torch.randn(3, generator=g, dtype=torch.float64))
        out[-3:, 0] = rand[-1]
        return out

    def draw(k: int, x: Tensor) -> Tensor:
        z = torch.zeros_like(x)
        if 1 + dims["m"] + k < x.shape[0] - 3:
            z[1 + dims["m"] + k] = 1.0
        rand_z.append(torch.randn(3, generator=g, dtype=torch.float64))
        z[-3:, 0] = rand_z[-1]
        return z

    def run(rows: int) -> tuple[Tensor, int]:
        seen.clear(), rand.clear(), rand_z.clear()
        x0 = torch.zeros(rows, 1, dtype=torch.float64)
        x0[0], x0[-3:, 0] = 1.0, torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
        noise = PresetNoise(draw)
        try:
            return sampler(probe, x0, sigmas, generator=noise, **options), noise.count
        except TypeError as e:
            if "generator" not in str(e):
                raise
            raise TypeError(
                f"sampler {name}: needs a generator= keyword (None for a deterministic sampler) "
                "to have its step map read; got a function without one"
            ) from None

    out, kz = run(4)  # counts the calls M and the draws K
    m = dims["m"] = len(seen)
    if kz and not with_noise:
        raise ValueError(f"{name} draws noise: its step map needs with_noise=True")
    out, kz2 = run(m + kz + 4)
    if len(seen) != m or kz2 != kz:
        raise ValueError(
            f"{name} made {m} calls and {kz} draws, then {len(seen)} and {kz2} on the same sigmas"
        )
    points = [e for e, _ in seen] + [out[:, 0]]
    alpha = torch.stack([e[0] for e in points])
    beta = torch.stack([e[1 : m + 1] for e in points])
    gamma = torch.stack([e[m + 1 : m + 1 + kz] for e in points])
    levels = []
    for _, sig in seen:
        if not bool((sig == sig[0]).all()):
            raise ValueError(f"{name} calls the denoiser at different levels per row")
        levels.append(float(sig[0]))
    d = torch.stack(rand, 1) if m else torch.zeros(3, 0, dtype=torch.float64)  # [3, M]
    z = torch.stack(rand_z, 1) if kz else torch.zeros(3, 0, dtype=torch.float64)  # [3, K]
    start = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)
    want = alpha[:, None] * start + beta @ d.T + gamma @ z.T
    got = torch.stack([e[-3:] for e in points])
    if not torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max().clamp(min=1))):
        raise ValueError(
            f"{name} is not a fixed affine map of its start, denoiser outputs and noise draws on "
            "these sigmas (parallel_sample needs one)"
        )
    return (alpha, beta, gamma, levels) if with_noise else (alpha, beta, levels)


def parallel_sample(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    sampler: str | Callable = "dpmpp_2m",
    window: int | None = None,
    tol: float = 1e-3,
    generator: GeneratorLike = None,
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

    Stochastic samplers (ParaDiGMS, Sec. 3: the noise of every step is drawn up front): the sampler's
    ``K`` draws ``z_k`` are taken first, in its own order, from ``generator``, and the map gains the
    term ``sum_k gamma_ik z_k`` (``linear_step_map(with_noise=True)``), a fixed part of every point.
    The trajectory is then a deterministic function of ``(x_0, z_1 .. z_K)`` and the iteration
    converges to the sequential sampler run with the same ``generator`` (the same seed, or a
    ``PresetNoise`` of the same draws: a ``PresetNoise`` is used up by one run, so give each run a
    fresh one; one that has handed out draws already is refused). This covers every stochastic sampler in the registry whose points are affine in
    its start, outputs and draws on fixed ``sigmas`` (``euler_ancestral``, ``euler_maruyama``,
    ``dpmpp_2m_sde``, ``dpmpp_3m_sde``, ``sa_solver``, ``edm_stochastic``, ``restart``, ...); an
    adaptive one (``adaptive_sde``, ``adaptive_ode``) or one that is not affine is refused by name.

    Args:
        x: ``[B, ...]`` at ``sigmas[0]``; ``sigmas``: as for every sampler.
        sampler: a registry name (default ``dpmpp_2m``) or a sampler function; ``options``: its
            options.
        window: points per round (default: all ``M``); ``tol``: the per-point tolerance above.
        generator: the stochastic sampler's noise, as for the sampler itself (``None``, a
            ``torch.Generator``, ``B`` generators, or a ``PresetNoise``); unused by a deterministic one.
        stats: if given, filled with ``rounds`` (sequential batched denoiser calls), ``evaluations``
            (points denoised per sample in total), ``steps`` (``M``, the sequential sampler's calls)
            and ``draws`` (``K``, its noise draws).

    Returns:
        ``[B, ...]``: the sample, equal to the sequential sampler's within the tolerance. The rows
        share the window, so a row's result can differ with its batch, within the tolerance.

    References:
        Shih, Belkhale, Ermon, Sadigh & Anari, "Parallel Sampling of Diffusion Models", NeurIPS
        2023, Sec. 3-4 (Picard iteration of a sampler's fixed step map, sliding window, tolerance).
    """
    check_number("tol", tol, low=0)
    if isinstance(generator, PresetNoise) and generator.count:
        raise ValueError(
            f"generator: this PresetNoise has handed out {generator.count} draws already (a "
            "PresetNoise is used up by one run); allowed: a fresh PresetNoise of the same draws"
        )
    s, _ = prepare(denoiser, x, sigmas)
    sig64 = torch.tensor(s, dtype=torch.float64)
    alpha, beta, gamma, levels = linear_step_map(sampler, sig64, with_noise=True, **options)
    m, kz = len(levels), gamma.shape[1]
    p = min(m, m if window is None else check_int("window", window, least=1))
    batch, flat = x.shape[0], x.reshape(x.shape[0], -1)
    a, b = alpha.to(x.dtype).to(x.device), beta.to(x.dtype).to(x.device)
    fixed = a[:, None, None] * flat  # [M + 1, B, F]: the start's and the noise's part of each point
    if kz:
        z = torch.stack([randn_like(x, generator).reshape(flat.shape) for _ in range(kz)])
        fixed = fixed + torch.einsum("ik,kbf->ibf", gamma.to(x.dtype).to(x.device), z)
    pts = fixed  # every point from D = 0 as the first guess
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
        new = fixed + torch.einsum("ij,jbf->ibf", b, d)
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
        stats.update(rounds=rounds, evaluations=evals, steps=m, draws=kz)
    return finish(pts[m].reshape(x.shape))
