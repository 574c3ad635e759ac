"""Sampler plumbing, public for anyone writing a sampler, guidance rule or posterior solver: sigma
validation, the checked denoiser call, callbacks, progress, per-row noise, and the host-side
coefficient maths (phi functions, Lagrange weights).

Everything here runs once per sampler call or works on Python floats, so the sampling loops stay free
of host-device synchronisation: ``sigmas`` is read to the host once, per-step scalars are Python
floats, and the denoiser's output is checked for NaN/inf only at the first call and on the final
sample (one synchronisation each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from scorekit._util import check_finite, check_number, mix_seed

__all__ = [
    "LONG_STEP",
    "GeneratorLike",
    "Model",
    "PresetNoise",
    "check_long_step",
    "check_sigmas",
    "combine",
    "emit",
    "finish",
    "is_long",
    "lagrange_weights",
    "phi",
    "phis",
    "prepare",
    "randn_like",
    "row_generators",
    "sampler",
    "steps",
]


class PresetNoise:
    """Noise drawn in advance, passed as a sampler's ``generator``: its ``k``-th ``randn_like`` call
    returns ``draws[k]`` instead of a fresh draw, so the sampler is a deterministic function of its
    start and these draws (``parallel_sample`` runs stochastic samplers this way).

    Args:
        draws: ``[K, B, ...]`` (a tensor or a sequence of ``[B, ...]`` tensors), or a function
            ``(k, x) -> [B, ...]`` giving draw ``k`` for a state like ``x``.

    ``count`` is the number of draws taken so far; asking for more than ``K``, or a draw of another
    shape than the state, is a one-line ``ValueError``.
    """

    def __init__(self, draws: Tensor | Sequence[Tensor] | Callable[[int, Tensor], Tensor]):
        self.draws, self.count = draws, 0

    def __call__(self, x: Tensor) -> Tensor:
        k = self.count
        if callable(self.draws):
            z = self.draws(k, x)
        elif k < len(self.draws):
            z = self.draws[k]
        else:
            raise ValueError(
                f"PresetNoise: the sampler asked for draw {k + 1}; only {len(self.draws)} were given"
            )
        if tuple(z.shape) != tuple(x.shape):
            raise ValueError(
                f"PresetNoise: draw {k} has shape {tuple(z.shape)}; the state has {tuple(x.shape)}"
            )
        self.count += 1
        return z.to(dtype=x.dtype, device=x.device)


#: One generator for the whole batch, or one per row (sample i then depends only on generator i), or
#: noise drawn in advance (``PresetNoise``).
GeneratorLike = torch.Generator | Sequence[torch.Generator] | PresetNoise | None

Model = Callable[[Tensor, "float | Tensor"], Tensor]


def sampler(*, nfe: Callable[[int, dict], int] | None, stochastic: bool = False) -> Callable:
    """Record, beside a sampler's definition, its exact number of denoiser calls and whether it draws noise.

    ``nfe(n, options)`` is the number of calls on ``n = len(sigmas) - 1`` steps with the sampler's
    keyword options (defaults filled in); ``None`` marks an adaptive sampler, whose count is known
    only after the run (it reports it in ``stats["nfe"]``). ``scorekit.samplers.nfe`` and
    ``scorekit.sample`` read these; the registry is still one explicit table.
    """

    def mark(fn: Callable) -> Callable:
        fn.nfe_formula = nfe
        fn.stochastic = stochastic
        return fn

    return mark


#: Default of the ``long_step`` option of the samplers whose published update is unstable on long
#: steps (``heun``, ``dpm_solver_2``/``_3``, ``edm_stochastic``, ``restart``, ``euler_maruyama``,
#: ``pc_langevin``, ``sa_solver``, ``dpmpp_3m``, ``dpmpp_3m_sde``, ``dc_solver``, ``dpm_solver_v3``):
#: a step whose sigma falls by more than this factor is "long" and is taken in a stable form.
#:
#: Why: a corrector evaluated at ``sigma_{i+1}`` after a step of length ``h ~ sigma_i`` multiplies the
#: slope ``(x - D(x, sigma_{i+1})) / sigma_{i+1}`` by ``h``: the denoiser's error at the end of the step,
#: and the gap between the predicted point and the data where ``D`` switches from the mean to the
#: identity, are amplified by about ``sigma_i / sigma_{i+1}``. A few-step karras schedule ends with a
#: step of ratio 85 (NFE 9-10) to 1250 (NFE 5) onto sigma_min = 0.002; there ``heun`` and DPM-Solver-2
#: diverge on exact mixtures plus a network-sized error (``scorekit bench samplers --suite robust``).
#: Likewise a high-order multistep extrapolation over a long step, and the Euler-Maruyama drift
#: ``2 sigma_{i+1}/sigma_i - 1`` (negative beyond a halving). ``long_step=None`` keeps the published
#: update on every step (what the peer-agreement tests compare).
LONG_STEP = 10.0


def is_long(s0: float, s1: float, long_step: float | None) -> bool:
    """Whether the step ``s0 -> s1 > 0`` is long, ``s0 / s1 > long_step`` (never with ``None``)."""
    return long_step is not None and s1 > 0 and s0 > long_step * s1


def check_long_step(long_step: float | None) -> float | None:
    """``long_step`` checked: ``None`` or a number > 1 (a one-line error otherwise)."""
    if long_step is None:
        return None
    return check_number(
        "long_step", long_step, low=1, low_ok=False, finite=False,
        what=" (the sigma ratio sigma_i / sigma_{i+1} above which a step is taken in its stable form; None = never)",
    )  # fmt: skip


def check_sigmas(sigmas: Tensor | Sequence[float], *, name: str = "sigmas") -> list[float]:
    """Validate a noise-level sequence and return it as Python floats (one host read).

    ``sigmas`` must be 1-D with at least two entries, finite, non-negative, strictly decreasing and
    end in exactly 0 (so the sample is clean).
    """
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1:
            raise ValueError(f"{name} must be 1-D; got a tensor of shape {tuple(sigmas.shape)}")
        s = sigmas.detach().to("cpu", torch.float64).tolist()
    else:
        try:
            s = [float(v) for v in sigmas]
        except TypeError as err:
            raise TypeError(
                f"{name} must be a 1-D tensor or a sequence of numbers; got {type(sigmas).__name__}"
            ) from err
    if len(s) < 2:
        raise ValueError(f"{name} needs at least 2 entries (sigma_max ... 0); got {len(s)}")
    if not all(math.isfinite(v) for v in s):
        raise ValueError(f"{name} must be finite; got {s}")
    if min(s) < 0:
        raise ValueError(f"{name} must be >= 0; got min {min(s):.6g}")
    if s[-1] != 0:
        raise ValueError(f"{name} must end in 0 so the result is a clean sample; got last {s[-1]}")
    bad = [i for i in range(len(s) - 1) if not s[i] > s[i + 1]]
    if bad:
        i = bad[0]
        raise ValueError(
            f"{name} must be strictly decreasing; sigmas[{i}]={s[i]:.6g} <= sigmas[{i + 1}]={s[i + 1]:.6g}"
        )
    return s


def _checked_model(denoiser: Callable, x: Tensor) -> Model:
    """Wrap ``denoiser`` as ``model(x, sigma)`` with ``sigma`` a float (broadcast to ``[B]``) or ``[B]``.

    Every call checks the output shape (free); the first call also checks it is finite (one sync).
    """
    batch, shape = x.shape[0], x.shape
    first = True

    def model(x: Tensor, sigma: float | Tensor) -> Tensor:
        nonlocal first
        if not isinstance(sigma, Tensor):
            sigma = x.new_full((batch,), sigma)
        out = denoiser(x, sigma)
        if not isinstance(out, Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"denoiser must return a tensor of x's shape {tuple(shape)}; got {got}"
            )
        if out.dtype != x.dtype:
            raise TypeError(
                f"denoiser must return x's dtype {x.dtype}; got {out.dtype} (cast its output with "
                ".to(x.dtype), or sample in its dtype)"
            )
        if first:
            first = False
            check_finite(out, "denoiser output at the first call")
        return out

    return model


def prepare(
    denoiser: Callable, x: Tensor, sigmas: Tensor | Sequence[float]
) -> tuple[list[float], Model]:
    """Validate the inputs of a sampler; return host ``sigmas`` and the checked denoiser call."""
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable; got {type(denoiser).__name__}")
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating tensor of shape [B, ...] (rank >= 2); got {got}")
    return check_sigmas(sigmas), _checked_model(denoiser, x)


def steps(n: int, progress: bool) -> Iterable[int]:
    """``range(n)``, with a tqdm bar when ``progress`` is true."""
    if progress:
        from tqdm.auto import trange

        return trange(n, desc="sampling", leave=False)
    return range(n)


def emit(
    callback: Callable | None, i: int, sigma: float, x: Tensor, denoised: Tensor | None
) -> None:
    """Call ``callback({"i", "sigma", "x", "denoised"})`` if given: ``x`` is the state at ``sigma``."""
    if callback is not None:
        callback({"i": i, "sigma": sigma, "x": x, "denoised": denoised})


def combine(x: Tensor, scale: float, weights: Sequence[float], terms: Sequence[Tensor]) -> Tensor:
    """``scale * x + sum_j weights[j] * terms[j]`` (host-float weights, no synchronisation)."""
    out = x * scale
    for w, t in zip(weights, terms, strict=True):
        out = out.add(t, alpha=w)
    return out


def finish(x: Tensor) -> Tensor:
    """Raise if the final sample holds NaN/inf (one sync per sampler call), else return it."""
    return check_finite(x, "the sample after the last step")


def randn_like(x: Tensor, generator: GeneratorLike) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device.

    ``generator`` is ``None``, one ``torch.Generator``, or a sequence of ``B`` generators: row ``i`` is
    then drawn from ``generator[i]`` alone, so it does not depend on the batch it sits in; or a
    ``PresetNoise``, which hands out its next draw.
    """
    kw = {"dtype": x.dtype, "device": x.device}
    if isinstance(generator, PresetNoise):
        return generator(x)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, **kw)
    if not isinstance(generator, (list, tuple)) or len(generator) != x.shape[0]:
        got = len(generator) if isinstance(generator, (list, tuple)) else type(generator).__name__
        raise ValueError(
            f"generator must be None, a torch.Generator or a list of B = {x.shape[0]} generators; got {got}"
        )
    return torch.stack([torch.randn(x.shape[1:], generator=g, **kw) for g in generator])


def row_generators(seed: int, rows: Iterable[int], device=None) -> list[torch.Generator]:
    """One generator per row, seeded by ``mix_seed(seed, row)`` alone."""
    return [torch.Generator(device=device or "cpu").manual_seed(mix_seed(seed, i)) for i in rows]


# -- host-side coefficient maths ------------------------------------------------------------------


def phis(z: float, k: int) -> list[float]:
    """``[phi_0(z), ..., phi_k(z)]`` with ``phi_j(z) = sum_n z^n / (n + j)!`` (``phi_0 = e^z``).

    For ``|z| >= 0.5`` by the recursion ``phi_{j+1} = (phi_j - 1/j!) / z`` from ``phi_1 =
    expm1(z)/z`` (relative error ~ 1e-16 / |z|^(j-1), about 1e-15 for ``j <= 4``); for ``|z| < 0.5``
    by 16 terms of the series (truncation below 1e-18). Pure Python: called once per step.

    References:
        Hochbruck & Ostermann, "Exponential integrators", Acta Numerica 2010, eq. 2.10.
    """
    if abs(z) >= 0.5:
        out = [math.exp(z), math.expm1(z) / z]
        for j in range(1, k):
            out.append((out[-1] - 1.0 / math.factorial(j)) / z)
        return out[: k + 1]
    out = []
    for j in range(k + 1):
        total, term = 0.0, 1.0 / math.factorial(j)
        for n in range(16):
            total += term
            term *= z / (n + j + 1)
        out.append(total)
    return out


def phi(k: int, z: float) -> float:
    """``phi_k(z)`` (see ``phis``)."""
    return phis(z, k)[k]


def lagrange_weights(nodes: Sequence[float], moments: Sequence[float]) -> list[float]:
    """Weights ``w_j`` with ``sum_j w_j f(tau_j) = sum_k moments[k] * a_k`` for the polynomial
    ``p(tau) = sum_k a_k tau^k`` interpolating ``f`` at ``nodes`` (``len(nodes) == len(moments)``).

    With ``moments[k] = int kernel(tau) tau^k dtau`` this is the integral of the kernel times the
    Lagrange interpolant, the building block of every exponential / Adams multistep step here:
    ``w_j = sum_k moments[k] [tau^k] l_j(tau)`` with ``l_j`` the Lagrange basis polynomial. Pure
    Python (a handful of nodes, once per step).
    """
    n = len(nodes)
    weights = []
    for j in range(n):
        coef, denom = [1.0], 1.0  # coefficients of prod_{m != j} (tau - tau_m), lowest first
        for m in range(n):
            if m != j:
                coef = [0.0, *coef]
                for c in range(len(coef) - 1):
                    coef[c] -= nodes[m] * coef[c + 1]
                denom *= nodes[j] - nodes[m]
        weights.append(sum(c * mk for c, mk in zip(coef, moments, strict=True)) / denom)
    return weights
