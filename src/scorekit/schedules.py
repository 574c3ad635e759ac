"""Sigma schedules: functions returning a decreasing ``sigmas`` tensor ``[n + 1]`` that ends in 0.

Every schedule returns ``n`` decreasing positive sigmas from ``sigma_max`` to ``sigma_min``, then 0,
as float64 (or the ``dtype`` asked for). The fixed schedules are registered in ``SCHEDULES`` with the
signature ``(n, sigma_min, sigma_max, **options)``; ``optimized`` needs a denoiser and a sampler, so it
is a separate function (its result can be cached in a JSON file).

================  =================================================================================
schedule          ``sigma_i`` for ``u_i = i / (n - 1)``, ``i = 0 .. n-1``
================  =================================================================================
karras            ``(smax^(1/rho) + u_i (smin^(1/rho) - smax^(1/rho)))^rho``  (EDM eq. 5)
loglinear         ``exp(lerp(log smax, log smin, u_i))``  (uniform log-SNR)
polyexponential   ``exp(log smin + (1 - u_i)^rho (log smax - log smin))``  (rho = 1: loglinear)
uniform_t         ``process.sigma(lerp(t(smax), t(smin), u_i))``  (uniform in a process's time)
two_phase         log-uniform down to ``sigma_split``, then karras (rho) to ``smin``: dense steps
                  where a multimodal distribution's modes separate
optimized         chosen to minimise a sampler's error against the exact ODE solution
================  =================================================================================

References:
    Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022,
    eq. 5 (the rho schedule). Sabour, Fidler & Kreis, "Align Your Steps: Optimizing Sampling Schedules
    in Diffusion Models", ICML 2024 (optimising a schedule per model and sampler). Song et al.,
    "Denoising Diffusion Implicit Models", ICLR 2021 (uniform time steps).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "SCHEDULES",
    "get_schedule",
    "karras",
    "loglinear",
    "optimized",
    "pf_ode_reference",
    "polyexponential",
    "two_phase",
    "uniform_t",
]


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of steps) must be an integer >= 1; got {n!r}")
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf; got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _ramp(n: int) -> Tensor:
    """``u_i = i / (n - 1)`` for ``i = 0 .. n-1`` (``[0.]`` when ``n = 1``), float64."""
    return torch.linspace(0, 1, n, dtype=torch.float64)


def karras(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    *,
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, then 0.

    Returns ``n + 1`` entries: ``n`` decreasing positive sigmas from ``sigma_max`` to ``sigma_min``,
    then 0. With ``n = 1`` the single positive entry is ``sigma_max``.
    """
    _check_range(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    ramp = _ramp(n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).to(dtype=dtype, device=device)


def loglinear(
    n: int, sigma_min: float, sigma_max: float, *, dtype=torch.float64, device=None
) -> Tensor:
    """``n`` sigmas uniform in ``log sigma`` (uniform log-SNR) from ``sigma_max`` to ``sigma_min``, then 0."""
    _check_range(n, sigma_min, sigma_max)
    log_s = torch.lerp(
        torch.tensor(sigma_max, dtype=torch.float64).log(),
        torch.tensor(sigma_min, dtype=torch.float64).log(),
        _ramp(n),
    )
    return _append_zero(log_s.exp()).to(dtype=dtype, device=device)


def polyexponential(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 1.0,
    *,
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """A power ramp in log space: ``log sigma_i = log smin + (1 - u_i)^rho (log smax - log smin)``.

    ``u_i = i / (n - 1)``. ``rho = 1`` is ``loglinear``; ``rho > 1`` takes larger log-steps at high
    noise and smaller ones near ``sigma_min``; ``rho < 1`` the opposite. Then 0 is appended.
    """
    _check_range(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    log_s = lo + (1 - _ramp(n)) ** rho * (hi - lo)
    return _append_zero(log_s.exp()).to(dtype=dtype, device=device)


def uniform_t(
    n: int,
    sigma_min: float,
    sigma_max: float,
    *,
    process="vp",
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """``n`` sigmas uniform in a process's own time ``t``: ``sigma_i = sigma(lerp(t(smax), t(smin), u_i))``.

    ``process`` is a ``scorekit.process.Process`` or a name from ``scorekit.process.PROCESSES``
    (``"ddpm"`` gives DDIM's uniform time steps on DDPM's linear table, continuously interpolated;
    ``"vp"`` Song et al.'s VP SDE). ``sigma_min`` and ``sigma_max`` must lie in the process's range.
    Then 0 is appended.
    """
    from scorekit.process import get_process

    _check_range(n, sigma_min, sigma_max)
    proc = get_process(process)
    lo, hi = proc.sigma_min, proc.sigma_max
    tol = 1e-9 * hi
    if sigma_min < lo * (1 - 1e-9) or sigma_max > hi + tol:
        raise ValueError(
            f"uniform_t: [sigma_min, sigma_max] = [{sigma_min:.6g}, {sigma_max:.6g}] must lie inside "
            f"the range of process {proc!r}"
        )
    ends = proc.t(torch.tensor([sigma_max, sigma_min], dtype=torch.float64))
    t = torch.lerp(ends[0], ends[1], _ramp(n))
    sig = proc.sigma(t)
    # Pin the ends exactly (t(sigma(t)) round trips are accurate, not exact).
    sig[0] = sigma_max
    sig[-1] = sigma_min if n > 1 else sigma_max
    if not (sig[1:] < sig[:-1]).all():
        raise ValueError(f"uniform_t: process {proc!r} gave non-decreasing sigmas for n={n}")
    return _append_zero(sig).to(dtype=dtype, device=device)


def two_phase(
    n: int,
    sigma_min: float,
    sigma_max: float,
    *,
    sigma_split: float | None = None,
    n_low: int | None = None,
    rho: float = 7.0,
    dtype=torch.float64,
    device=None,
) -> Tensor:
    """Log-uniform steps from ``sigma_max`` down to ``sigma_split``, then a karras ramp to ``sigma_min``.

    The first ``n_high = n - n_low`` sigmas are ``sigma_max (sigma_split / sigma_max)^(i / n_high)``,
    ``i = 0 .. n_high-1`` (equal log-steps ending one step above ``sigma_split``); the last ``n_low``
    are ``karras(n_low, sigma_min, sigma_split, rho)`` (starting at ``sigma_split``); then 0.
    Defaults: ``sigma_split = sqrt(sigma_min sigma_max)`` (the middle of the log range) and
    ``n_low = round(0.3 n)`` clamped to ``[2, n - 1]``; ``n >= 3``.

    Why: on a multimodal distribution the probability-flow ODE decides which mode a sample ends in over
    a band of intermediate noise levels (for unit-scale data with well-separated modes, roughly
    sigma 40 down to 2). A sample that starts near the boundary between two basins ends in the wrong
    mode unless the solver is accurate over that whole band, and one such "flip" costs more RMS error
    than all the discretisation error below it. Both karras (rho = 7) and log-linear steps spend most
    of their budget below sigma 1, where a sample's mode is settled. This schedule puts ``n_high``
    equal log-steps across the band and a short karras ramp below it. ``sigma_max`` is where the
    sampler starts (after an analytic teleport, the sigma teleported to). Measured on the 64-D
    mixture ``gmm64`` in ``scorekit bench samplers``, where ``sigma_split`` and ``n_low`` are chosen
    on calibration noise.
    """
    _check_range(n, sigma_min, sigma_max)
    if n < 3:
        raise ValueError(f"two_phase needs n >= 3 steps (two phases and a karras ramp); got n={n}")
    if sigma_split is None:
        sigma_split = math.sqrt(sigma_min * sigma_max)
    if n_low is None:
        n_low = min(n - 1, max(2, round(0.3 * n)))
    if not sigma_min < sigma_split < sigma_max:
        raise ValueError(
            f"sigma_split must lie strictly between sigma_min={sigma_min} and sigma_max={sigma_max}; "
            f"got {sigma_split}"
        )
    if isinstance(n_low, bool) or not isinstance(n_low, int) or not 2 <= n_low <= n - 1:
        raise ValueError(
            f"n_low must be an integer in [2, n - 1] = [2, {n - 1}] (the high phase needs a step and "
            f"the karras ramp must reach sigma_min); got {n_low!r}"
        )
    n_high = n - n_low
    log_hi = torch.lerp(
        torch.tensor(math.log(sigma_max), dtype=torch.float64),
        torch.tensor(math.log(sigma_split), dtype=torch.float64),
        torch.arange(n_high, dtype=torch.float64) / n_high,
    )
    low = karras(n_low, sigma_min, sigma_split, rho=rho)
    return torch.cat([log_hi.exp(), low]).to(dtype=dtype, device=device)


#: Schedule name -> function ``(n, sigma_min, sigma_max, **options) -> sigmas [n + 1]``.
SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "karras": karras,
    "loglinear": loglinear,
    "polyexponential": polyexponential,
    "uniform_t": uniform_t,
    "two_phase": two_phase,
}


def get_schedule(name: str):
    """A schedule function by name (see ``SCHEDULES``; ``optimized`` is called directly)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {sorted(SCHEDULES)}")
    return SCHEDULES[name]


# -- the exact probability-flow ODE solution, the reference every error is measured against --------


def pf_ode_reference(
    denoiser,
    x: Tensor,
    sigma_start: float,
    sigma_end: float = 0.0,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    method: str = "dopri5",
) -> Tensor:
    """Solve the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` tightly (torchdiffeq).

    Integrates in ``sigma`` itself from ``sigma_start`` down to ``sigma_end`` (0 allowed: the drift
    ``-sigma * score`` is smooth there for targets with a density). ``x`` ``[B, ...]`` is the state at
    ``sigma_start``; the result has its shape. Use float64 for tolerances below ~1e-6. ``denoiser`` is
    called with ``sigma`` of shape ``[B]``.

    References:
        Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, eq. 13; Karras et al.
        2022, eq. 4 (the ODE in the sigma frame). Chen, "torchdiffeq", 2018 (the adaptive solver).
    """
    from torchdiffeq import odeint

    if not sigma_start > sigma_end >= 0:
        raise ValueError(f"need sigma_start > sigma_end >= 0; got {sigma_start}, {sigma_end}")
    batch, ndim = x.shape[0], x.ndim

    def drift(s: Tensor, y: Tensor) -> Tensor:
        if float(s) == 0.0:  # the limit of (x - D) / sigma is 0 when sigma -> 0 with a density
            return torch.zeros_like(y)
        # The adaptive solver may step past sigma = 0 and interpolate back. The drift
        # -sigma * score(x; sigma^2) extends smoothly (oddly) to sigma < 0, so use |sigma| in D.
        s_b = s.to(y.dtype).expand(batch)
        return (y - denoiser(y, s_b.abs())) / s_b.reshape(-1, *([1] * (ndim - 1)))

    span = torch.tensor([sigma_start, sigma_end], dtype=x.dtype, device=x.device)
    with torch.no_grad():
        return odeint(drift, x, span, rtol=rtol, atol=atol, method=method)[-1]


# -- the optimised schedule -----------------------------------------------------------------------


def _resolve_sampler(sampler) -> tuple[Callable, str]:
    if callable(sampler):
        return sampler, getattr(sampler, "__name__", type(sampler).__name__)
    if isinstance(sampler, str):
        # Imported here: samplers sit below schedules in the layer order; only ``optimized`` needs them.
        from scorekit.samplers import REGISTRY

        if sampler not in REGISTRY:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {sorted(REGISTRY)}")
        return REGISTRY[sampler], sampler
    raise TypeError(f"sampler must be a name or a function; got {type(sampler).__name__}")


def _warp(z: Tensor, u: Tensor) -> Tensor:
    """A monotone map ``g: [0, 1] -> [0, 1]``, piecewise linear with ``K = len(z)`` equal pieces.

    Piece ``k`` has slope ``K softmax(z)_k``, so ``g(0) = 0``, ``g(1) = 1`` and ``g`` is increasing for
    any ``z``; ``z = 0`` is the identity. Evaluated at ``u`` ``[n]``, differentiably in ``z``.
    """
    k = z.numel()
    knots = torch.cat([z.new_zeros(1), torch.cumsum(torch.softmax(z, 0), 0)])
    pos = u * k
    idx = pos.floor().long().clamp(max=k - 1)
    return torch.lerp(knots[idx], knots[idx + 1], pos - idx.to(u.dtype))


def _cache_key(name: str, n: int, sigma_min, sigma_max, shape, seed, batch, extra: str) -> str:
    return (
        f"{name}|n={n}|smin={sigma_min!r}|smax={sigma_max!r}|shape={list(shape)}|seed={seed}"
        f"|batch={batch}|{extra}"
    )


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def optimized(
    denoiser,
    sampler,
    n: int,
    *,
    sigma_min: float,
    sigma_max: float,
    shape,
    seed: int = 0,
    init: tuple[str, ...] | str = ("karras", "loglinear", "polyexponential"),
    knots: int | None = None,
    free_sigma_min: bool = False,
    starts: list[Tensor] | None = None,
    iterations: int = 40,
    reference_rtol: float = 1e-9,
    cache: str | os.PathLike | None = None,
    cache_key: str = "",
    sampler_options: dict | None = None,
    dtype=torch.float64,
    device=None,
    verbose: bool = False,
) -> Tensor:
    """Sigmas that minimise one sampler's error against the exact probability-flow ODE solution.

    Draws calibration noise ``x_T = sigma_max * z``, ``z ~ N(0, I)`` of ``shape`` ``[B, ...]`` (seeded
    by ``seed``, float64), solves the PF-ODE from it tightly (``pf_ode_reference``) to get ``x_ref``,
    and minimises over schedules

        J(sigmas) = log mean_b |sampler(D, x_T, sigmas)_b - x_ref_b|^2 .

    Parametrisation (every iterate is a valid, ordered schedule). With ``u_i = i / (n - 1)``, a start
    schedule's log-span fraction ``g_0(v)`` (0 at ``sigma_max``, 1 at its last positive sigma,
    piecewise linear between its nodes) and ``L = log(sigma_max / sigma_min)``,

        log sigma_i = log sigma_max - f L g_0(w(u_i)),   w = monotone piecewise-linear warp, K pieces

    whose slopes are ``K softmax(z)`` (``z = 0``: the start schedule itself). ``K = n - 1`` frees every
    interior sigma; fewer knots give a smooth low-dimensional family. ``f = 1`` pins the last positive
    sigma at ``sigma_min``; with ``free_sigma_min`` it is ``f = sigmoid(w_end)``, a free parameter,
    and ``sigma_min`` is a floor.

    Candidate starts: every ``init`` schedule (down to ``sigma_min`` and, with a free end, to 10x and
    100x ``sigma_min``) and the caller's ``starts``; the one with the lowest ``J`` is polished by
    L-BFGS (strong Wolfe line search) with gradients from autograd through the sampler and the
    denoiser when the sampler keeps ``sigmas`` as tensors, otherwise from central finite differences
    (``2 K`` sampler runs per gradient; then ``K = min(n - 1, 6)`` by default). The result is never
    worse on the calibration batch than the best start.

    This is the criterion of "Align Your Steps" (Sabour et al., ICML 2024) made concrete: instead of
    their KL upper bound on the discretisation error, the actual error against the exact solution from
    the same noise, which costs seconds on exact targets and once per model and sampler on a network.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> x0_hat``; called with float64 tensors.
        sampler: a name in ``scorekit.samplers.REGISTRY`` or a sampler function.
        n: number of positive sigmas (the schedule has ``n + 1`` entries).
        sigma_min, sigma_max: the ends of the positive part.
        shape: shape ``[B, ...]`` of the calibration batch (B of 64..256 is typical).
        seed: seed of the calibration noise.
        init: names in ``SCHEDULES`` (default options) tried as the start; the best one is used.
        starts: more start schedules to try (``[n + 1]`` each, from ``sigma_max`` to 0, ending at
            ``sigma_min`` or, with ``free_sigma_min``, above it), e.g. a teleport family for a sampler
            wrapped by ``accelerators.with_teleport``.
        knots: pieces ``K`` of the warp (default: ``n - 1`` with autograd, ``min(n - 1, 6)`` without).
        iterations: L-BFGS iterations.
        reference_rtol: ``rtol = atol`` of the reference solve.
        cache: a JSON file; if it holds this problem's key the stored sigmas are returned, otherwise
            the result is added to it (written atomically).
        cache_key: extra text naming the denoiser in the cache key (the model or target name); the
            key also holds the sampler, n, sigma_min, sigma_max, shape, seed and the options.
        sampler_options: keyword options passed to the sampler.

    Returns:
        ``[n + 1]`` decreasing sigmas ending in 0, in ``dtype`` (float64 by default).

    References:
        Sabour, Fidler & Kreis, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models",
        ICML 2024. Nocedal & Wright, "Numerical Optimization", 2nd ed. 2006, Alg. 7.5 (L-BFGS).
    """
    _check_range(n, sigma_min, sigma_max)
    fn, name = _resolve_sampler(sampler)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"shape must be [B, ...] with B >= 1 and a data dimension; got {shape}")
    inits = (init,) if isinstance(init, str) else tuple(init)
    for name_i in inits:
        if name_i not in SCHEDULES or name_i == "uniform_t":
            allowed = sorted(set(SCHEDULES) - {"uniform_t"})
            raise ValueError(f"unknown init schedule {name_i!r}; allowed: {allowed}")
    if knots is not None and (not isinstance(knots, int) or knots < 1):
        raise ValueError(f"knots must be an integer >= 1 or None; got {knots!r}")
    opts = dict(sampler_options or {})
    key = _cache_key(
        name, n, sigma_min, sigma_max, shape, seed, shape[0],
        f"init={inits}|K={knots}|free_min={free_sigma_min}|it={iterations}|"
        f"starts={[torch.as_tensor(t).tolist() for t in starts or []]}|"
        f"opts={sorted(opts.items())}|{cache_key}",
    )  # fmt: skip
    cache_path = Path(cache) if cache is not None else None
    if cache_path is not None and cache_path.exists():
        stored = json.loads(cache_path.read_text())
        if key in stored:
            return torch.tensor(stored[key]["sigmas"], dtype=dtype, device=device)
    if n == 1 or (n == 2 and not free_sigma_min):  # nothing to choose
        return karras(n, sigma_min, sigma_max, dtype=dtype, device=device)

    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_t = sigma_max * torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    x_ref = pf_ode_reference(
        denoiser, x_t, sigma_max, 0.0, rtol=reference_rtol, atol=reference_rtol
    )
    log_max = math.log(sigma_max)
    u = _ramp(n)

    span = log_max - math.log(sigma_min)

    def base_fn(start: Tensor):
        """The start schedule as ``g(v)``, its log-span fraction at ``v in [0, 1]``, piecewise linear."""
        logs = start[:-1].to(torch.float64).log()  # its positive part
        nodes = (log_max - logs) / (log_max - logs[-1])  # 0 at sigma_max .. 1 at its own end
        m = nodes.numel()

        def g(v: Tensor) -> Tensor:  # differentiable in v
            pos = v * (m - 1)
            idx = pos.detach().floor().long().clamp(0, m - 2)
            return torch.lerp(nodes[idx], nodes[idx + 1], pos - idx.to(v.dtype))

        return g

    def make_unpack(g, k: int):
        def unpack(p: Tensor) -> Tensor:
            frac = _warp(p[:k], u)
            # log sigma = log smax - span * f * g(warp(u)); f = 1 pins the end at sigma_min.
            f = torch.sigmoid(p[k]) if free_sigma_min else torch.ones((), dtype=p.dtype)
            log_s = log_max - span * f * g(frac)
            last = (log_max - span * f).reshape(1)
            top = log_s.new_full((1,), log_max)
            s = torch.cat([top, log_s[1:-1], last]).exp()  # the ends exactly
            return torch.cat([s, s.new_zeros(1)])

        return unpack

    def objective(unpack, p: Tensor) -> Tensor:
        sig = unpack(p).to(device)
        out = fn(denoiser, x_t.clone(), sig, **opts)
        return torch.log((out - x_ref).square().sum() / x_t.shape[0])

    # Candidate starts: each init schedule down to sigma_min and, with a free end, to 10x and 100x
    # sigma_min; plus the caller's own ``starts``.
    candidates = []
    for name_i in inits:
        for end in [sigma_min, 10 * sigma_min, 100 * sigma_min] if free_sigma_min else [sigma_min]:
            if end < sigma_max / 10:
                candidates.append(
                    (f"{name_i} to {end:.3g}", get_schedule(name_i)(n, end, sigma_max))
                )
    for i, st in enumerate(starts or []):
        st = torch.as_tensor(st, dtype=torch.float64).cpu()
        ok = st.shape == (n + 1,) and st[-1] == 0 and bool((st[1:] < st[:-1]).all())
        if not ok or not math.isclose(float(st[0]), sigma_max, rel_tol=1e-9):
            raise ValueError(
                f"starts[{i}] must be {n + 1} decreasing sigmas from sigma_max to 0; got {st.tolist()}"
            )
        if float(st[-2]) < sigma_min * (1 - 1e-9) or (
            not free_sigma_min and not math.isclose(float(st[-2]), sigma_min, rel_tol=1e-9)
        ):
            raise ValueError(f"starts[{i}] must end at sigma_min (or above it with free_sigma_min)")
        candidates.append((f"starts[{i}]", st))

    def w_of(st: Tensor) -> list[float]:  # sigmoid(w) = the log-span fraction of the start's end
        if not free_sigma_min:
            return []
        f = min(max((log_max - math.log(float(st[-2]))) / span, 1e-3), 1 - 1e-3)
        return [math.log(f / (1 - f))]

    # Autograd through the sampler if it carries gradients to its sigmas; else finite differences.
    probe_st = candidates[0][1]
    probe = torch.tensor([0.0] * (n - 1) + w_of(probe_st), dtype=torch.float64)
    # Off the kinks of the piecewise-linear maps (at z = 0 every u_i sits on a knot).
    probe = (
        probe + 0.05 * torch.randn(probe.shape, generator=torch.Generator().manual_seed(1)).double()
    )
    probe.requires_grad_(True)
    try:
        unpack_probe = make_unpack(base_fn(probe_st), n - 1)
        (g,) = torch.autograd.grad(objective(unpack_probe, probe), probe, allow_unused=True)
        use_autograd = g is not None and bool(torch.isfinite(g).all())
        if use_autograd:  # complete? (a sampler may carry gradients to some sigmas only)
            d = torch.randn(probe.shape, generator=torch.Generator().manual_seed(0)).double()
            with torch.no_grad():
                p_ = probe.detach()
                fd = objective(unpack_probe, p_ + 1e-5 * d) - objective(unpack_probe, p_ - 1e-5 * d)
                fd = float(fd) / 2e-5
            use_autograd = abs(float(g @ d) - fd) <= 1e-3 * abs(fd) + 1e-7
    except (RuntimeError, TypeError):
        use_autograd = False
    k = knots if knots is not None else (n - 1 if use_autograd else min(n - 1, 6))
    k = min(k, n - 1)

    best = None
    for label, st in candidates:
        unpack_i = make_unpack(base_fn(st), k)
        p_i = torch.tensor([0.0] * k + w_of(st), dtype=torch.float64)
        with torch.no_grad():
            try:
                v = float(objective(unpack_i, p_i))
            except (ValueError, FloatingPointError):
                continue
        if math.isfinite(v) and (best is None or v < best[0]):
            best = (v, label, unpack_i, p_i)
    if best is None:
        raise ValueError(f"optimized: sampler {name!r} failed on every start schedule")
    v_start, start_name, unpack, p0 = best

    def value_and_grad(p: Tensor) -> tuple[Tensor, Tensor]:
        if use_autograd:
            p = p.detach().clone().requires_grad_(True)
            v = objective(unpack, p)
            (g,) = torch.autograd.grad(v, p)
            return v.detach(), g
        with torch.no_grad():
            v = objective(unpack, p)
            g = torch.zeros_like(p)
            eps = 1e-4
            for i in range(p.numel()):
                e = torch.zeros_like(p)
                e[i] = eps
                g[i] = (objective(unpack, p + e) - objective(unpack, p - e)) / (2 * eps)
        return v, g

    best_p, best_v = p0.clone(), v_start
    params = p0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [params], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-7, tolerance_change=1e-9,
    )  # fmt: skip

    def closure():
        nonlocal best_p, best_v
        try:
            v, g = value_and_grad(params.detach())
        except (ValueError, FloatingPointError):  # a trial point the sampler rejects
            v, g = torch.tensor(float("inf"), dtype=torch.float64), torch.zeros_like(params)
        if not torch.isfinite(v):  # make the line search back off
            params.grad = torch.zeros_like(params)
            return torch.tensor(1e30, dtype=torch.float64)
        if float(v) < best_v:
            best_v, best_p = float(v), params.detach().clone()
        params.grad = g.to(params.dtype)
        return v

    opt.step(closure)
    sigmas = unpack(best_p).detach()
    if verbose:
        print(
            f"optimized[{name}, n={n}, start={start_name}, K={k}]: rms/sample "
            f"{math.exp(v_start / 2):.3g} -> {math.exp(best_v / 2):.3g} in "
            f"{time.perf_counter() - t0:.1f}s ({'autograd' if use_autograd else 'finite diff'})"
        )
    if cache_path is not None:
        stored = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        stored[key] = {"sigmas": sigmas.tolist(), "log_mse": best_v, "start": start_name}
        _write_json_atomic(cache_path, stored)
    return sigmas.to(dtype=dtype, device=device)
