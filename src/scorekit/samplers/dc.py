"""DC-Solver: UniPC with dynamic compensation, its ratios fitted on calibration noise and kept as JSON.

A predictor-corrector sampler evaluates the denoiser at the *predicted* point ``x~_i`` and then
corrects the state to ``x_i``; the next step uses ``D(x~_i)`` as if it were the output at ``x_i``.
DC-Solver compensates this misalignment by replacing ``D_i`` with the Lagrange polynomial through the
last ``K + 1`` outputs evaluated at a shifted noise level: with ``lambda = -log sigma``,

    D^_i = p(lambda_{i-1} + rho_i (lambda_i - lambda_{i-1})),    p through (lambda_{i-k}, D^_{i-k}), k <= K,

(``rho_i = 1`` leaves ``D_i`` unchanged). The ratios ``rho_i`` are fitted per step, greedily along
the trajectory, so that the state after each step matches the exact probability-flow solution from
the same calibration noise (``fit_dc``); they are plain numbers with a JSON round trip (``DCSolver``).

Cascade polynomial regression (``fit_dc_cascade``, ``DCCascade``) turns the ratios fitted at a few
NFEs into ratios for any NFE without fitting: a polynomial in the step's position along the schedule
per fitted NFE, then each of its coefficients a polynomial in the NFE; fitted at a few guidance
scales too (``scales=``), each of those a polynomial in the scale, so that ``for_scale(w)`` gives
ratios at an unfitted CFG scale (measured in ``scorekit bench guided_solvers --part dc``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from scorekit._util import check_int
from scorekit.pfode import pf_ode_reference
from scorekit.samplers.common import (
    LONG_STEP,
    GeneratorLike,
    check_long_step,
    check_sigmas,
    combine,
    emit,
    finish,
    is_long,
    lagrange_weights,
    prepare,
    sampler,
    steps,
)
from scorekit.samplers.ode import _unipc_weights

__all__ = ["DCCascade", "DCSolver", "dc_solver", "fit_dc", "fit_dc_cascade", "regress_ratios"]


def _check_ratios(ratios, n: int) -> list[float] | None:
    if ratios is None:
        return None
    r = [float(v) for v in ratios]
    if len(r) != n or not all(math.isfinite(v) and v > 0 for v in r):
        raise ValueError(
            f"ratios must be {n} finite positive numbers (one per step of sigmas); got {list(ratios)}"
        )
    return r


def _compensate(hist: list[tuple[float, Tensor]], rho: float, k: int) -> Tensor:
    """``p(lambda_{i-1} + rho (lambda_i - lambda_{i-1}))`` for ``p`` through the first ``k + 1`` of
    ``hist`` (``(lambda, D)``, most recent first)."""
    lam0 = hist[0][0]
    at = (rho - 1.0) * (lam0 - hist[1][0])  # the shifted level, relative to lambda_i
    nodes = [l - lam0 for l, _ in hist[: k + 1]]
    w = lagrange_weights(nodes, [at**j for j in range(k + 1)])
    return combine(hist[0][1], 0.0, w, [t for _, t in hist[: k + 1]])


@sampler(nfe=lambda n, o: n)
def dc_solver(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    ratios: Sequence[float] | DCCascade | None = None,
    order: int = 3,
    variant: str = "bh2",
    dc_order: int = 2,
    long_step: float | None = LONG_STEP,
) -> Tensor:
    """DC-Solver: ``unipc`` (``order``, ``variant``) whose latest output is dynamically compensated.

    Before step ``i`` (``i >= dc_order``, once ``dc_order + 1`` outputs exist), ``D_i`` in the
    history is replaced by ``D^_i`` (module docstring) with ``rho = ratios[i]``; the predictor, the
    next corrector and later compensations all use ``D^_i``, and the step to ``sigma = 0`` returns
    ``D^_{N-1}``. ``ratios`` has one entry per step (``len(sigmas) - 1``; entries ``i < dc_order`` are
    not used), or is a ``DCCascade`` (``fit_dc_cascade``), which gives the ratios for these ``sigmas``
    by its regression (its options must be the ones given here); ``None`` (or all ones) with ``long_step=None`` is exactly ``unipc``. A long step
    (``sigma_i / sigma_{i+1} > long_step``, default 10, ``common.LONG_STEP``) is first order and its
    end point is not corrected (as ``sa_solver``). The ratios belong to one ``sigmas`` and
    one denoiser: ``fit_dc`` fits them. ``NFE = N``. The compensation moves ``D_i`` by ``O(h)``, so
    with fixed ratios ``!= 1`` the method trades its asymptotic order for accuracy at the fitted few
    steps (measured in ``tests/test_samplers_new.py``).

    References:
        Zhao et al., "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic
        Compensation", ECCV 2024, eq. 9-11 (compensation by Lagrange interpolation with ratio
        ``rho_i``) and Sec. 3.3 (ratios searched on a few reference trajectories). The paper
        interpolates in the model's time ``t``; here in ``lambda = -log sigma``, the variable of the
        sigma frame. Zhao et al., "UniPC", NeurIPS 2023 (the base sampler).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2'; got {variant!r}")
    check_int("dc_order", dc_order, least=1, most=3)
    long_step = check_long_step(long_step)
    s, model = prepare(denoiser, x, sigmas)
    if isinstance(ratios, DCCascade):
        ratios = ratios.ratios_for(s, order=order, variant=variant, dc_order=dc_order)
    rho = _check_ratios(ratios, len(s) - 1)
    keep = max(order, dc_order + 1)
    hist: list[tuple[float, Tensor]] = []  # (lambda, D or D^), most recent first
    plan = None  # (x_i, h, hist_i, p) of the step that produced the current x
    for i in steps(len(s) - 1, progress):
        s0, s1 = s[i], s[i + 1]
        d = model(x, s0)
        if plan is not None:  # UniC on the point just predicted, with the new output d
            x_prev, h_prev, hist_prev, p_prev = plan
            w = _unipc_weights(hist_prev, h_prev, p_prev, variant, corrector=True)
            x = combine(x_prev, math.exp(-h_prev), w, [*[t for _, t in hist_prev[:p_prev]], d])
        emit(callback, i, s0, x, d)
        hist = [(-math.log(s0), d), *hist[: keep - 1]]
        if rho is not None and i >= dc_order and rho[i] != 1.0:
            hist[0] = (hist[0][0], _compensate(hist, rho[i], dc_order))
        if s1 == 0:
            x = hist[0][1]
            break
        h = math.log(s0 / s1)
        long = is_long(s0, s1, long_step)
        p = 1 if long else min(order, len(hist))
        w = _unipc_weights(hist[:p], h, p, variant, corrector=False)
        plan = None if long else (x, h, hist, p)
        x = combine(x, s1 / s0, w, [t for _, t in hist[:p]])
    return finish(x)


@dataclass(frozen=True)
class DCSolver:
    """Fitted DC-Solver ratios for one ``sigmas``: call ``solver(denoiser, x)`` with ``x`` at ``sigmas[0]``.

    Attributes:
        sigmas: ``[N + 1]`` float64, ending in 0.
        ratios: ``N`` compensation ratios (entries ``i < dc_order`` are 1).
        order, variant, dc_order: the options of ``dc_solver``.
        calibration_rms: RMS error per coordinate on the calibration batch, ``(unipc, fitted)``.
        scale: the guidance scale of the denoiser it was fitted to, when the fit is one of a cascade
            over scales (``fit_dc_cascade(scales=...)``); ``None`` otherwise.
    """

    sigmas: Tensor
    ratios: tuple[float, ...]
    order: int
    variant: str
    dc_order: int
    calibration_rms: tuple[float, float]
    scale: float | None = None

    @property
    def nfe(self) -> int:
        """Denoiser calls per sample."""
        return len(self.sigmas) - 1

    def __call__(self, denoiser: Callable, x: Tensor, *, callback: Callable | None = None,
                 progress: bool = False) -> Tensor:  # fmt: skip
        return dc_solver(
            denoiser, x, self.sigmas, ratios=self.ratios, order=self.order, variant=self.variant,
            dc_order=self.dc_order, callback=callback, progress=progress,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain numbers and lists, for JSON (``scale`` only when set)."""
        out = {
            "sigmas": self.sigmas.tolist(), "ratios": list(self.ratios), "order": self.order,
            "variant": self.variant, "dc_order": self.dc_order,
            "calibration_rms": list(self.calibration_rms),
        }  # fmt: skip
        return out if self.scale is None else {**out, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict) -> DCSolver:
        """The inverse of ``to_dict``; validates the sigmas, ratios and options."""
        missing = {"sigmas", "ratios", "order", "variant", "dc_order"} - set(d)
        if missing:
            raise ValueError(f"a DCSolver dict needs the keys {sorted(missing)}")
        s = check_sigmas(d["sigmas"])
        ratios = _check_ratios(d["ratios"], len(s) - 1)
        order, variant, dc_order = _stored_options(d)
        rms = tuple(float(v) for v in d.get("calibration_rms", (math.nan, math.nan)))
        scale = d.get("scale")
        if scale is not None:
            scale = _check_scales([scale], "scale")[0]
        return cls(
            torch.tensor(s, dtype=torch.float64),
            tuple(ratios),
            order,
            variant,
            dc_order,
            rms,
            scale,
        )


def _check_scales(scales, name: str = "scales") -> list[float]:
    """Finite, distinct guidance scales, or a one-line error."""
    ok = isinstance(scales, list | tuple) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scales
    )
    if not ok or not all(math.isfinite(v) for v in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"{name} must be finite, distinct numbers; got {scales!r}")
    return [float(v) for v in scales]


def _stored_options(d: dict) -> tuple[int, str, int]:
    """``(order, variant, dc_order)`` read from a stored DCSolver / DCCascade dict, or a one-line error."""
    order, variant, dc_order = d["order"], d["variant"], d["dc_order"]
    ints = all(type(v) is int for v in (order, dc_order))  # not bool: True == 1
    if (
        not ints
        or order not in (1, 2, 3)
        or variant not in ("bh1", "bh2")
        or dc_order not in (1, 2, 3)
    ):
        raise ValueError(
            f"order must be 1-3, variant 'bh1'/'bh2', dc_order 1-3; got {order!r}, "
            f"{variant!r}, {dc_order!r}"
        )
    return order, variant, dc_order


class _Stop(Exception):
    """Raised from a callback to end a calibration run once the state of interest is seen."""


def _state_after(denoiser, x, sigmas, ratios, i, opts) -> Tensor:
    """The state after step ``i`` (at ``sigmas[i + 1]``; the sample if that is 0)."""
    if i == len(sigmas) - 2:
        return dc_solver(denoiser, x, sigmas, ratios=ratios, **opts)
    seen = {}

    def grab(info):
        if info["i"] == i + 1:
            seen["x"] = info["x"]
            raise _Stop

    try:
        dc_solver(denoiser, x, sigmas, ratios=ratios, callback=grab, **opts)
    except _Stop:
        pass
    return seen["x"]


def _golden(f: Callable[[float], float], lo: float, hi: float, grid: int, iters: int) -> float:
    """Minimise ``f`` on ``[lo, hi]``: the best of ``grid`` points, then golden-section around it."""
    pts = [lo + (hi - lo) * k / (grid - 1) for k in range(grid)]
    vals = [f(p) for p in pts]
    k = min(range(grid), key=vals.__getitem__)
    a, b = pts[max(k - 1, 0)], pts[min(k + 1, grid - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    best = min([(vals[k], pts[k]), (fc, c), (fd, d)])
    return best[1]


def fit_dc(
    denoiser: Callable,
    sigmas: Tensor | Sequence[float],
    *,
    shape: Sequence[int] | None = None,
    calibration: Tensor | None = None,
    order: int = 3,
    variant: str = "bh2",
    dc_order: int = 2,
    seed: int = 0,
    bounds: tuple[float, float] = (0.2, 2.0),
    reference_rtol: float = 1e-9,
    dtype: torch.dtype = torch.float64,
) -> DCSolver:
    """Fit DC-Solver's ratios on ``sigmas`` to ``denoiser`` on calibration noise.

    Draws ``x = sigmas[0] * z``, ``z ~ N(0, I)`` of ``shape`` (seeded by ``seed``; or takes
    ``calibration``, the start states at ``sigmas[0]``), solves the probability-flow ODE from it
    tightly to every ``sigmas[i]`` (``pf_ode_reference``), then for ``i = dc_order, ..., N - 1`` in
    turn, with the earlier ratios fixed, picks ``rho_i`` in ``bounds`` minimising the mean squared
    distance between the state after step ``i`` and the reference there (a grid of 11 points, then
    golden-section search: one-dimensional, no gradients through the denoiser). Calibration costs
    about ``25 N^2 / 2`` denoiser calls on the batch. Evaluate the result on other noise.

    Returns:
        A ``DCSolver`` holding ``sigmas``, the ratios and the calibration RMS before and after.

    References:
        Zhao et al., "DC-Solver", ECCV 2024, Sec. 3.3 (searching the compensation ratios).
    """
    s = check_sigmas(sigmas)
    n = len(s) - 1
    sig = torch.tensor(s, dtype=torch.float64)
    if calibration is None:
        if shape is None:
            raise ValueError(
                "give shape (of the calibration batch) or calibration (its start states)"
            )
        g = torch.Generator().manual_seed(seed)
        calibration = s[0] * torch.randn(tuple(shape), generator=g, dtype=dtype)
    x0 = calibration
    refs, cur = [x0], x0
    for k in range(n):  # the exact state at every sigmas[k + 1]
        cur = pf_ode_reference(
            denoiser, cur, s[k], s[k + 1], rtol=reference_rtol, atol=reference_rtol
        )
        refs.append(cur)
    opts = {"order": order, "variant": variant, "dc_order": dc_order}
    ratios = [1.0] * n

    def rms(r) -> float:
        out = dc_solver(denoiser, x0.clone(), sig, ratios=r, **opts)
        return float((out - refs[-1]).square().mean().sqrt())

    before = rms(ratios)
    for i in range(dc_order, n):

        def loss(rho: float, i=i) -> float:
            trial = [*ratios[:i], rho, *[1.0] * (n - i - 1)]
            out = _state_after(denoiser, x0.clone(), sig, trial, i, opts)
            return float((out - refs[i + 1]).square().mean())

        ratios[i] = _golden(loss, bounds[0], bounds[1], grid=11, iters=12)
    return DCSolver(sig, tuple(ratios), order, variant, dc_order, (before, rms(ratios)))


# -- cascade polynomial regression ---------------------------------------------------------------------


def _positions(s: Sequence[float]) -> list[float]:
    """Each step's position ``u_i = log(sigma_0 / sigma_i) / log(sigma_0 / sigma_{N-1})`` in [0, 1]."""
    n = len(s) - 1
    if n < 2:
        return [0.0] * n
    span = math.log(s[0] / s[n - 1])
    return [math.log(s[0] / s[i]) / span for i in range(n)]


def _lstsq_poly(xs: Sequence[float], ys: Sequence[float], degree: int) -> list[float]:
    """Least-squares coefficients (lowest power first) of a polynomial of ``degree`` through (xs, ys)."""
    x = torch.tensor(xs, dtype=torch.float64)
    v = torch.stack([x**k for k in range(degree + 1)], 1)
    y = torch.tensor(ys, dtype=torch.float64)[:, None]
    return torch.linalg.lstsq(v, y, driver="gelsd").solution[:, 0].tolist()


def regress_ratios(solvers: Sequence[DCSolver], *, degrees: tuple[int, ...] = (2, 1)) -> tuple:
    """Cascade polynomial regression of fitted ratios: coefficients ``c[m][j]`` with

        rho(u, N) = sum_m a_m(N) u^m,        a_m(N) = sum_j c[m][j] N^j,

    ``u`` the step's position along its schedule (``log(sigma_0 / sigma_i) / log(sigma_0 /
    sigma_{N-1})``) and ``N`` the number of steps (the NFE). Stage 1 fits, per solver, the ratios of
    the compensated steps (``i >= dc_order``) by least squares with a polynomial of degree
    ``degrees[0]`` in ``u``; stage 2 fits each coefficient ``a_m`` over the solvers by least squares
    with a polynomial of degree ``degrees[1]`` in ``N``. Needs ``degrees[0] + 1`` compensated steps
    per solver and ``degrees[1] + 1`` distinct NFEs.

    Three degrees ``(p, q, r)``, for solvers fitted at several guidance scales ``w`` (``scale`` set on
    each; ``fit_dc_cascade(scales=...)``): stages 1-2 run per scale, and stage 3 fits each ``c[m][j]``
    over the scales by least squares with a polynomial of degree ``r`` in ``w``; the result is
    ``c[m][j][l]`` with ``rho(u, N, w) = sum_m sum_j (sum_l c[m][j][l] w^l) N^j u^m``. Needs ``r + 1``
    distinct scales, each with ``q + 1`` distinct NFEs.

    References:
        Zhao et al., "DC-Solver", ECCV 2024, Sec. 3.4 (cascade polynomial regression: ratios for
        unseen sampling configurations without searching).
    """
    if not isinstance(degrees, list | tuple) or len(degrees) not in (2, 3):
        raise ValueError(f"degrees must be (position, NFE[, scale]) degrees; got {degrees!r}")
    if not solvers or not all(isinstance(v, DCSolver) for v in solvers):
        raise TypeError("solvers must be a non-empty sequence of DCSolver (from fit_dc)")
    opts = {(v.order, v.variant, v.dc_order) for v in solvers}
    if len(opts) > 1:
        raise ValueError(f"solvers must share order, variant and dc_order; got {sorted(opts)}")
    if len(degrees) == 3:
        r = check_int("degrees[2]", degrees[2], least=0)
        if any(v.scale is None for v in solvers):
            raise ValueError("degrees has a scale degree, so every solver needs its scale set")
        groups: dict[float, list[DCSolver]] = {}
        for v in solvers:
            groups.setdefault(v.scale, []).append(v)
        if len(groups) < r + 1:
            raise ValueError(
                f"degrees[2] = {r} needs at least {r + 1} distinct scales; got {sorted(groups)}"
            )
        ws = sorted(groups)
        per = [regress_ratios(groups[w], degrees=tuple(degrees[:2])) for w in ws]
        return tuple(
            tuple(tuple(_lstsq_poly(ws, [c[m][j] for c in per], r)) for j in range(len(row)))
            for m, row in enumerate(per[0])
        )
    p, q = (check_int(f"degrees[{k}]", d, least=0) for k, d in enumerate(degrees))
    nfes = [v.nfe for v in solvers]
    if len(set(nfes)) < q + 1:
        raise ValueError(
            f"degrees[1] = {q} needs at least {q + 1} distinct NFEs; got {sorted(set(nfes))}"
        )
    a = []
    for v in solvers:
        k = v.dc_order
        if v.nfe - k < p + 1:
            raise ValueError(
                f"degrees[0] = {p} needs at least {p + 1} compensated steps; the solver with NFE "
                f"{v.nfe} has {max(v.nfe - k, 0)} (steps dc_order = {k} .. N - 1)"
            )
        u = _positions(v.sigmas.tolist())[k:]
        a.append(_lstsq_poly(u, v.ratios[k:], p))
    return tuple(tuple(_lstsq_poly(nfes, [am[m] for am in a], q)) for m in range(p + 1))


@dataclass(frozen=True)
class DCCascade:
    """DC-Solver ratios for any NFE (and guidance scale), regressed from per-NFE fits (``fit_dc_cascade``).

    Attributes:
        coefficients: ``c[m][j]`` of ``regress_ratios`` (``degrees[0] + 1`` rows of ``degrees[1] + 1``);
            for a cascade over guidance scales, ``c[m][j][l]`` (``degrees[2] + 1`` innermost).
        order, variant, dc_order: the options of ``dc_solver`` it was fitted for.
        bounds: ``(lo, hi)``: regressed ratios are clipped to the search interval of the fits.
        solvers: the per-NFE fits it was regressed from (kept in its JSON).
        scales: the guidance scales it was fitted at (empty: not a cascade over scales). Such a
            cascade gives one scale's ratios by ``for_scale(w)``, which is what ``dc_solver`` takes.
    """

    coefficients: tuple
    order: int
    variant: str
    dc_order: int
    bounds: tuple[float, float]
    solvers: tuple[DCSolver, ...] = ()
    scales: tuple[float, ...] = ()

    @property
    def nfes(self) -> tuple[int, ...]:
        """The NFEs of the fits it was regressed from."""
        return tuple(v.nfe for v in self.solvers)

    def for_scale(self, scale: float) -> DCCascade:
        """The cascade over NFE at guidance scale ``scale``: ``a_m(N) = sum_j (sum_l c[m][j][l] w^l)
        N^j``. Between the fitted scales it interpolates; beyond them it extrapolates a polynomial."""
        if not self.scales:
            raise ValueError("this DCCascade was not fitted over guidance scales; use it as it is")
        w = _check_scales([scale], "scale")[0]
        coef = tuple(
            tuple(sum(c * w**l for l, c in enumerate(cl)) for cl in row)
            for row in self.coefficients
        )
        fits = tuple(v for v in self.solvers if v.scale == w)
        return DCCascade(coef, self.order, self.variant, self.dc_order, self.bounds, fits)

    def ratio(self, u: float, n: int) -> float:
        """``rho(u, N)``, clipped to ``bounds``."""
        if self.scales:
            raise ValueError(
                f"this DCCascade was fitted over guidance scales {list(self.scales)}: take one "
                "scale's ratios with .for_scale(w)"
            )
        val = sum(
            sum(c * n**j for j, c in enumerate(row)) * u**m
            for m, row in enumerate(self.coefficients)
        )
        return min(max(val, self.bounds[0]), self.bounds[1])

    def ratios_for(self, sigmas, *, order: int, variant: str, dc_order: int) -> list[float]:
        """One ratio per step of ``sigmas`` (1 before ``dc_order``) for ``dc_solver`` with these options."""
        if (order, variant, dc_order) != (self.order, self.variant, self.dc_order):
            raise ValueError(
                f"this DCCascade was fitted for order={self.order}, variant={self.variant!r}, "
                f"dc_order={self.dc_order}; got {order}, {variant!r}, {dc_order}"
            )
        s = check_sigmas(sigmas)
        n = len(s) - 1
        return [1.0 if i < dc_order else self.ratio(u, n) for i, u in enumerate(_positions(s))]

    def __call__(self, denoiser: Callable, x: Tensor, sigmas, *, callback: Callable | None = None,
                 progress: bool = False) -> Tensor:  # fmt: skip
        return dc_solver(
            denoiser, x, sigmas, ratios=self, order=self.order, variant=self.variant,
            dc_order=self.dc_order, callback=callback, progress=progress,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain numbers and lists, for JSON: the regression and the fits it came from."""
        nest = (lambda r: [list(c) for c in r]) if self.scales else list
        out = {
            "coefficients": [nest(r) for r in self.coefficients], "order": self.order,
            "variant": self.variant, "dc_order": self.dc_order, "bounds": list(self.bounds),
            "solvers": [v.to_dict() for v in self.solvers],
        }  # fmt: skip
        return {**out, "scales": list(self.scales)} if self.scales else out

    @classmethod
    def from_dict(cls, d: dict) -> DCCascade:
        """The inverse of ``to_dict``; validates the coefficients, options and fits."""
        missing = {"coefficients", "order", "variant", "dc_order", "bounds"} - set(d)
        if missing:
            raise ValueError(f"a DCCascade dict needs the keys {sorted(missing)}")
        scales = tuple(_check_scales(d.get("scales", [])))
        coef = _rectangular(d["coefficients"], 3 if scales else 2)
        if scales and len(scales) < len(coef[0][0]):
            raise ValueError(
                f"a scale degree of {len(coef[0][0]) - 1} needs at least {len(coef[0][0])} scales; "
                f"got {list(scales)}"
            )
        bounds = d["bounds"]
        if not isinstance(bounds, list | tuple) or len(bounds) != 2:
            raise ValueError(f"bounds must be [lo, hi]; got {bounds!r}")
        lo, hi = (float(v) for v in bounds)
        if not 0 < lo < hi < math.inf:
            raise ValueError(f"bounds must be 0 < lo < hi; got {bounds}")
        solvers = tuple(DCSolver.from_dict(v) for v in d.get("solvers", ()))
        order, variant, dc_order = _stored_options(d)
        other = [
            v.nfe for v in solvers if (v.order, v.variant, v.dc_order) != (order, variant, dc_order)
        ]
        if other:
            raise ValueError(
                f"solvers (NFE {other}) were fitted with other options than the cascade's "
                f"order={order}, variant={variant!r}, dc_order={dc_order}"
            )
        if scales and any(v.scale not in scales for v in solvers):
            raise ValueError(f"solvers carry scales outside the cascade's {list(scales)}")
        return cls(coef, order, variant, dc_order, (lo, hi), solvers, scales)


def _rectangular(x, depth: int) -> tuple:
    """``x`` as nested tuples of finite floats, rectangular, ``depth`` levels deep; or a one-line error."""

    def walk(v, k):
        if k == 0:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError
            return float(v)
        if not isinstance(v, list | tuple) or not v:
            raise ValueError
        out = tuple(walk(e, k - 1) for e in v)
        if k > 1 and len({shape(e) for e in out}) != 1:
            raise ValueError
        return out

    def shape(v) -> tuple[int, ...]:
        return (len(v), *shape(v[0])) if isinstance(v, tuple) else ()

    try:
        return walk(x, depth)
    except ValueError:
        raise ValueError(
            f"coefficients must be a non-empty rectangular {depth}-level list of finite numbers"
            + (" (a cascade over scales)" if depth == 3 else "")
        ) from None


def fit_dc_cascade(
    denoiser: Callable,
    schedules: Sequence[Tensor | Sequence[float]],
    *,
    degrees: tuple[int, ...] | None = None,
    bounds: tuple[float, float] = (0.2, 2.0),
    scales: Sequence[float] | None = None,
    **fit_options,
) -> DCCascade:
    """``fit_dc`` on each of ``schedules`` (one per NFE), then ``regress_ratios``: ratios for any NFE.

    ``fit_options`` go to every ``fit_dc`` (``shape`` or ``calibration``, ``order``, ``variant``,
    ``dc_order``, ``seed``, ``reference_rtol``, ``dtype``). Use the same schedule family and range for
    the fits and for the NFEs it is used at: the regression is in the step's position along the
    schedule and in ``N``, so it interpolates between fitted NFEs (extrapolation beyond them is a
    polynomial's). Costs the fits' calls (about ``25 N^2 / 2`` per schedule) and nothing per use.
    ``degrees``: ``(2, 1)`` by default (position, NFE).

    Over guidance scales (the paper's cascade over NFE *and* CFG scale): with ``scales`` given,
    ``denoiser`` is a function ``w -> denoiser`` (e.g. ``lambda w: cfg(cond, uncond, w)``), every
    schedule is fitted at every scale (``len(schedules) * len(scales)`` fits, each on the same
    calibration noise), and the regression gains a polynomial in ``w`` (``degrees`` ``(2, 1, 2)`` by
    default); ``cascade.for_scale(w)`` then gives the ratios at an unfitted scale without fitting.
    A guided call costs the guided denoiser's network evaluations (two for CFG).

    References:
        Zhao et al., "DC-Solver", ECCV 2024, Sec. 3.3-3.4 (cascade polynomial regression over the
        NFE and the classifier-free guidance scale).
    """
    if degrees is None:
        degrees = (2, 1) if scales is None else (2, 1, 2)
    want = 2 if scales is None else 3
    if not isinstance(degrees, list | tuple) or len(degrees) != want:
        raise ValueError(
            f"degrees must have {want} entries (position, NFE"
            + (", scale" if want == 3 else "") + f"); got {degrees!r}"
        )  # fmt: skip
    p, q = (check_int(f"degrees[{k}]", d, least=0) for k, d in enumerate(degrees[:2]))
    if isinstance(schedules, Tensor) or not schedules:
        raise ValueError(
            "schedules must be a non-empty list of sigma schedules (one per NFE, each ending in 0); "
            f"got {type(schedules).__name__}"
        )
    steps = [len(check_sigmas(s, name=f"schedules[{i}]")) - 1 for i, s in enumerate(schedules)]
    if len(set(steps)) < q + 1:  # checked before any fit: the fits are the expensive part
        raise ValueError(
            f"degrees[1] = {q} needs schedules of at least {q + 1} distinct NFEs; got {steps}"
        )
    k = fit_options.get("dc_order", 2)
    if min(steps) - k < p + 1:
        raise ValueError(
            f"degrees[0] = {p} needs at least {p + 1} compensated steps per schedule (NFE - "
            f"dc_order >= {p + 1}, dc_order = {k}); the shortest schedule has NFE {min(steps)}"
        )
    if scales is None:
        solvers = tuple(fit_dc(denoiser, s, bounds=bounds, **fit_options) for s in schedules)
    else:
        ws = _check_scales(list(scales) if not isinstance(scales, Tensor) else scales.tolist())
        r = check_int("degrees[2]", degrees[2], least=0)
        if len(ws) < r + 1:
            raise ValueError(f"degrees[2] = {r} needs at least {r + 1} scales; got {ws}")
        try:
            guided = denoiser(ws[0])
        except TypeError:
            guided = None
        if not callable(guided):
            raise TypeError(
                "denoiser: with scales= it must be a function w -> denoiser (e.g. lambda w: "
                f"cfg(cond, uncond, w)); calling it with w = {ws[0]} gave {type(guided).__name__}"
            )
        solvers = tuple(
            replace(fit_dc(denoiser(w), s, bounds=bounds, **fit_options), scale=w)
            for w in ws
            for s in schedules
        )
    coef = regress_ratios(solvers, degrees=tuple(degrees))
    v = solvers[0]
    return DCCascade(
        coef, v.order, v.variant, v.dc_order, (float(bounds[0]), float(bounds[1])), solvers,
        () if scales is None else tuple(sorted(ws)),
    )  # fmt: skip
