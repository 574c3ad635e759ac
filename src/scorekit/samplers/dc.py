"""DC-Solver: UniPC with dynamic compensation, its ratios fitted on calibration noise and kept as JSON.

A predictor-corrector sampler evaluates the denoiser at the *predicted* point ``x~_i`` and then
corrects the state to ``x_i``; the next step uses ``D(x~_i)`` as if it were the output at ``x_i``.
DC-Solver compensates this misalignment by replacing ``D_i`` with the Lagrange polynomial through the
last ``K + 1`` outputs evaluated at a shifted noise level: with ``lambda = -log sigma``,

    D^_i = p(lambda_{i-1} + rho_i (lambda_i - lambda_{i-1})),    p through (lambda_{i-k}, D^_{i-k}), k <= K,

(``rho_i = 1`` leaves ``D_i`` unchanged). The ratios ``rho_i`` are fitted per step, greedily along
the trajectory, so that the state after each step matches the exact probability-flow solution from
the same calibration noise (``fit_dc``); they are plain numbers with a JSON round trip (``DCSolver``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

__all__ = ["DCSolver", "dc_solver", "fit_dc"]


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
    ratios: Sequence[float] | None = None,
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
    not used); ``None`` (or all ones) with ``long_step=None`` is exactly ``unipc``. A long step
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
    """

    sigmas: Tensor
    ratios: tuple[float, ...]
    order: int
    variant: str
    dc_order: int
    calibration_rms: tuple[float, float]

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
        """Plain numbers and lists, for JSON."""
        return {
            "sigmas": self.sigmas.tolist(), "ratios": list(self.ratios), "order": self.order,
            "variant": self.variant, "dc_order": self.dc_order,
            "calibration_rms": list(self.calibration_rms),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> DCSolver:
        """The inverse of ``to_dict``; validates the sigmas, ratios and options."""
        missing = {"sigmas", "ratios", "order", "variant", "dc_order"} - set(d)
        if missing:
            raise ValueError(f"a DCSolver dict needs the keys {sorted(missing)}")
        s = check_sigmas(d["sigmas"])
        ratios = _check_ratios(d["ratios"], len(s) - 1)
        order, variant, dc_order = d["order"], d["variant"], d["dc_order"]
        if order not in (1, 2, 3) or variant not in ("bh1", "bh2") or dc_order not in (1, 2, 3):
            raise ValueError(
                f"order must be 1-3, variant 'bh1'/'bh2', dc_order 1-3; got {order!r}, "
                f"{variant!r}, {dc_order!r}"
            )
        rms = tuple(float(v) for v in d.get("calibration_rms", (math.nan, math.nan)))
        return cls(
            torch.tensor(s, dtype=torch.float64), tuple(ratios), order, variant, dc_order, rms
        )


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
