"""Accelerators that wrap any sampler: the analytic teleport start.

* ``teleport`` / ``with_teleport``: replace the high-noise part of a sampler by the exact PF-ODE flow
  of the data's Gaussian approximation ``N(m, U diag(lam) U^T)`` (Wang & Vastola 2024). In the sigma
  frame the flow from ``sigma0`` to ``sigma`` is linear and closed-form,

      x(sigma) = m + U diag(sqrt((lam + sigma^2) / (lam + sigma0^2))) U^T (x(sigma0) - m),

  so the denoiser calls a sampler would spend above ``sigma`` are saved. At high noise every data
  distribution's score is close to its Gaussian approximation's, so the error made is small.

The exposure-bias corrections ``eps_scaling`` and ``time_shift`` are denoisers built from denoisers,
so they live in ``scorekit.guidance.exposure``.

* ``gaussian_jump`` / ``with_gaussian_jump``: the final step of a sampler, ``x = D(x, sigma_last)``
  (Tweedie's posterior mean standing in for the ODE's end point), corrected by what that jump gets
  wrong on the data's Gaussian approximation, where both are known in closed form:

      x_0 = D(x, sigma) + U diag(sqrt(a) - a) U^T (x - m),    a = lam / (lam + sigma^2),

  ``sqrt(a)`` being the Gaussian's exact flow to 0 and ``a`` its denoiser. Exact on Gaussian data at
  any ``sigma``, the plain jump where ``lam << sigma^2`` (``sqrt(a) - a -> 0``), and no extra call.

References:
    Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for Diffusion
    Models and its Applications", TMLR 2024, Sec. 4 (analytic teleportation), eq. 9.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from scorekit.samplers.gaussian import GaussianFlow, gaussian_jump
from scorekit.samplers.registry import REGISTRY, STOCHASTIC, get_sampler
from scorekit.samplers.registry import nfe as nfe_of

__all__ = [
    "GaussianFlow",
    "extrapolated_jump",
    "gaussian_jump",
    "teleport",
    "with_extrapolated_jump",
    "with_gaussian_jump",
    "with_last_step",
    "with_teleport",
]


def teleport(gaussian: GaussianFlow, x: Tensor, sigma_from, sigma_to) -> Tensor:
    """Move ``x`` from ``sigma_from`` to ``sigma_to`` along the Gaussian approximation's exact PF-ODE.

    ``x(sigma) = m + U diag(sqrt((lam + sigma^2)/(lam + sigma0^2))) U^T (x(sigma0) - m)``
    (Wang & Vastola 2024, eq. 9, in the sigma frame). No denoiser calls.
    """
    return gaussian(x, sigma_from, sigma_to)


def _resolve(sampler: Callable | str) -> tuple[str | None, Callable]:
    """``(registry name or None, function)`` of a sampler given by name or as a function."""
    if isinstance(sampler, str):
        return sampler, get_sampler(sampler)
    if callable(sampler):
        return next((k for k, v in REGISTRY.items() if v is sampler), None), sampler
    raise TypeError(f"sampler must be a function or a name; got {type(sampler).__name__}")


def with_teleport(sampler: Callable | str, gaussian: GaussianFlow) -> Callable:
    """A sampler that teleports analytically over its first interval, then runs ``sampler``.

    The wrapped sampler takes the usual ``(denoiser, x, sigmas, **options)`` with ``x`` at
    ``sigmas[0]``; it moves ``x`` to ``sigmas[1]`` with the Gaussian approximation's exact flow (no
    denoiser call) and runs ``sampler`` on ``sigmas[1:]``. So a schedule
    ``[sigma_max, sigma_t, ..., 0]`` costs the denoiser calls of ``sampler`` on ``[sigma_t, ..., 0]``,
    and ``samplers.optimized`` applied to the wrapped sampler also chooses where to teleport to.

    Args:
        sampler: a sampler function or a name in ``scorekit.samplers.REGISTRY``.
        gaussian: the data's Gaussian approximation as a ``GaussianFlow``.

    Returns:
        The wrapped sampler; its ``nfe(sigmas, **options)`` attribute counts its denoiser calls.
    """
    name, fn = _resolve(sampler)
    if not isinstance(gaussian, GaussianFlow):
        raise TypeError(f"gaussian must be a GaussianFlow; got {type(gaussian).__name__}")

    @functools.wraps(fn)
    def teleported(denoiser, x, sigmas, **options):
        if len(sigmas) < 3:
            raise ValueError(
                f"sigmas needs at least 3 entries (sigma_max, the sigma to teleport to, ..., 0); "
                f"got {len(sigmas)}"
            )
        s0, s1 = sigmas[0], sigmas[1]  # kept as given: tensors carry gradients to the teleport
        f0, f1 = (float(v.detach()) if isinstance(v, Tensor) else float(v) for v in (s0, s1))
        if not f0 > f1 > 0:
            raise ValueError(f"need sigmas[0] > sigmas[1] > 0 to teleport; got {f0}, {f1}")
        return fn(denoiser, gaussian(x, s0, s1), sigmas[1:], **options)

    def nfe(sigmas, **options) -> int:
        if name is None:
            raise ValueError("nfe is known only for samplers from scorekit.samplers.REGISTRY")
        return nfe_of(name, sigmas[1:], **options)

    teleported.nfe = nfe
    # A registered sampler's formula on one step fewer; a user's function has no known count.
    formula = None if name is None else REGISTRY[name].nfe_formula
    teleported.nfe_formula = None if formula is None else lambda n, o: formula(n - 1, o)
    teleported.__name__ = f"teleport_{getattr(fn, '__name__', 'sampler')}"
    return teleported


#: registry samplers whose last step is not ``x = D(x, sigma_last)`` (multistep extrapolations of
#: the noise to sigma = 0, fitted coefficients).
NOT_JUMP = frozenset({"deis", "ipndm", "bespoke"})
_NO_JUMP = (
    "does not end with x = D(x, sigma_last); allowed: a sampler whose last step is that jump "
    "(the registry's others, e.g. euler, dpmpp_2m, unipc, heun)"
)


def _with_last_step(
    sampler: Callable | str, tag: str, finish: Callable, check=None, deterministic: bool = False
) -> Callable:
    """``sampler`` with its last step ``x = D(x, sigma_last)`` replaced by ``finish(nodes)``, where
    ``nodes`` are the callback records (``sigma``, ``x``, ``denoised``) of its last two nonzero
    sigmas (one when it has one). ``check(label, options)`` may refuse options before the run;
    ``deterministic`` refuses the registry's stochastic samplers."""
    name, fn = _resolve(sampler)
    label = name or getattr(fn, "__name__", "the sampler")
    if name in NOT_JUMP:
        raise ValueError(f"sampler: {name} {_NO_JUMP}")
    if deterministic and name in STOCHASTIC:
        raise ValueError(
            f"sampler: {name} adds noise between its calls; allowed: a deterministic sampler "
            "ending with x = D(x, sigma_last) (e.g. euler, dpmpp_2m, unipc, heun)"
        )

    @functools.wraps(fn)
    def wrapped(denoiser, x, sigmas, callback=None, **options):
        if check is not None:
            check(label, options)
        nodes: list[dict] = []

        def keep(info):
            if float(info["sigma"]) > 0 and info.get("denoised") is not None:
                nodes[:] = [*nodes[-1:], info]
            if callback is not None:
                callback(info)

        out = fn(denoiser, x, sigmas, callback=keep, **options)
        if not nodes or not torch.equal(out, nodes[-1]["denoised"]):
            raise ValueError(f"sampler: {label} {_NO_JUMP}")
        return finish(nodes)

    if name is not None:
        wrapped.nfe = lambda sigmas, **options: nfe_of(name, sigmas, **options)
        wrapped.nfe_formula = REGISTRY[name].nfe_formula
    wrapped.__name__ = f"{tag}_{getattr(fn, '__name__', 'sampler')}"
    return wrapped


def with_gaussian_jump(sampler: Callable | str, gaussian: GaussianFlow) -> Callable:
    """A sampler whose final step ``x = D(x, sigma_last)`` is replaced by ``gaussian_jump``.

    The wrapped sampler runs ``sampler`` with a callback that keeps the state and ``D`` at the last
    nonzero sigma, then corrects its result. It needs a sampler whose last step is that jump: the
    registry's samplers except ``deis``, ``ipndm`` and ``bespoke`` (refused up front) and
    ``dpm_solver_v3(gaussian=...)`` (which ends with it already); a sampler whose result differs from
    ``D`` at its last node is refused after the run. After a corrector step (``unipc``,
    ``sa_solver``, ``dc_solver``, ``dpm_solver_v3(corrector=True)``) the reported state is the
    corrected one and ``D`` the predicted one's, as in the samplers' own last step. No extra
    denoiser call: ``nfe`` is the sampler's. A ``callback=`` option is still called.
    """
    if not isinstance(gaussian, GaussianFlow):
        raise TypeError(f"gaussian must be a GaussianFlow; got {type(gaussian).__name__}")

    def check(label, options):
        if options.get("gaussian") is not None:
            raise ValueError(
                f"sampler: {label} with gaussian= already ends with the Gaussian jump; allowed: "
                "with_gaussian_jump or gaussian=, not both"
            )

    def finish(nodes):
        last = nodes[-1]
        return gaussian_jump(gaussian, last["x"], last["denoised"], float(last["sigma"]))

    return _with_last_step(sampler, "gaussian_jump", finish, check)


def extrapolated_jump(sigmas: tuple[float, float], denoised: tuple[Tensor, Tensor]) -> Tensor:
    """The last step from the two last calls: ``D`` extrapolated to sigma = 0 linearly in sigma^2,

        x_0 = D_s - sigma_s^2 (D_p - D_s) / (sigma_p^2 - sigma_s^2),

    ``(sigma_p, sigma_s)`` the last two nonzero sigmas (``sigma_p > sigma_s``) and ``D_p, D_s`` the
    denoiser's outputs there. Why sigma^2: along the probability-flow path of a smooth density,
    ``x(sigma) = x_0 - sigma^2 s / 2 + O(sigma^4)`` and ``D = x + sigma^2 s``, with ``s`` the score of
    the data at ``x_0``, so ``D(x(sigma), sigma) = x_0 + sigma^2 s / 2 + O(sigma^4)``: the jump
    ``x_0 = D_s`` errs by ``O(sigma_s^2)``, the extrapolation by ``O(sigma^4)`` (Richardson
    extrapolation, on the samples ``D`` along the path). No extra call and no statistics.
    """
    (sp, ss), (dp, ds) = (float(v) for v in sigmas), denoised
    if not sp > ss > 0:
        raise ValueError(
            f"sigmas must be (sigma_p, sigma_s) with sigma_p > sigma_s > 0; got ({sp:.6g}, {ss:.6g})"
        )
    return ds - (ss**2 / (sp**2 - ss**2)) * (dp - ds)


def with_extrapolated_jump(sampler: Callable | str) -> Callable:
    """A sampler whose final step ``x = D(x, sigma_last)`` is replaced by ``extrapolated_jump`` of
    its last two calls (the plain jump when it makes one call). Same contract as
    ``with_gaussian_jump``: samplers ending with that jump, no extra call. The extrapolation assumes
    the two calls lie on one probability-flow path, so the registry's stochastic samplers (noise
    between the calls) are refused."""

    def finish(nodes):
        if len(nodes) < 2:
            return nodes[-1]["denoised"]
        (p, s) = nodes
        return extrapolated_jump((p["sigma"], s["sigma"]), (p["denoised"], s["denoised"]))

    return _with_last_step(sampler, "extrapolated_jump", finish, deterministic=True)


def with_last_step(sampler: str, options: dict, jump: str, gaussian: GaussianFlow | None):
    """``(function, options)`` that run registry sampler ``sampler`` with the last step ``jump`` of a
    ``samplers.defaults.Choice``: ``"tweedie"`` (its own ``x = D``), ``"extrapolated"``
    (``with_extrapolated_jump``) or ``"gaussian"`` (``with_gaussian_jump``; ``dpm_solver_v3`` takes
    ``gaussian=`` instead, which also gives it the Gaussian's statistics)."""
    fn = get_sampler(sampler)
    if jump == "gaussian" and sampler == "dpm_solver_v3":
        return fn, {**options, "gaussian": gaussian}
    if jump == "gaussian":
        return with_gaussian_jump(fn, gaussian), options
    if jump == "extrapolated":
        return with_extrapolated_jump(fn), options
    return fn, options
