"""Fitted schedules and solvers: sigmas and step coefficients chosen for one denoiser.

A fitted schedule (``optimized``) and a fitted solver (``fit_bespoke``) are the same kind of thing:
parameters of a sampler, fitted on calibration noise to the exact probability-flow ODE solution of
one denoiser (``pfode.pf_ode_reference``), then stored as plain data (a sigmas tensor in a JSON
cache; ``BespokeSolver.to_dict``). They run the samplers, so they sit above them in the layers.

References:
    Sabour, Fidler & Kreis, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models",
    ICML 2024 (a schedule per model and sampler). Shaul et al., "Bespoke Non-Stationary Solvers for
    Fast Sampling of Diffusion and Flow Models", ICML 2024. Nocedal & Wright, "Numerical
    Optimization", 2nd ed. 2006, Alg. 7.5 (L-BFGS). Kingma & Ba, "Adam", ICLR 2015.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from scorekit._util import atomic_write_json, check_int, lookup
from scorekit.pfode import pf_ode_reference
from scorekit.samplers.bespoke import BespokeSolver, linear_coefficients, linear_state
from scorekit.samplers.common import check_sigmas, steps
from scorekit.samplers.registry import REGISTRY
from scorekit.schedules import SCHEDULES, check_range, karras, ramp

__all__ = ["fit_bespoke", "optimized"]


# -- the optimised schedule -----------------------------------------------------------------------


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


def _resolve_sampler(sampler) -> tuple[Callable, str]:
    if callable(sampler):
        return sampler, getattr(sampler, "__name__", type(sampler).__name__)
    if isinstance(sampler, str):
        return lookup(REGISTRY, sampler, "sampler"), sampler
    raise TypeError(f"sampler must be a name or a function; got {type(sampler).__name__}")


@dataclass(frozen=True)
class _Family:
    """The schedules searched: ``log sigma_i = log smax - f L g_0(w(u_i))`` (see ``optimized``)."""

    n: int
    log_max: float
    span: float  # L = log(sigma_max / sigma_min)
    free_end: bool

    def start_fraction(self, start: Tensor) -> Callable[[Tensor], Tensor]:
        """A start schedule as ``g_0(v)``, its log-span fraction at ``v in [0, 1]``, piecewise linear."""
        logs = start[:-1].to(torch.float64).log()  # its positive part
        nodes = (self.log_max - logs) / (self.log_max - logs[-1])  # 0 at sigma_max .. 1 at its end
        m = nodes.numel()

        def g(v: Tensor) -> Tensor:  # differentiable in v
            pos = v * (m - 1)
            idx = pos.detach().floor().long().clamp(0, m - 2)
            return torch.lerp(nodes[idx], nodes[idx + 1], pos - idx.to(v.dtype))

        return g

    def unpacker(self, start: Tensor, k: int) -> Callable[[Tensor], Tensor]:
        """Parameters ``p = [z (k warp slopes), w_end?]`` -> sigmas ``[n + 1]`` (ends exact, then 0)."""
        g, u = self.start_fraction(start), ramp(self.n)

        def unpack(p: Tensor) -> Tensor:
            frac = _warp(p[:k], u)
            f = torch.sigmoid(p[k]) if self.free_end else torch.ones((), dtype=p.dtype)
            log_s = self.log_max - self.span * f * g(frac)
            last = (self.log_max - self.span * f).reshape(1)
            top = log_s.new_full((1,), self.log_max)
            s = torch.cat([top, log_s[1:-1], last]).exp()
            return torch.cat([s, s.new_zeros(1)])

        return unpack

    def end_parameter(self, start: Tensor) -> list[float]:
        """``[w]`` with ``sigmoid(w)`` the log-span fraction of the start's last positive sigma."""
        if not self.free_end:
            return []
        f = (self.log_max - math.log(float(start[-2]))) / self.span
        f = min(max(f, 1e-3), 1 - 1e-3)
        return [math.log(f / (1 - f))]


def _candidates(inits, starts, n, sigma_min, sigma_max, free_end) -> list[tuple[str, Tensor]]:
    """Each ``init`` schedule down to ``sigma_min`` (and, with a free end, to 10x and 100x it), then
    the caller's ``starts``, validated."""
    out = []
    for name_i in inits:
        for end in [sigma_min, 10 * sigma_min, 100 * sigma_min] if free_end else [sigma_min]:
            if end < sigma_max / 10:
                out.append((f"{name_i} to {end:.3g}", SCHEDULES[name_i](n, end, sigma_max)))
    for i, st in enumerate(starts or []):
        st = torch.as_tensor(st, dtype=torch.float64).cpu()
        ok = st.shape == (n + 1,) and st[-1] == 0 and bool((st[1:] < st[:-1]).all())
        if not ok or not math.isclose(float(st[0]), sigma_max, rel_tol=1e-9):
            raise ValueError(
                f"starts[{i}] must be {n + 1} decreasing sigmas from sigma_max to 0; got {st.tolist()}"
            )
        if float(st[-2]) < sigma_min * (1 - 1e-9) or (
            not free_end and not math.isclose(float(st[-2]), sigma_min, rel_tol=1e-9)
        ):
            raise ValueError(f"starts[{i}] must end at sigma_min (or above it with free_sigma_min)")
        out.append((f"starts[{i}]", st))
    return out


def _autograd_works(objective, family: _Family, start: Tensor) -> bool:
    """Whether autograd through the sampler gives the objective's full gradient (checked against a
    central finite difference along a random direction, off the kinks of the piecewise maps)."""
    n = family.n
    probe = torch.tensor([0.0] * (n - 1) + family.end_parameter(start), dtype=torch.float64)
    probe = probe + 0.05 * torch.randn(probe.shape, generator=torch.Generator().manual_seed(1)).double()
    probe.requires_grad_(True)
    unpack = family.unpacker(start, n - 1)
    try:
        (g,) = torch.autograd.grad(objective(unpack, probe), probe, allow_unused=True)
        if g is None or not bool(torch.isfinite(g).all()):
            return False
        d = torch.randn(probe.shape, generator=torch.Generator().manual_seed(0)).double()
        with torch.no_grad():
            p_ = probe.detach()
            fd = objective(unpack, p_ + 1e-5 * d) - objective(unpack, p_ - 1e-5 * d)
            fd = float(fd) / 2e-5
        return abs(float(g @ d) - fd) <= 1e-3 * abs(fd) + 1e-7
    except (RuntimeError, TypeError):  # a sampler that leaves autograd (host floats, in-place ops)
        return False


def _value_and_grad(objective, unpack, p: Tensor, use_autograd: bool) -> tuple[Tensor, Tensor]:
    """The objective and its gradient: autograd, or ``2 K`` central differences."""
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


def _polish(value_and_grad, p0: Tensor, v0: float, iterations: int) -> tuple[Tensor, float]:
    """L-BFGS (strong Wolfe) from ``p0``; returns the best point seen and its value (never worse)."""
    best_p, best_v = p0.clone(), v0
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
    return best_p, best_v


def _cached(cache_path: Path | None, key: str) -> list[float] | None:
    if cache_path is None or not cache_path.exists():
        return None
    entry = json.loads(cache_path.read_text()).get(key)
    return None if entry is None else entry["sigmas"]


def _store(cache_path: Path | None, key: str, entry: dict) -> None:
    if cache_path is None:
        return
    stored = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    stored[key] = entry
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_path, stored)


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
        init: names in ``schedules.SCHEDULES`` (default options) tried as the start.
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
    """
    check_range(n, sigma_min, sigma_max)
    fn, name = _resolve_sampler(sampler)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"shape must be [B, ...] with B >= 1 and a data dimension; got {shape}")
    inits = (init,) if isinstance(init, str) else tuple(init)
    for name_i in inits:
        lookup({k: v for k, v in SCHEDULES.items() if k != "uniform_t"}, name_i, "init schedule")
    if knots is not None:
        check_int("knots", knots)
    opts = dict(sampler_options or {})
    key = _cache_key(
        name, n, sigma_min, sigma_max, shape, seed, shape[0],
        f"init={inits}|K={knots}|free_min={free_sigma_min}|it={iterations}|"
        f"starts={[torch.as_tensor(t).tolist() for t in starts or []]}|"
        f"opts={sorted(opts.items())}|{cache_key}",
    )  # fmt: skip
    cache_path = Path(cache) if cache is not None else None
    stored = _cached(cache_path, key)
    if stored is not None:
        return torch.tensor(stored, dtype=dtype, device=device)
    if n == 1 or (n == 2 and not free_sigma_min):  # nothing to choose
        return karras(n, sigma_min, sigma_max, dtype=dtype, device=device)

    t0 = time.perf_counter()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_t = sigma_max * torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    x_ref = pf_ode_reference(
        denoiser, x_t, sigma_max, 0.0, rtol=reference_rtol, atol=reference_rtol
    )
    log_max = math.log(sigma_max)
    family = _Family(n, log_max, log_max - math.log(sigma_min), free_sigma_min)

    def objective(unpack, p: Tensor) -> Tensor:
        out = fn(denoiser, x_t.clone(), unpack(p).to(device), **opts)
        return torch.log((out - x_ref).square().sum() / x_t.shape[0])

    candidates = _candidates(inits, starts, n, sigma_min, sigma_max, free_sigma_min)
    use_autograd = _autograd_works(objective, family, candidates[0][1])
    k = knots if knots is not None else (n - 1 if use_autograd else min(n - 1, 6))
    k = min(k, n - 1)

    best = None  # the start with the lowest objective
    for label, st in candidates:
        unpack_i = family.unpacker(st, k)
        p_i = torch.tensor([0.0] * k + family.end_parameter(st), dtype=torch.float64)
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

    best_p, best_v = _polish(
        lambda p: _value_and_grad(objective, unpack, p, use_autograd), p0, v_start, iterations
    )
    sigmas = unpack(best_p).detach()
    if verbose:
        print(
            f"optimized[{name}, n={n}, start={start_name}, K={k}]: rms/sample "
            f"{math.exp(v_start / 2):.3g} -> {math.exp(best_v / 2):.3g} in "
            f"{time.perf_counter() - t0:.1f}s ({'autograd' if use_autograd else 'finite diff'})"
        )
    _store(cache_path, key, {"sigmas": sigmas.tolist(), "log_mse": best_v, "start": start_name})
    return sigmas.to(dtype=dtype, device=device)


# -- the bespoke solver ---------------------------------------------------------------------------


def _run(denoiser: Callable, x0: Tensor, a: Tensor, taus: Tensor) -> Tensor:
    """The linear solver with tensor coefficients and noise levels (differentiable in both)."""
    outs, x = [], x0
    for k in range(len(taus)):
        outs.append(denoiser(x, taus[k].expand(x.shape[0])))
        x = linear_state(x0, a[k + 1], outs)
    return x


def fit_bespoke(
    denoiser: Callable,
    sigmas: Tensor | Sequence[float],
    *,
    shape: Sequence[int] | None = None,
    calibration: tuple[Tensor, Tensor] | None = None,
    base: str = "ipndm",
    base_options: dict | None = None,
    gaussian=None,
    sigma_max: float | None = None,
    seed: int = 0,
    iterations: int = 400,
    lr: float = 0.01,
    batch_size: int = 1024,
    reference_rtol: float = 1e-9,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> BespokeSolver:
    """Fit a bespoke linear solver's coefficients and sigmas to ``denoiser`` on calibration noise.

    Draws ``x_T = sigma_max * z``, ``z ~ N(0, I)`` of ``shape`` (seeded by ``seed``), solves the
    probability-flow ODE from it tightly (``pf_ode_reference``) to get ``x_ref`` (or takes
    both from ``calibration``), and minimises ``mean |solver(x_T) - x_ref|^2`` over

    * the coefficients: ``A = A_base + P(Delta)``, with ``A_base = linear_coefficients(base, sigmas)``
      and ``P`` removing each row's mean over its free entries, so every row still sums to 1;
    * the sigmas, as ratios ``sigma_k = sigma_{k-1} * sigmoid(v_k)`` (always decreasing, positive),
      with ``sigma_0 = sigma_max`` fixed, or with ``gaussian`` a free ``sigma_0 = sigma_max *
      sigmoid(v_0)`` reached from ``x_T`` by the analytic teleport.

    Adam (``lr``, cosine decay to ``lr / 10``) on the whole batch for ``iterations`` steps; the result
    is the iterate with the lowest calibration error seen, so it is never worse there than the base
    sampler on ``sigmas``. Evaluate it on other noise: with a few thousand calibration rows, boundary
    samples of a multi-modal target can be fitted better than they generalise.

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> x0_hat``, differentiable by autograd.
        sigmas: the start steps ``[sigma_0, ..., sigma_{N-1}, 0]`` of the base sampler (``N`` calls);
            with ``gaussian``, ``sigma_0 < sigma_max`` is where the teleport lands.
        shape: ``[B, ...]`` of the calibration batch (a few thousand rows for a 64-D target).
        calibration: ``(x_T, x_ref)`` instead of ``shape``: noise at ``sigma_max`` and the exact
            PF-ODE solutions from it (to reuse one reference solve for several fits).
        base: the start, a name in ``LINEAR``; ``base_options`` its options (e.g. unipc's order).
        gaussian: a ``accelerators.GaussianFlow`` of the data, for the teleport start, or ``None``.
        sigma_max: the start noise level; defaults to ``sigmas[0]`` (required with ``gaussian``).
        iterations, lr: Adam steps and learning rate.
        batch_size: rows per forward and backward pass; the gradients of all chunks are summed, so
            every step uses the whole calibration batch (this bounds memory, not the result).
        reference_rtol: ``rtol = atol`` of the reference solve.

    Returns:
        A ``BespokeSolver`` (``.sigmas``, ``.coefficients``; call it on noise at ``sigma_max``).

    References:
        Shaul et al., "Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion and Flow
        Models", ICML 2024, Sec. 4. Wang & Vastola, TMLR 2024 (the teleport start).
    """
    base_options = dict(base_options or {})
    s = check_sigmas(sigmas)
    n = len(s) - 1
    a_base = linear_coefficients(base, s, **base_options)
    if gaussian is not None:
        if sigma_max is None or not float(sigma_max) > s[0]:
            raise ValueError(
                f"with gaussian (the teleport start) give sigma_max > sigmas[0] = {s[0]}; "
                f"got {sigma_max}"
            )
        sigma_max = float(sigma_max)
    else:
        if sigma_max is not None and float(sigma_max) != s[0]:
            raise ValueError(
                f"without gaussian the start is sigmas[0] = {s[0]}; got sigma_max = {sigma_max} "
                "(pass gaussian= to teleport from sigma_max)"
            )
        sigma_max = s[0]
    if (shape is None) == (calibration is None):
        raise ValueError("give exactly one of shape (draw calibration noise) and calibration")
    if shape is not None:
        shape = tuple(int(v) for v in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(
                f"shape must be [B, ...] with rank >= 2 and positive sizes; got {shape}"
            )
    else:
        x_t, ref = calibration
        if not (isinstance(x_t, Tensor) and isinstance(ref, Tensor) and x_t.shape == ref.shape):
            raise ValueError("calibration must be two tensors (x_T, x_ref) of the same shape")
    if not (isinstance(iterations, int) and iterations >= 0):
        raise ValueError(f"iterations must be an integer >= 0; got {iterations!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")

    device = torch.device(device if device is not None else "cpu")
    if shape is not None:
        g = torch.Generator().manual_seed(seed)
        x_t = (sigma_max * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)
        ref = pf_ode_reference(
            denoiser, x_t, sigma_max, 0.0, rtol=reference_rtol, atol=reference_rtol
        )
    else:
        x_t, ref = x_t.to(device, dtype), ref.to(device, dtype)

    pos = torch.tensor(s[:-1], dtype=torch.float64)
    ratios = torch.cat([pos[:1] / sigma_max, pos[1:] / pos[:-1]]).clamp(1e-12, 1 - 1e-12)
    v = torch.logit(ratios).to(device, dtype).requires_grad_(True)
    free_first = gaussian is not None
    mask = torch.tril(torch.ones(n + 1, n + 1, dtype=dtype, device=device))
    mask[0] = 0
    a0 = a_base.to(device, dtype)
    delta = torch.zeros_like(a0, requires_grad=True)

    def current() -> tuple[Tensor, Tensor]:
        d = delta * mask
        d = d - mask * d.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
        r = torch.sigmoid(v)
        if not free_first:
            r = torch.cat([r.new_ones(1), r[1:]])
        return a0 + d, sigma_max * torch.cumprod(r, 0)

    total = ref.numel()

    def loss_of(lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi``'s share of the mean squared error (graph built per chunk)."""
        a, taus = current()
        x0 = gaussian(x_t[lo:hi], sigma_max, taus[0]) if free_first else x_t[lo:hi]
        return (_run(denoiser, x0, a, taus) - ref[lo:hi]).square().sum() / total

    opt = torch.optim.Adam([delta, v], lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(iterations, 1), eta_min=lr / 10)
    best: tuple[float, Tensor, Tensor] | None = None
    first = math.nan
    rows = x_t.shape[0]
    for it in steps(iterations + 1, progress):
        opt.zero_grad()
        value = 0.0
        for lo in range(0, rows, batch_size):  # gradient accumulated over chunks: the full batch
            with torch.set_grad_enabled(it < iterations):
                part = loss_of(lo, min(rows, lo + batch_size))
                if it < iterations:
                    part.backward()
            value += float(part.detach())
        with torch.no_grad():
            a, taus = current()
        if it == 0:
            first = value
            if not math.isfinite(value):
                raise ValueError(
                    f"the base sampler {base} on sigmas {s} gives a non-finite calibration error"
                )
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, a.detach().clone(), taus.detach().clone())
        if it == iterations:
            break
        opt.step()
        decay.step()
    assert best is not None
    value, a, taus = best
    out_sigmas = torch.cat([taus.to("cpu", torch.float64), torch.zeros(1, dtype=torch.float64)])
    return BespokeSolver(
        out_sigmas, a.to("cpu", torch.float64), sigma_max, free_first, base,
        (math.sqrt(first), math.sqrt(value)),
    )  # fmt: skip
