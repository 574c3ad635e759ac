"""The probability-flow ODE driver: one home for every adaptive solve of ``dx/dsigma = (x - D) / sigma``.

Three places integrate the PF-ODE with torchdiffeq's error-controlled Runge-Kutta methods: the tight
reference solve every sampler error is measured against (``pf_ode_reference``), the adaptive sampler
(``samplers.adaptive_ode``) and the likelihood (``likelihood.log_likelihood``, with the divergence
carried along). They share ``integrate``: torchdiffeq's ``odeint`` with its failures (step-size
underflow, the step budget, a non-finite drift) turned into one :class:`ODESolveError` that names the
rows and the reason, instead of a bare ``AssertionError``.

References:
    Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021, eq. 13; Karras et al.,
    "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022, eq. 4 (the ODE
    in the sigma frame). Dormand & Prince, J. Comp. Appl. Math. 1980 (dopri5). Chen et al., "Neural
    Ordinary Differential Equations", NeurIPS 2018 (torchdiffeq).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["ADAPTIVE_METHODS", "ODESolveError", "integrate", "pf_ode_reference"]

#: torchdiffeq's adaptive-step methods; fixed-step ones would ignore ``rtol``/``atol``.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class ODESolveError(FloatingPointError):
    """The probability-flow ODE could not be solved for some rows.

    Attributes:
        failures: dict ``row index -> reason`` (non-finite drift, step-size underflow, too many steps).
        culprits: for a failure of a whole batch's step control, the rows that dominated the error
            estimate as it failed (empty when not known).
    """

    def __init__(self, failures: dict[int, str]):
        self.failures = dict(sorted(failures.items()))
        self.culprits: list[int] = []
        rows = list(self.failures)
        shown = "; ".join(f"row {i}: {self.failures[i]}" for i in rows[:10])
        more = f" (and {len(rows) - 10} more rows)" if len(rows) > 10 else ""
        super().__init__(
            f"the probability-flow ODE failed for {len(rows)} row(s): {shown}{more}. "
            "Check those inputs for extreme values, or loosen rtol/atol, or use float64."
        )


def integrate(
    drift: Callable,
    state: Tensor | tuple[Tensor, ...],
    times: Tensor,
    *,
    rtol: float,
    atol: float,
    method: str = "dopri5",
    rows: Iterable[int] | None = None,
    norm: Callable[[Tensor], Tensor] | None = None,
    max_steps: int | None = None,
    clamp: bool = False,
):
    """``torchdiffeq.odeint(drift, state, times)`` with failures raised as :class:`ODESolveError`.

    ``rows`` are the batch rows being solved (named in the error; default ``0 .. B-1``); ``norm`` is
    the error norm (default torchdiffeq's RMS over everything); ``max_steps`` caps accepted plus
    rejected steps. With ``clamp`` the drift is only ever evaluated at times inside ``times``' range:
    torchdiffeq's first-step probe and its last step may reach past the end (where, in log sigma
    and float32, ``exp(t)`` can overflow to ``inf``); there the drift of the nearest end is used.
    Returns the solution at every entry of ``times`` (a tensor or a tuple of them).
    """
    from torchdiffeq import odeint

    if method not in ADAPTIVE_METHODS:
        raise ValueError(f"method must be one of {ADAPTIVE_METHODS}; got {method!r}")
    if clamp:
        lo, hi = times.min(), times.max()
        inner = drift

        def drift(t, y):
            return inner(t.clamp(lo, hi), y)

    options = {}
    if norm is not None:
        options["norm"] = norm
    if max_steps is not None:
        options["max_num_steps"] = max_steps
    try:
        return odeint(drift, state, times, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as e:  # torchdiffeq signals step underflow / step budget this way
        msg = str(e)
        if "underflow" in msg:
            reason = "step size underflow (the drift is too stiff or rough at this tolerance)"
        elif "max_num_steps" in msg:
            reason = f"more than max_steps={max_steps} steps"
        else:
            reason = f"solver failure: {msg[:200]}"
        first = state[0] if isinstance(state, tuple) else state
        rows = range(first.shape[0]) if rows is None else rows
        raise ODESolveError({int(r): reason for r in rows}) from e


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
    """Solve the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` tightly.

    Integrates in ``sigma`` itself from ``sigma_start`` down to ``sigma_end`` (0 allowed: the drift
    ``-sigma * score`` is smooth there for targets with a density). ``x`` ``[B, ...]`` is the state at
    ``sigma_start``; the result has its shape. Use float64 for tolerances below ~1e-6. ``denoiser`` is
    called with ``sigma`` of shape ``[B]``. This is the reference every sampler's error is measured
    against, in tests, benchmarks and the fitted schedules and solvers.
    """
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
        return integrate(drift, x, span, rtol=rtol, atol=atol, method=method)[-1]
