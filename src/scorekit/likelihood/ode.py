"""Exact log-likelihood of a denoiser through the probability-flow ODE.

In the sigma frame the probability-flow ODE of DESIGN.md is ``dx/dsigma = (x - D(x, sigma)) / sigma``.
Its flow maps the model's noised density ``p_sigma_min`` onto ``p_sigma_max``, and the instantaneous
change of variables (Chen et al. 2018, Theorem 1) tracks the log-density along a trajectory: for
``dx/dt = f(x, t)``, ``d log p_t(x(t)) / dt = -div f``. So

    log p_{sigma_min}(x) = log p_{sigma_max}(x(T)) + int_{t_min}^{T} div_x f(x(t), t) dt,

with the prior ``p_{sigma_max} ~= N(0, sigma_max^2 I)`` at the end point.

We integrate in ``t = log sigma``. Then ``dx/dt = sigma dx/dsigma = x - D(x, sigma)``: the drift is
O(|x|) at every noise level, and the interval ``[log sigma_min, log sigma_max]`` is about 10 units long
for ``sigma`` from 2e-3 to 80. In ``sigma`` itself the drift ``(x - D)/sigma`` grows like
``1/sigma`` at the small end while the interval is 80 units long at the large end, so an adaptive
solver would need step sizes spanning four orders of magnitude; in ``log sigma`` it needs nearly
uniform steps (the drift's changes are spread evenly over log-SNR). The divergence is
``div f = d - div_x D(x, sigma)`` for ``d`` values per row.

``div_x D`` is computed exactly (``d`` vector-Jacobian products, one per coordinate; fine for small
``d``) or by the Hutchinson-Skilling trace estimator ``E_v[v^T (dD/dx) v]`` with Rademacher or
Gaussian probes ``v`` (``E[v v^T] = I``), drawn once per solve and held fixed along the trajectory
(FFJORD). With ``K`` probes we integrate ``K`` divergence estimates side by side, so the ``K``
resulting log-likelihoods are independent unbiased estimates (up to the solver's tolerance) and
their spread gives a per-example standard error.

References:
    Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential Equations", NeurIPS 2018
    (Theorem 1, instantaneous change of variables).
    Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, "FFJORD: Free-form Continuous Dynamics for
    Scalable Reversible Generative Models", ICLR 2019 (Section 3.1, Hutchinson's estimator).
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through
    Stochastic Differential Equations", ICLR 2021 (Appendix D.2, likelihood via the PF ODE).
    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", 1989; Skilling, "The eigenvalues of mega-dimensional matrices", 1989.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from scorekit._util import LOG_2PI, check_number
from scorekit.pfode import ADAPTIVE_METHODS, ODESolveError, integrate

__all__ = [
    "ADAPTIVE_METHODS",
    "LikelihoodInfo",
    "ODESolveError",
    "check_inputs",
    "log_likelihood",
    "prior_log_prob",
]

@dataclass
class LikelihoodInfo:
    """What a ``log_likelihood`` solve used and how certain it is.

    Attributes:
        nfe: denoiser evaluations made by the successful solve (each on the whole batch).
        stderr: ``[B]`` standard error of each Hutchinson estimate (sample std of the ``n_probes``
            per-probe estimates over ``sqrt(n_probes)``); zeros for the exact divergence; ``None``
            when ``n_probes == 1`` (one probe carries no estimate of its own spread).
        status: ``"ok"`` (failures raise :class:`ODESolveError` instead).
        prior_point: ``[B, ...]`` the end point ``x(sigma_max)`` of each trajectory.
        prior_logp: ``[B]`` ``log N(x(sigma_max); 0, sigma_max^2 I)``.
        delta_logp: ``[B]`` the integrated divergence (mean over probes), so that
            ``log p = prior_logp + delta_logp``.
        per_probe: ``[B, K]`` the per-probe log-likelihoods (``K = 1`` for the exact divergence).
    """

    nfe: int
    stderr: Tensor | None
    status: str
    prior_point: Tensor
    prior_logp: Tensor
    delta_logp: Tensor
    per_probe: Tensor


def prior_log_prob(x: Tensor, sigma_max: float) -> Tensor:
    """``log N(x; 0, sigma_max^2 I)`` in nats per row, ``[B]``."""
    d = x[0].numel()
    sq = x.reshape(x.shape[0], -1).square().sum(1)
    return -0.5 * (sq / sigma_max**2 + d * (LOG_2PI + 2 * math.log(sigma_max)))


def check_inputs(x, sigma_min, sigma_max) -> tuple[float, float]:
    """Validate the points and noise range of a likelihood computation (one-line errors)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, ...]; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32/float64); got {x.dtype}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            f"x must have shape [B, ...] with B >= 1 and at least one value per row "
            f"(use [B, 1] for scalars); got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()
        raise ValueError(f"x contains NaN or inf in rows {bad[:10].tolist()}")
    sigma_min = check_number("sigma_min", sigma_min, low=0.0, low_ok=False)
    sigma_max = check_number("sigma_max", sigma_max, low=0.0, low_ok=False)
    if sigma_min >= sigma_max:
        raise ValueError(
            f"need sigma_min < sigma_max; got sigma_min={sigma_min:g}, sigma_max={sigma_max:g}"
        )
    return sigma_min, sigma_max


def _draw_probes(x: Tensor, n: int, kind: str, generator) -> Tensor:
    """``n`` probes ``[n, B, ...]`` with ``E[v v^T] = I``: Rademacher (+-1) or standard Gaussian."""
    dev = generator.device if generator is not None else x.device
    shape = (n, *x.shape)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, device=dev, dtype=x.dtype)
    return v.to(x.device)


def _divergence_exact(out: Tensor, x: Tensor) -> Tensor:
    """``sum_i dD_i/dx_i`` per row, ``[B]``, by one vector-Jacobian product per coordinate.

    Rows are independent (the denoiser is applied row by row), so the gradient of the sum over the
    batch of output ``i`` gives row ``b``'s ``dD_{b,i}/dx_b`` in row ``b``.
    """
    flat = out.reshape(out.shape[0], -1)
    div = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
        div = div + g.reshape(g.shape[0], -1)[:, i]
    return div


def _divergence_hutchinson(out: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """``v_k^T (dD/dx) v_k`` per row and probe, ``[B, K]``, one vector-Jacobian product per probe."""
    ests = []
    for v in probes:
        (g,) = torch.autograd.grad(out, x, grad_outputs=v, retain_graph=True)
        ests.append((g * v).reshape(x.shape[0], -1).sum(1))
    return torch.stack(ests, dim=1)


def _solve(denoiser, x, rows, *, t0, t1, divergence, probes, rtol, atol, method, max_steps):
    """Solve rows ``rows`` of the batch jointly; returns (x_end, delta [B, K], nfe).

    On a solver failure (step underflow, the step budget) the error names the rows that dominated
    the error estimate in the last steps (``ODESolveError.culprits``), so the caller can tell the
    rows that fail from the rows that merely shared their steps.
    """
    d = x[0].numel()
    nfe = 0
    recent: list[int] = []  # the row with the largest error in each recent norm evaluation

    def drift(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        xt = state[0]
        sigma = torch.exp(t).to(xt.dtype).expand(xt.shape[0])
        with torch.enable_grad():
            xg = xt.detach().requires_grad_(True)
            out = denoiser(xg, sigma)
            if not isinstance(out, Tensor) or out.shape != xg.shape or out.dtype != xg.dtype:
                got = (f"shape {tuple(out.shape)}, {out.dtype}" if isinstance(out, Tensor)
                       else type(out).__name__)  # fmt: skip
                raise ValueError(
                    f"denoiser must return a tensor of x's shape {tuple(xg.shape)} and dtype "
                    f"{xg.dtype}; got {got}"
                )
            nfe += 1
            if divergence == "exact":
                div_d = _divergence_exact(out, xg)[:, None]
            else:
                div_d = _divergence_hutchinson(out, xg, probes[:, rows])
        f = xt - out.detach()
        ddelta = d - div_d.detach()
        bad = ~torch.isfinite(f).reshape(f.shape[0], -1).all(1) | ~torch.isfinite(ddelta).all(1)
        if bad.any():
            why = f"non-finite drift or divergence at sigma={float(sigma[0]):.4g}"
            raise ODESolveError({int(rows[i]): why for i in bad.nonzero().flatten()})
        return f, ddelta

    def norm(err: tuple[Tensor, Tensor]) -> Tensor:
        # torchdiffeq's default for a tuple state (the larger RMS of the two parts), and a note of
        # the row that contributes most to it.
        per_row = torch.stack([e.reshape(e.shape[0], -1).square().mean(1) for e in err], 1)
        recent[:] = [*recent[-7:], int(per_row.max(1).values.argmax())]
        return torch.stack([e.square().mean().sqrt() for e in err]).max()

    k = 1 if divergence == "exact" else probes.shape[0]
    state0 = (x[rows], torch.zeros(len(rows), k, dtype=x.dtype, device=x.device))
    ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    try:
        xs, deltas = integrate(
            drift, state0, ts, rtol=rtol, atol=atol, method=method, rows=rows.tolist(),
            max_steps=max_steps, norm=norm, clamp=True,
        )  # fmt: skip
    except ODESolveError as e:
        e.culprits = sorted({int(rows[i]) for i in recent})
        raise
    return xs[-1], deltas[-1], nfe


def _solve_or_locate(denoiser, x, rows, **kw):
    """Solve ``rows`` together; on a failure of the whole batch, one more solve at most.

    A non-finite drift names its rows itself. A step-size failure is blamed on the rows that
    dominated the error estimate as it failed; the other rows are solved once more without them: if
    that succeeds, only the culprits failed; if not, its own culprits are added (and every row of
    that solve is reported, as none of them can be vouched for).
    """
    try:
        return _solve(denoiser, x, rows, **kw)
    except ODESolveError as e:
        culprits = e.culprits
        if len(rows) == 1 or len(e.failures) < len(rows) or not culprits:
            raise  # already precise (one row, or the drift named its non-finite rows)
        reason = e.failures[culprits[0]]
        rest = torch.tensor([int(r) for r in rows if int(r) not in culprits], device=rows.device)
        if len(rest):
            try:
                _solve(denoiser, x, rest, **kw)
            except ODESolveError as sub:
                raise ODESolveError({**sub.failures, **dict.fromkeys(culprits, reason)}) from e
        raise ODESolveError(dict.fromkeys(culprits, reason)) from e


def log_likelihood(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    divergence: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    max_steps: int = 10_000,
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, LikelihoodInfo]:
    """Log-density in nats of each row of ``x`` under the model's noised density ``p_sigma_min``.

    Solves the probability-flow ODE in ``t = log sigma`` from ``sigma_min`` up to ``sigma_max``
    jointly with the log-density change (module docstring)::

        dx/dt = x - D(x, e^t)
        d delta/dt = d - div_x D(x, e^t)
        log p_{sigma_min}(x) = log N(x(T); 0, sigma_max^2 I) + delta(T)

    The prior ``N(0, sigma_max^2 I)`` stands in for the true ``p_sigma_max = p_data * N(0, sigma_max^2)``;
    for centred data of per-dimension variance ``c`` the pointwise gap is ``O(c / sigma_max^2)`` per
    dimension, negligible once ``sigma_max >> data scale`` (``info.prior_point`` lets a caller with an
    exact ``p_sigma_max`` replace the prior term).

    Args:
        denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]``; applied row by row (rows must not mix).
        x: ``[B, ...]`` floating-point points, finite. Solved in ``x``'s dtype, on its device.
        sigma_min: noise level of the density evaluated, ``> 0``.
        sigma_max: noise level of the Gaussian prior, ``> sigma_min``.
        divergence: ``"exact"`` (``d`` backward passes per step; small ``d``) or ``"hutchinson"``.
        n_probes: Hutchinson probes averaged (``>= 2`` to get a standard error).
        probe: ``"rademacher"`` (lower variance) or ``"gaussian"``.
        rtol, atol: the adaptive solver's tolerances, in ``(0, 1)``; ``rtol`` at least 10 machine
            epsilons of ``x``'s dtype.
        method: a torchdiffeq adaptive method (:data:`ADAPTIVE_METHODS`).
        max_steps: cap on accepted+rejected steps before a row is declared failed.
        generator: for the Hutchinson probes.
        return_info: also return a :class:`LikelihoodInfo`.

    Returns:
        ``[B]`` log-likelihoods in nats (and the info when asked).

    Raises:
        ValueError / TypeError: bad input (named argument, given value, allowed values).
        ODESolveError: the solve failed for some rows; lists each failing row and why.
    """
    sigma_min, sigma_max = check_inputs(x, sigma_min, sigma_max)
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson'; got {divergence!r}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian'; got {probe!r}")
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1; got {n_probes!r}")
    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"method must be one of {ADAPTIVE_METHODS}; got {method!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1; got {max_steps!r}")
    eps = torch.finfo(x.dtype).eps
    rtol = check_number("rtol", rtol, low=10 * eps, high=1.0, high_ok=False)
    atol = check_number("atol", atol, low=0.0, high=1.0, low_ok=False, high_ok=False)

    x = x.detach()
    probes = None
    if divergence == "hutchinson":
        probes = _draw_probes(x, n_probes, probe, generator)
    rows = torch.arange(x.shape[0], device=x.device)
    x_end, delta, nfe = _solve_or_locate(
        denoiser, x, rows, t0=math.log(sigma_min), t1=math.log(sigma_max),
        divergence=divergence, probes=probes, rtol=rtol, atol=atol, method=method,
        max_steps=max_steps,
    )  # fmt: skip
    prior = prior_log_prob(x_end, sigma_max)
    per_probe = prior[:, None] + delta
    logp = per_probe.mean(1)
    if not return_info:
        return logp
    if divergence == "exact":
        stderr = torch.zeros_like(logp)
    elif n_probes >= 2:
        stderr = per_probe.std(1) / math.sqrt(n_probes)
    else:
        stderr = None
    info = LikelihoodInfo(
        nfe=nfe, stderr=stderr, status="ok", prior_point=x_end, prior_logp=prior,
        delta_logp=delta.mean(1), per_probe=per_probe,
    )  # fmt: skip
    return logp, info
