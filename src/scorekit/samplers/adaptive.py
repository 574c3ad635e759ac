"""Adaptive samplers: error-controlled step sizes, so the NFE follows from tolerances, not from ``sigmas``.

Only ``sigmas[0]`` and the last positive entry ``sigmas[-2]`` matter (the intermediate entries are
output points for ``callback`` in ``adaptive_ode`` and ignored by ``adaptive_sde``); both integrate in
``u = log sigma``, where the dynamics are well conditioned over sigma spanning many decades, and end
with the denoising step ``x = D(x, sigmas[-2])``. The number of denoiser calls is not known in
advance: pass ``stats={}`` and read ``stats["nfe"]`` afterwards. Step-size control needs the error
norm on the host, so these loops synchronise once per step (unlike the fixed-step samplers).
``progress`` is accepted for a uniform signature and shows no bar (the number of steps is unknown).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims, check_finite, check_int, check_number
from scorekit.pfode import ODESolveError, integrate
from scorekit.samplers.common import GeneratorLike, emit, finish, prepare, randn_like, sampler

__all__ = ["adaptive_ode", "adaptive_sde"]


def _positive(**values: float) -> None:
    for name, v in values.items():
        check_number(name, v, low=0, low_ok=False)


@sampler(nfe=None)
def adaptive_ode(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    stats: dict | None = None,
) -> Tensor:
    """An error-controlled Runge-Kutta solve (torchdiffeq) of the PF-ODE in ``u = log sigma``.

        dx/du = sigma dx/dsigma = x - D(x, e^u),     u from log sigmas[0] to log sigmas[-2],

    then ``x = D(x, sigmas[-2])``. The error norm is the largest per-sample RMS of the scaled error,
    so every sample meets ``rtol``/``atol`` whatever the batch; a sample's result depends on its
    batch only through the shared step sizes, i.e. within the tolerance. ``callback`` sees ``x`` at
    each positive entry of ``sigmas`` (dense output, no extra calls; ``denoised`` is None there).
    ``stats["nfe"]`` receives the exact number of denoiser calls (every RK stage plus the final one).

    References:
        Dormand & Prince, "A family of embedded Runge-Kutta formulae", J. Comp. Appl. Math. 1980
        (dopri5). Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018 (torchdiffeq).
        Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, Sec. 4.3.
    """
    _positive(rtol=rtol, atol=atol)
    s, model = prepare(denoiser, x, sigmas)
    batch, calls, last = x.shape[0], 0, x

    def drift(u: Tensor, y: Tensor) -> Tensor:
        nonlocal calls, last
        calls += 1
        last = model(y, u.exp().to(y.dtype).expand(batch))
        return y - last

    def norm(t: Tensor) -> Tensor:  # worst per-sample RMS
        return t.reshape(batch, -1).square().mean(1).sqrt().max()

    positive = s[:-1]
    if len(positive) > 1:
        u = torch.tensor([math.log(v) for v in positive], dtype=x.dtype, device=x.device)
        try:
            path = integrate(drift, x, u, rtol=rtol, atol=atol, method=method, norm=norm)
        except ODESolveError:  # usually NaN/inf from the denoiser: say so if it is
            check_finite(last, "denoiser output during the adaptive solve")
            raise
        for i, sig in enumerate(positive[:-1]):
            emit(callback, i, sig, path[i], None)
        x = path[-1]
    d = model(x, positive[-1])
    emit(callback, len(positive) - 1, positive[-1], x, d)
    if stats is not None:
        stats["nfe"] = calls + 1
    return finish(d)


@sampler(nfe=None, stochastic=True)
def adaptive_sde(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.01,
    safety: float = 0.9,
    exponent: float = 0.9,
    max_iterations: int = 100_000,
    stats: dict | None = None,
) -> Tensor:
    """ "Gotta Go Fast": Euler-Maruyama paired with improved Euler, per-sample step-size control.

    The reverse SDE in ``u = log sigma`` is ``dx = 2 (x - D) du + sqrt(2) sigma dW_bar``; time is
    ``t = (u_0 - u) / (u_0 - u_end)`` in ``[0, 1]``. A step of size ``h`` (``du = -h (u_0 - u_end)``,
    ``z ~ N(0, I)`` shared by both stages):

        x'  = x + 2 du (x - D(x, sigma_t)) + sqrt(2 |du|) sigma_t z            (Euler-Maruyama)
        x~  = x + 2 du (x' - D(x', sigma_{t+h})) + sqrt(2 |du|) sigma_{t+h} z
        x'' = (x' + x~) / 2                                                       (improved Euler)
        E   = || (x' - x'') / max(atol, rtol max(|x'|, |x'_prev|)) ||_2 / sqrt(n)

    accept if ``E <= 1`` (``x <- x''``, ``x'_prev <- x'``), and in any case
    ``h <- min(1 - t, safety h E^(-exponent))``. Every sample has its own ``t`` and ``h``, so with per-row
    generators sample ``i`` does not depend on the batch (finished rows take zero-length steps).
    One deviation from the paper's Alg. 1, which draws a fresh ``z`` after a rejection: since ``E``
    depends on ``z``, redrawing selects small noise and biases the law (measured on a 2-D Gaussian:
    variance +60% at the default tolerances). Here a rejected interval keeps its Brownian increment
    and the retry takes the Brownian bridge inside it (``_BrownianStack``, RSwM), so the solution
    follows one fixed Brownian path at adaptive resolution.
    The solve runs from ``sigmas[0]`` to ``sigmas[-2]``; each row's step is shortened to land
    exactly on every interior positive entry of ``sigmas`` (none for ``[sigma_max, sigma_min, 0]``),
    where ``callback`` sees the states (``denoised`` None; reported once the whole batch has passed
    them), then the final ``x = D(x, sigmas[-2])``.
    ``stats`` receives ``nfe`` (``2 * iterations + 1``) and
    ``iterations``; the loop reads ``any(t < 1)`` on the host once per iteration.

    References:
        Jolicoeur-Martineau et al., "Gotta Go Fast When Generating Data with Score-Based Models",
        arXiv:2105.14080 (2021), Alg. 1 (defaults from their Sec. 4). Roberts, "Modify the Improved
        Euler scheme to integrate stochastic differential equations", arXiv:1210.0933 (2012).
    """
    _positive(rtol=rtol, atol=atol, h_init=h_init, safety=safety, exponent=exponent)
    check_int("max_iterations", max_iterations)
    s, model = prepare(denoiser, x, sigmas)
    u0, u1 = math.log(s[0]), math.log(s[-2])
    span, batch, it = u0 - u1, x.shape[0], 0
    kw = {"dtype": torch.float64, "device": x.device}
    # Each row steps exactly onto the times of the interior sigmas (for the callback): ``stops`` are
    # their times in [0, 1], then 1; ``nxt`` is each row's next stop; ``seen[k]`` its state there.
    stops = torch.tensor([(u0 - math.log(v)) / span for v in s[1:-2]] + [1.0], **kw) if span else None
    nxt = torch.zeros(batch, dtype=torch.long, device=x.device)
    start, seen = x, [x] * (len(s) - 3)
    t, h = torch.zeros(batch, **kw), torch.full((batch,), min(h_init, 1.0), **kw)
    path = _BrownianStack(x)
    x_prev, err = x, torch.zeros(batch, **kw)
    while span > 0:
        running, broken, depth = torch.stack(
            [(t < 1).any(), err.isnan().any(), path.depth.max().to(torch.float64)]
        ).tolist()  # the one synchronisation per iteration
        if broken:
            raise FloatingPointError(
                "adaptive_sde: the error estimate is not finite (NaN/inf from the denoiser?)"
            )
        if not running:
            break
        if it >= max_iterations:
            raise RuntimeError(f"adaptive_sde did not finish in max_iterations={max_iterations}")
        it += 1
        stop = stops[nxt]
        h = torch.minimum(h, stop - t)
        dw = path.increment(h, int(depth), generator)  # [B, ...], variance h per entry (t units)
        du = append_dims((h * span).to(x.dtype), x.ndim)
        noise = math.sqrt(2 * span) * dw
        sig_a, sig_b = (u0 - t * span).exp().to(x.dtype), (u0 - (t + h) * span).exp().to(x.dtype)
        x1 = x - 2 * du * (x - model(x, sig_a)) + append_dims(sig_a, x.ndim) * noise
        x2 = x - 2 * du * (x1 - model(x1, sig_b)) + append_dims(sig_b, x.ndim) * noise
        x_hi = 0.5 * (x1 + x2)
        tol = (rtol * torch.maximum(x1.abs(), x_prev.abs())).clamp_min(atol)
        err = ((x1 - x_hi) / tol).flatten(1).square().mean(1).sqrt().to(torch.float64)
        ok = err <= 1
        path.push(~ok, h, dw, int(depth))  # a rejected interval keeps its Brownian increment
        keep = append_dims(ok, x.ndim)
        x, x_prev = torch.where(keep, x_hi, x), torch.where(keep, x1, x_prev)
        landed = ok & (h >= stop - t)
        t = torch.where(ok, torch.where(landed, stop, t + h), t)
        for k in range(len(seen)):  # rows that just reached interior stop k keep their state there
            seen[k] = torch.where(append_dims(landed & (nxt == k), x.ndim), x, seen[k])
        nxt = nxt + (landed & (nxt < len(seen))).long()
        h = torch.minimum(1 - t, safety * h * err.clamp_min(1e-10) ** (-exponent))
    emit(callback, 0, s[0], start, None)
    for k, state in enumerate(seen):
        emit(callback, k + 1, s[k + 1], state, None)
    d = model(x, s[-2])
    emit(callback, len(s) - 2, s[-2], x, d)
    if stats is not None:
        stats["nfe"], stats["iterations"] = 2 * it + 1, it
    return finish(d)


class _BrownianStack:
    """Per-row Brownian increments that stay consistent under step rejection (RSwM).

    Each row keeps a stack of future path segments ``(duration, increment)`` that were already
    drawn. ``increment(h)`` takes the next ``h`` of the path: whole segments from the top of the
    stack, the Brownian bridge for a part of one (``W_a ~ N((a/p) W, a (p - a)/p)``), and fresh
    ``N(0, rest)`` beyond. ``push`` returns a rejected interval's increment to the stack, so the
    retried, shorter step sees the same path: the decisions to reject then cannot bias the noise.
    Each call draws exactly two normals per row, so row ``i``'s stream ignores the other rows.

    References:
        Rackauckas & Nie, "Adaptive methods for stochastic differential equations via natural
        embeddings and rejection sampling with memory", DCDS-B 2017, Sec. 3 (RSwM).
    """

    def __init__(self, x: Tensor):
        self.dur = torch.zeros(x.shape[0], 4, dtype=torch.float64, device=x.device)
        self.inc = x.new_zeros(x.shape[0], 4, *x.shape[1:])
        self.depth = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        self.rows = torch.arange(x.shape[0], device=x.device)

    def increment(self, h: Tensor, depth: int, generator: GeneratorLike) -> Tensor:
        """The path's increment over the next ``h`` ``[B]`` per row; ``depth`` bounds the stack depth."""
        ref = self.inc[:, 0]
        xi_split, xi_fresh = randn_like(ref, generator), randn_like(ref, generator)
        w, need = torch.zeros_like(ref), h.clone()
        for _ in range(depth):
            top = (self.depth - 1).clamp_min(0)
            has = (self.depth > 0) & (need > 0)
            p, r = self.dur[self.rows, top], self.inc[self.rows, top]
            full = has & (need >= p * (1 - 1e-12))
            part = has & ~full
            frac = torch.where(part, need / p, 0.0)
            sd = torch.where(part, (need * (p - need) / p).clamp_min(0).sqrt(), 0.0)
            w_part = (
                append_dims(frac.to(ref.dtype), ref.ndim) * r
                + append_dims(sd.to(ref.dtype), ref.ndim) * xi_split
            )
            w = w + torch.where(
                append_dims(full, ref.ndim),
                r,
                torch.where(append_dims(part, ref.ndim), w_part, 0.0),
            )
            self.dur[self.rows, top] = torch.where(part, p - need, p)
            self.inc[self.rows, top] = torch.where(append_dims(part, ref.ndim), r - w_part, r)
            need = torch.where(full, need - p, torch.where(part, 0.0, need))
            self.depth = self.depth - full.long()
        return w + append_dims(need.clamp_min(0).sqrt().to(ref.dtype), ref.ndim) * xi_fresh

    def push(self, rows: Tensor, h: Tensor, w: Tensor, depth: int) -> None:
        """Push ``(h, w)`` on the rows in ``rows``; ``depth`` bounds the current stack depth."""
        if self.dur.shape[1] < depth + 1:  # grow (rare)
            self.dur = torch.cat([self.dur, torch.zeros_like(self.dur)], 1)
            self.inc = torch.cat([self.inc, torch.zeros_like(self.inc)], 1)
        rows = rows & (h > 0)
        at = self.depth
        self.dur[self.rows, at] = torch.where(rows, h, self.dur[self.rows, at])
        self.inc[self.rows, at] = torch.where(append_dims(rows, w.ndim), w, self.inc[self.rows, at])
        self.depth = self.depth + rows.long()
