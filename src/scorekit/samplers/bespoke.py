"""Bespoke linear solvers: a sampler's step coefficients and noise levels fitted to one denoiser.

Every sampler here that makes one denoiser call per step and combines its results linearly
(``LINEAR``: euler, dpmpp_2m, dpmpp_3m, deis, unipc, ipndm) is, on fixed ``sigmas``, a *linear
solver*. With the start ``x_0 = x`` at ``sigma_0``, ``D_k = D(x_k, sigma_k)`` and ``N`` steps,

    x_{k+1} = a_{k+1,0} x_0 + sum_{j <= k} a_{k+1,j+1} D_j,     k = 0 .. N-1,     sample = x_N,

with a lower-triangular matrix ``A`` (``[N + 1, N + 1]``; row 0 is the start, ``[1, 0, ...]``) that
depends only on the sigmas and the sampler's options. ``linear_coefficients`` reads it off by running
the sampler on basis vectors. Each row of ``A`` sums to 1: shifting the data and ``x`` by a vector
shifts the sample by the same vector.

A *bespoke* solver keeps this form, ``N`` denoiser calls, and fits ``A`` (rows still summing to 1) and
the sigmas to one denoiser: ``fit_bespoke`` minimises the mean squared distance between its samples and
the exact probability-flow ODE solutions from calibration noise (``samplers.fitted``). This is the family of the Bespoke
Non-Stationary solvers of Shaul et al. (their steps combine all previous states and velocities, which
spans the same samples), fitted here directly to the exact ODE solution, and with the analytic
teleport start (``accelerators.with_teleport``) as an option. The fit starts from a base sampler's
own coefficients, so on its calibration noise it is never worse than the base.

What it buys, and what it costs: at 5 calls on the 64-D mixture ``gmm64`` it halves the error of the
best fixed-coefficient sampler with an optimised schedule (``scorekit bench samplers``). A fitted
solver belongs to one denoiser and its data: it is not a general solver, and it needs a denoiser
that autograd can differentiate (an exact target or a network) and a tight reference solve of the
calibration batch, once per model and NFE.

References:
    Shaul, Singer, Ben-Hamu, Karrer, Lipman & Chen, "Bespoke Non-Stationary Solvers for Fast
    Sampling of Diffusion and Flow Models", ICML 2024, Sec. 3 (the non-stationary solver family) and
    Sec. 4 (fitting it to the exact solution from noise). Kingma & Ba, "Adam", ICLR 2015.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from scorekit._util import lookup
from scorekit.samplers.common import (
    GeneratorLike,
    check_sigmas,
    emit,
    finish,
    prepare,
    sampler,
    steps,
)
from scorekit.samplers.ode import deis, dpmpp_2m, dpmpp_3m, euler, ipndm, unipc

__all__ = ["LINEAR", "BespokeSolver", "bespoke", "linear_coefficients", "linear_state"]

#: Samplers that are linear solvers with one denoiser call per step (``linear_coefficients`` accepts).
LINEAR: dict[str, Callable] = {
    "euler": euler, "dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m, "deis": deis, "unipc": unipc,
    "ipndm": ipndm,
}  # fmt: skip


def _base_function(base: str) -> Callable:
    return lookup(LINEAR, base, "base (a linear one-call-per-step sampler)")


def linear_coefficients(base: str, sigmas: Tensor | Sequence[float], **options) -> Tensor:
    """The matrix ``A`` of sampler ``base`` on ``sigmas`` (see the module docstring), float64 ``[N+1, N+1]``.

    Read off exactly: the sampler runs on a one-row state holding coefficient vectors, starting from
    ``e_0``, with a stand-in denoiser whose ``k``-th call returns ``e_{k+1}``; every state it passes to
    the denoiser, and its result, are then their own rows of ``A``.

    Raises:
        ValueError: ``base`` not in ``LINEAR``, invalid ``sigmas``, or a sampler that did not call the
            denoiser once per step at ``sigmas[k]``.
    """
    fn = _base_function(base)
    s = check_sigmas(sigmas)
    n = len(s) - 1
    rows: list[Tensor] = [torch.zeros(n + 1, dtype=torch.float64)]
    rows[0][0] = 1.0
    seen: list[Tensor] = []  # the sigmas of the calls, read on the host once at the end

    def basis(x: Tensor, sigma: Tensor) -> Tensor:
        k = len(seen)
        if k >= n:
            raise ValueError(f"{base} called the denoiser more than once per step on {n} steps")
        seen.append(sigma[0])
        if k > 0:
            rows.append(x[0].detach().clone())
        e = torch.zeros_like(x)
        e[:, k + 1] = 1.0
        return e

    start = torch.zeros(1, n + 1, dtype=torch.float64)
    start[0, 0] = 1.0
    out = fn(basis, start, torch.tensor(s, dtype=torch.float64), **options)
    called = torch.stack(seen).tolist() if seen else []
    if len(called) != n or any(
        abs(a - b) > 1e-12 * max(1.0, b) for a, b in zip(called, s[:-1], strict=True)
    ):
        raise ValueError(
            f"{base} did not call the denoiser once per step at sigmas[k]: called at {called}"
        )
    rows.append(out[0].detach().clone())
    return torch.stack(rows)


def _check_coefficients(a: Tensor, n: int) -> Tensor:
    if not isinstance(a, Tensor):
        a = torch.as_tensor(a, dtype=torch.float64)
    if a.shape != (n + 1, n + 1):
        raise ValueError(
            f"coefficients must have shape [N + 1, N + 1] = [{n + 1}, {n + 1}] for {n} steps; "
            f"got {tuple(a.shape)}"
        )
    a = a.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError("coefficients must be finite")
    # Row k (state k >= 1) may combine x_0 and D_0 .. D_{k-1}: columns 0 .. k.
    upper = torch.triu(a[1:], diagonal=2)
    if upper.abs().max() > 0:
        r, j = (int(v) for v in (upper.abs() > 0).nonzero()[0])
        raise ValueError(
            f"coefficients[{r + 1}, {j}] = {float(a[r + 1, j]):.4g}: state {r + 1} may combine only "
            f"x_0 and D_0 .. D_{r} (columns 0 .. {r + 1}); the matrix must be lower-triangular"
        )
    return a


@sampler(nfe=lambda n, o: n)
def bespoke(
    denoiser: Callable,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    coefficients: Tensor | None = None,
    base: str = "ipndm",
) -> Tensor:
    """A linear solver with explicit coefficients: ``x_{k+1} = a_{k+1,0} x_0 + sum_j a_{k+1,j+1} D_j``.

    ``coefficients`` is the ``[N + 1, N + 1]`` lower-triangular matrix ``A`` of the module docstring,
    usually from ``fit_bespoke`` (``BespokeSolver.coefficients``, with its own ``sigmas``). Left
    ``None``, it is ``linear_coefficients(base, sigmas)``: the sampler is then ``base`` itself,
    written as a linear solver (with the base's default options). ``NFE = N``. Keeps the ``N``
    denoiser outputs and recombines them at every step: ``N (N + 1) / 2`` tensor additions in all.

    References:
        Shaul et al., "Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion and Flow
        Models", ICML 2024, Sec. 3.
    """
    s, model = prepare(denoiser, x, sigmas)
    n = len(s) - 1
    a = (
        linear_coefficients(base, s)
        if coefficients is None
        else _check_coefficients(coefficients, n)
    )
    w = a.tolist()  # one host read; the loop below uses Python floats only
    x0, outs = x, []
    for k in steps(n, progress):
        d = model(x, s[k])
        emit(callback, k, s[k], x, d)
        outs.append(d)
        x = linear_state(x0, w[k + 1], outs)
    return finish(x)


def linear_state(x0: Tensor, row, outs: list[Tensor]) -> Tensor:
    """``row[0] x_0 + sum_j row[j + 1] D_j``: host floats in sampling, tensors (autograd) in fitting."""
    x = x0 * row[0]
    for j, dj in enumerate(outs):
        x = x + row[j + 1] * dj
    return x


@dataclass(frozen=True)
class BespokeSolver:
    """A fitted linear solver: call it as ``solver(denoiser, x)`` with ``x`` noise at ``sigma_max``.

    Attributes:
        sigmas: ``[N + 1]`` float64, the noise levels of its ``N`` denoiser calls, then 0.
        coefficients: ``[N + 1, N + 1]`` float64, the matrix ``A``.
        sigma_max: the noise level of the start ``x``; above ``sigmas[0]`` when ``teleport``.
        teleport: whether ``x`` is first moved from ``sigma_max`` to ``sigmas[0]`` along the data's
            Gaussian approximation (then pass ``gaussian`` to ``__call__``).
        base: the sampler the fit started from.
        calibration_rms: RMS error per coordinate on the calibration batch, ``(base, fitted)``.
    """

    sigmas: Tensor
    coefficients: Tensor
    sigma_max: float
    teleport: bool
    base: str
    calibration_rms: tuple[float, float]

    @property
    def nfe(self) -> int:
        """Denoiser calls per sample."""
        return len(self.sigmas) - 1

    def __call__(
        self,
        denoiser: Callable,
        x: Tensor,
        *,
        gaussian=None,
        callback: Callable | None = None,
        progress: bool = False,
    ) -> Tensor:
        if self.teleport:
            if gaussian is None:
                raise ValueError(
                    "this solver was fitted with the teleport start: pass gaussian= (the "
                    "GaussianFlow it was fitted with)"
                )
            x = gaussian(x, self.sigma_max, float(self.sigmas[0]))
        return bespoke(
            denoiser, x, self.sigmas, coefficients=self.coefficients,
            callback=callback, progress=progress,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Plain numbers and lists, for JSON."""
        return {
            "sigmas": self.sigmas.tolist(),
            "coefficients": self.coefficients.tolist(),
            "sigma_max": self.sigma_max,
            "teleport": self.teleport,
            "base": self.base,
            "calibration_rms": list(self.calibration_rms),
        }

    @classmethod
    def from_dict(cls, d: dict) -> BespokeSolver:
        """The inverse of ``to_dict``; validates the sigmas and the coefficient matrix."""
        missing = {"sigmas", "coefficients", "sigma_max", "teleport", "base"} - set(d)
        if missing:
            raise ValueError(f"a BespokeSolver dict needs the keys {sorted(missing)}")
        s = check_sigmas(d["sigmas"])
        if not float(d["sigma_max"]) >= s[0] * (1 - 1e-12):
            raise ValueError(f"sigma_max {d['sigma_max']} must be >= sigmas[0] = {s[0]}")
        a = _check_coefficients(torch.tensor(d["coefficients"], dtype=torch.float64), len(s) - 1)
        rms = tuple(float(v) for v in d.get("calibration_rms", (math.nan, math.nan)))
        return cls(
            torch.tensor(s, dtype=torch.float64), a, float(d["sigma_max"]),
            bool(d["teleport"]), str(d["base"]), rms,
        )  # fmt: skip
