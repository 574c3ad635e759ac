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
the exact probability-flow ODE solutions from calibration noise. This is the family of the Bespoke
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

from scorekit.samplers.common import GeneratorLike, check_sigmas, emit, finish, prepare, steps

__all__ = ["LINEAR", "BespokeSolver", "bespoke", "fit_bespoke", "linear_coefficients"]

#: Samplers that are linear solvers with one denoiser call per step (``linear_coefficients`` accepts).
LINEAR: tuple[str, ...] = ("euler", "dpmpp_2m", "dpmpp_3m", "deis", "unipc", "ipndm")


def _base_function(base: str) -> Callable:
    from scorekit.samplers import REGISTRY

    if base not in LINEAR:
        raise ValueError(
            f"base must be a linear one-call-per-step sampler; got {base!r}; allowed: {list(LINEAR)}"
        )
    return REGISTRY[base]


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
        x = _state(x0, w[k + 1], outs)
    return finish(x)


def _state(x0: Tensor, row, outs: list[Tensor]) -> Tensor:
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


def _run(denoiser: Callable, x0: Tensor, a: Tensor, taus: Tensor) -> Tensor:
    """The linear solver with tensor coefficients and noise levels (differentiable in both)."""
    outs, x = [], x0
    for k in range(len(taus)):
        outs.append(denoiser(x, taus[k].expand(x.shape[0])))
        x = _state(x0, a[k + 1], outs)
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
    probability-flow ODE from it tightly (``schedules.pf_ode_reference``) to get ``x_ref`` (or takes
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
    from scorekit.schedules import pf_ode_reference

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
