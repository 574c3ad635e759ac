"""Feynman-Kac corrector SMC: particles that target the tilted distribution exactly."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from scorekit._util import check_int, check_number
from scorekit.guidance._common import Denoiser, check_denoiser, check_scale, refuse_preset_noise
from scorekit.samplers.common import (
    GeneratorLike,
    emit,
    finish,
    prepare,
    randn_like,
    steps,
)

__all__ = ["effective_sample_size", "fk_product", "fk_smc", "systematic_resample"]


def effective_sample_size(log_w: Tensor) -> Tensor:
    """``ESS = (sum_j w_j)^2 / sum_j w_j^2`` per row of log-weights ``[G, P]`` -> ``[G]`` (1 .. P)."""
    w = torch.softmax(log_w, dim=-1)
    return 1.0 / w.square().sum(-1)


def systematic_resample(log_w: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling: ancestor indices ``[G, P]`` from log-weights ``[G, P]`` and ``u [G]`` in [0, 1).

    Particle ``j`` of group ``g`` takes the ancestor ``a`` with ``C_{a-1} <= (u_g + j) / P < C_a``,
    ``C`` the cumulative normalised weights: ``a`` is copied ``floor`` or ``ceil`` of ``P w_a`` times.

    References:
        Douc, Cappé & Moulines, "Comparison of Resampling Schemes for Particle Filtering", ISPA 2005.
    """
    p = log_w.shape[-1]
    c = torch.softmax(log_w, dim=-1).cumsum(-1)
    c[..., -1] = 1.0  # against rounding: every position falls below the last edge
    pos = (u[:, None] + torch.arange(p, dtype=c.dtype, device=c.device)) / p
    return torch.searchsorted(c, pos.to(c.dtype), right=True).clamp(max=p - 1)


def _uniforms(groups: int, p: int, generator: GeneratorLike, device) -> Tensor:
    """One uniform per particle group: from the group's first row generator when given per row."""
    if generator is None or isinstance(generator, torch.Generator):
        where = device if generator is None else generator.device
        return torch.rand(groups, generator=generator, dtype=torch.float64, device=where).to(device)
    firsts = [generator[g * p] for g in range(groups)]
    return torch.cat(
        [torch.rand(1, generator=gen, dtype=torch.float64, device=gen.device) for gen in firsts]
    ).to(device)


def _check_weights(log_w: Tensor, i: int, sigma: float) -> None:
    bad = (torch.isnan(log_w).any(-1) | ~torch.isfinite(log_w.amax(-1))).nonzero().flatten()
    if bad.numel():
        raise FloatingPointError(
            f"fk_smc: at step {i} (sigma={sigma:.6g}) the weights of particle groups "
            f"{bad[:10].tolist()} are NaN, infinite or all zero"
        )


def _resample(x, d, log_w, threshold, generator, i, stats):
    """Resample the groups whose ESS fell below ``threshold * P``; reset their log-weights."""
    groups, p = log_w.shape
    ess = effective_sample_size(log_w)
    low = ess < threshold * p
    stats["ess"].append(float(ess.min()))
    if not bool(low.any()):
        return x, d, log_w
    stats["resampled"].append(i)
    anc = systematic_resample(log_w, _uniforms(groups, p, generator, log_w.device))
    keep = torch.arange(p, device=anc.device).expand(groups, p)
    anc = torch.where(low[:, None], anc, keep)
    flat = (anc + p * torch.arange(groups, device=anc.device)[:, None]).flatten().to(x.device)
    log_w = torch.where(low[:, None], torch.zeros_like(log_w), log_w)
    return x[flat], d[flat], log_w


def fk_smc(
    cond: Denoiser,
    uncond: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    scale: float,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    particles: int | None = None,
    ess_threshold: float = 0.5,
    stats: dict | None = None,
    n_corrector: int = 0,
    corrector_step: float = 0.5,
    sigma_final: float = 0.0,
    ess_step: float = 0.0,
    max_split: int = 16,
) -> Tensor:
    """SMC with Feynman-Kac weights whose particles target ``p_w(x) ∝ p(x | y)^w p(x)^(1 - w)``.

    The tilted path ``q_sigma ∝ p_sigma(x | y)^w p_sigma(x)^(1 - w)`` has score
    ``(D_w - x) / sigma^2`` with ``D_w = D_u + w (D_c - D_u)`` (CFG). Each step moves every particle
    by the reverse-diffusion (DDPM ancestral) step of that score from ``sigma_i`` to ``sigma_{i+1}``,

        x <- x + (1 - sigma_{i+1}^2 / sigma_i^2) (D_w - x) + sigma_{i+1} sqrt(1 - sigma_{i+1}^2 / sigma_i^2) z

    which alone samples CFG's biased distribution. In ``u = sigma^2`` the heat equation gives
    ``d_u log p = (Lap log p + |grad log p|^2) / 2`` for both ``p(x|y)`` and ``p(x)``; the Laplacians
    cancel in ``q``'s Feynman-Kac potential and the log-weight of a particle grows at the rate
    (per unit of ``-u``)

        g = (w (w - 1) / 2) |D_c - D_u|^2 / sigma^4

    (``|grad log p_sigma(x|y) - grad log p_sigma(x)|^2 = |D_c - D_u|^2 / sigma^4``), integrated along
    each particle's path by the trapezoid rule in ``u`` (``fk_product``, of which this is the case
    ``betas = (w, 1 - w)``). Log-weights are float64; when a group's effective sample size
    ``(sum W)^2 / sum W^2`` falls below ``ess_threshold * P`` it is resampled (systematic) and its
    weights reset. After the last step every group whose weights are not uniform is resampled once
    more, so the returned rows are equally weighted. As ``P`` grows the particles target ``p_w`` up
    to the time discretisation and the start ``x ~ N(0, sigma_0^2 I)`` (the tilt is negligible at a
    large ``sigma_0``).

    Measured (``tests/test_guidance_smc.py``, ``scorekit bench guidance``): on the 1-D ``pair1d``
    target at ``w = 4`` with 200 karras steps, sliced W2 to exact tilted samples falls from about 11x
    the sample-size floor (``P = 1``, which is CFG with DDPM steps) to 5x (``P = 16``) and 2-4x
    (``P = 256``); the rest is time discretisation (it shrinks with more steps). Where the tilt moves
    mass between well separated modes the weights are uneven and a population of a few hundred
    particles can split its mass between the modes unevenly: more particles, or more steps, are the
    remedy; see docs/guidance.md for the measured table.

    Args:
        cond, uncond: denoisers ``D(x [B, ...], sigma [B]) -> [B, ...]`` with the condition bound.
        x: ``[B, ...]`` the particles at ``sigmas[0]``; ``B = groups * particles``.
        sigmas: 1-D decreasing, ending in 0. scale: ``w >= 0``.
        generator: ``None``, one generator, or one per row; group ``g``'s resampling uniforms come
            from its first row's generator, so a group does not depend on the other groups.
        particles: group size ``P`` (default: the whole batch is one group); groups are independent
            populations. ess_threshold: in ``[0, 1]`` (0: never resample before the end, 1: always).
        stats: a dict, filled with ``"ess"`` (min ESS over groups per step), ``"resampled"`` (steps),
            ``"nfe"`` (network evaluations).
        n_corrector: ``C >= 0`` Langevin steps on the tilted score after each move (resample-move),
            ``x <- x + eps g + sqrt(2 eps) z`` at ``sigma_{i+1}`` with ``g = (D_w - x) / sigma^2`` and
            ``eps = corrector_step (sigma_i^2 - sigma_{i+1}^2) / 2``. They leave the weights as they
            are (a kernel about invariant for the current target) and spread the copies resampling
            makes. corrector_step: ``> 0``.
        sigma_final: ``>= 0``. At the first step with ``sigma_i <= sigma_final`` every group whose
            weights are not uniform is resampled and the weights are not updated after it; the
            remaining moves (and correctors) then separate the copies, where the final resample at
            sigma = 0 (``sigma_final = 0``, the default) returns exact copies. Why: resampling
            exact samples of gmm16 with weights of ESS 0.54 P alone puts the sliced W2 at 1.19x
            the floor (0.77 P: 1.16x). The weight increments left out below ``sigma_final`` are
            the time integral of ``w (w - 1) / 2 |D_c - D_u|^2 / sigma^4`` over ``u < sigma_final^2``:
            on gmm16 the ESS does not move below sigma = 0.15 (measured), but it is a truncation.
        ess_step: in ``[0, 1]``; ``0`` (default) never splits a step. Above 0, adaptive sub-steps
            (adaptive tempering of the step, Zhou, Johansen & Aston 2016; Del Moral, Doucet & Jasra
            2012): where a step's weight increment would take a group's conditional ESS
            ``(sum_j W_j e^a_j)^2 / sum_j W_j e^(2 a_j)`` (``W`` the normalised weights, ``a`` the
            increments) below ``ess_step`` (a fraction of ``P``), the step is shortened in
            ``u = sigma^2`` (bisection, no network calls) until it is not, and the particles move,
            are resampled (by ``ess_threshold``) and take their ``C`` correctors at the intermediate
            sigma before the next sub-step; the trapezoid rule in ``u`` runs over the sub-steps. The
            smallest sub-step is ``1 / max_split`` of the step it splits (``max_split >= 1``).
            ``stats["substeps"]`` counts the extra sub-steps ``S`` (about ``max_split - 1`` at most per
            step); ``stats["ess"]`` then has one entry per sub-step, and ``callback`` is called at
            every sub-step with the step's ``i`` and the sub-step's sigma. Measured (docs/guidance.md; the
            older floor, one exact set against three):
            gmm16, ``w = 4``, 100 steps, ``C = 8``, groups of 256, ``ess_step = 0.8``: about 11
            sub-steps (+11% evaluations), held-out seeds 2-6 at 1.16-1.41x the floor (mean 1.26),
            where 111 unsplit steps at the same evaluations give 1.25-1.70x (mean 1.43); on the
            tuning seeds 0-1 the two are level (mean 1.34 both), so it is not the default. On
            ring6 (1-4 sub-steps) the figure stays mode-share noise (0.54-1.99x held out).

    Cost: ``2 (N + S) + 2 C (N - 1 + S)`` network evaluations for ``N = len(sigmas) - 1`` steps and
    ``S`` extra sub-steps (``S = 0`` unless ``ess_step > 0``).

    Recommended for the tilted target (docs/guidance.md, "fk_smc re-measured against eight exact
    sets"): groups of 256, ``n_corrector=8``, ``corrector_step=1.0`` on 200 karras steps (3584
    evaluations per sample): on gmm16 and ring6 at ``w = 4`` (2048 samples) within 1.5x of the
    exact-vs-exact floor on 17 of 20 held-out runs (1.09-1.71x on gmm16, 0.80-1.86x on ring6, where
    exact sets themselves score 0.78-1.72x); on 400 steps (7184) gmm16 1.07-1.31x on all 10, ring6
    0.83-1.68x (8 of 10 within 1.5x); the default ``corrector_step=0.5`` with 100 steps leaves
    the groups' shares of separated modes noisier (ratios up to 2.9x on tuning seeds). What is left
    is the weights after the modes separate moving mass between them at random.

    Where the error left on gmm16 (w = 4) comes from (docs/guidance.md, "fk_smc on gmm16"): not the
    trapezoid rule for the weights (SMC with the *exact* intermediate densities and the DDPM move's
    exact transition ratio as weights is no closer: 5.9x the floor at 100 steps, 2.6x at 400), but
    weight degeneracy: in single steps at sigma 1-1.5 a group's ESS falls from P to 2-5 (a few
    particles where ``D_c`` and ``D_u`` disagree most gain several nats), so each resample moves
    the groups' shares of the two class-0 components at random (total variation 0.02-0.08 from
    the exact shares where two exact sets differ by about 0.01). More diverse populations (more
    correctors, resampling in principal-axis order) raise the weight variance with them.

    Raises:
        FloatingPointError: a group's weights are NaN or all zero at some step (names the step).

    References:
        Skreta et al., "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
        Experts", ICML 2025 (CFG-tilted target, Prop. 3.1 weights). Del Moral, "Feynman-Kac Formulae",
        2004. Zhou, Johansen & Aston, "Toward Automatic Model Comparison: An Adaptive Sequential
        Monte Carlo Approach", JCGS 2016 (conditional ESS). Del Moral, Doucet & Jasra, "An adaptive
        sequential Monte Carlo method for approximate Bayesian computation", Stat. Comput. 2012.
    """
    check_denoiser("cond", cond)
    check_denoiser("uncond", uncond)
    refuse_preset_noise(generator, "fk_smc")
    w = check_scale(scale)
    return fk_product(
        [cond, uncond],
        [w, 1.0 - w],
        x,
        sigmas,
        generator=generator,
        callback=callback,
        progress=progress,
        particles=particles,
        ess_threshold=ess_threshold,
        stats=stats,
        n_corrector=n_corrector,
        corrector_step=corrector_step,
        sigma_final=sigma_final,
        ess_step=ess_step,
        max_split=max_split,
    )


def fk_product(
    denoisers: Sequence[Denoiser],
    betas: Sequence[float],
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    particles: int | None = None,
    ess_threshold: float = 0.5,
    stats: dict | None = None,
    n_corrector: int = 0,
    corrector_step: float = 0.5,
    sigma_final: float = 0.0,
    ess_step: float = 0.0,
    max_split: int = 16,
) -> Tensor:
    """SMC with Feynman-Kac weights for ``q(x) ∝ prod_k p_k(x)^beta_k``: products of experts,
    annealing ``p^beta`` (one denoiser) and CFG's tilted target (``fk_smc``).

    With ``S = sum_k beta_k > 0``, ``Dbar = sum_k beta_k D_k / S`` and ``a_k = (D_k - x) / sigma^2``
    (each expert's score), the path ``q_sigma ∝ prod_k p_{k,sigma}^beta_k`` has score ``sum_k beta_k
    a_k = S (Dbar - x) / sigma^2``. Particles move by the reverse-diffusion step of that score,

        x <- x + r S (Dbar - x) + sigma_{i+1} sqrt(r) z,     r = 1 - sigma_{i+1}^2 / sigma_i^2

    (the DDPM step; the last step to sigma = 0 is ``x + S (Dbar - x)``). Each ``p_{k,sigma}`` solves
    the heat equation in ``u = sigma^2``, so the Laplacians cancel in ``q``'s Feynman-Kac potential
    and the log-weight grows at rate (in ``-u``)

        g = (|sum_k beta_k a_k|^2 - sum_k beta_k |a_k|^2) / 2
          = ((S^2 - S) |Dbar - x|^2 - sum_k beta_k |D_k - Dbar|^2) / (2 sigma^4)

    integrated by the trapezoid rule in ``u`` along each particle's path. Resampling, groups,
    generators and errors are as in ``fk_smc``. For ``S != 1`` the path starts near
    ``N(0, sigma_0^2 / S)``: pass ``x = sigma_0 z / sqrt(S)``.

    Args:
        denoisers: ``K >= 1`` denoisers ``D_k(x [B, ...], sigma [B]) -> [B, ...]``.
        betas: ``K`` finite exponents with a positive sum (negative ones allowed, as CFG's ``1 - w``).
        x, sigmas, generator, callback, progress, particles, ess_threshold, stats: as ``fk_smc``.

        n_corrector, corrector_step: resample-move Langevin steps on ``q``'s score, as ``fk_smc``.

        ess_step, max_split: adaptive sub-steps, as ``fk_smc``.

    Cost: ``K (N + S) + K C (N - 1 + S)`` network evaluations for ``N = len(sigmas) - 1`` steps and
    ``S`` extra sub-steps.

    References:
        Skreta et al., "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
        Experts", ICML 2025.
    """
    if len(denoisers) < 1 or len(denoisers) != len(betas):
        raise ValueError(
            f"denoisers and betas must be non-empty and of equal length; got {len(denoisers)} "
            f"denoisers and {len(betas)} betas"
        )
    for k, d in enumerate(denoisers):
        check_denoiser(f"denoisers[{k}]", d)
    refuse_preset_noise(generator, "fk_product")
    bs = [check_number(f"betas[{k}]", b) for k, b in enumerate(betas)]
    total = sum(bs)
    if not total > 0:
        raise ValueError(f"betas must have a positive sum; got {bs} (sum {total:g})")
    thr = check_number("ess_threshold", ess_threshold, low=0, high=1)
    c = check_int("n_corrector", n_corrector, least=0)
    eps_rel = check_number("corrector_step", corrector_step, low=0, low_ok=False)
    sigma_final = check_number("sigma_final", sigma_final, low=0)
    tau = check_number("ess_step", ess_step, low=0, high=1)
    max_split = check_int("max_split", max_split, least=1)
    s, models = None, []
    for d in denoisers:
        s, model = prepare(d, x, sigmas)
        models.append(model)
    b = x.shape[0]
    p = b if particles is None else check_int("particles", particles, least=1)
    if b % p:
        raise ValueError(f"particles must divide the batch B = {b}; got {p}")
    log_w = torch.zeros(b // p, p, dtype=torch.float64, device=x.device)
    info = stats if stats is not None else {}
    info.update(ess=[], resampled=[], nfe=0, substeps=0)
    weighting, h_prev, split = True, 0.0, (tau, max_split)
    for i in steps(len(s) - 1, progress):
        cur, s1 = s[i], s[i + 1]
        grid_h = cur * cur - s1 * s1
        while True:  # one pass per sub-step; a single pass unless ess_step splits the step
            outs = [m(x, cur) for m in models]
            info["nfe"] += len(outs)
            d_bar = sum(bk * dk for bk, dk in zip(bs, outs, strict=True)) / total
            d = d_bar if total == 1 else x + total * (d_bar - x)  # x + sigma^2 * (q's score)
            emit(callback, i, cur, x, d)
            h = rest = cur * cur - s1 * s1  # the rest of the step, in u
            if weighting:
                h, inc = _increment(outs, bs, d_bar, x, cur, h_prev, h, s1 == 0, log_w, split,
                                    grid_h)  # fmt: skip
                log_w = log_w + inc.view_as(log_w)
                _check_weights(log_w, i, cur)
                last = cur <= sigma_final
                x, d, log_w = _resample(
                    x, d, log_w, 1.0 - 1e-9 if last else thr, generator, i, info
                )
                weighting = not last
            nxt = s1 if h >= rest else math.sqrt(cur * cur - h)
            h_prev = h
            if nxt == 0:
                x = d
                break
            r = h / (cur * cur) if nxt != s1 else 1.0 - (s1 * s1) / (cur * cur)
            x = torch.lerp(x, d, r) + nxt * math.sqrt(r) * randn_like(x, generator)
            x = _move(models, bs, x, cur, nxt, c, eps_rel, generator, info)
            if nxt == s1:
                break
            info["substeps"] += 1
            cur = nxt
    # the returned rows are equally weighted: resample every group whose weights are not uniform
    x, _, _ = _resample(x, x, log_w, 1.0 - 1e-9, generator, len(s) - 1, info)
    return finish(x)


def _move(models, bs, x, s0, s1, c, eps_rel, generator, info) -> Tensor:
    """``c`` Langevin steps at ``s1`` on ``q``'s score (resample-move: a kernel that leaves the current
    target about invariant keeps the weights and spreads the copies that resampling made)."""
    total = sum(bs)
    eps = eps_rel * (s0 * s0 - s1 * s1) / 2
    for _ in range(c):
        outs = [m(x, s1) for m in models]
        info["nfe"] += len(outs)
        d_bar = sum(bk * dk for bk, dk in zip(bs, outs, strict=True)) / total
        score = total * (d_bar - x) / (s1 * s1)
        x = x + eps * score + math.sqrt(2 * eps) * randn_like(x, generator)
    return x


def _increment(outs, bs, d_bar, x, s0, h_prev, h, to_zero, log_w, split, grid_h):
    """The sub-step ``h`` in ``u`` and ``g(x) du`` in float64 ``[B]``: the trapezoid rule in
    ``u = sigma^2`` gives ``g(x)`` half of the interval before it (``h_prev``) and half of the one
    after (``h``; all of it when ``h`` reaches sigma = 0, where ``g`` is not evaluated). With
    ``split = (tau, m)``, ``tau > 0``, ``h`` is shortened (bisection in ``log h``, no network calls)
    until every group's conditional ESS of the increment is at least ``tau P``, but not below
    ``grid_h / m``; a shortened ``h`` ends at an inner point, which takes the other half itself, so
    the sub-steps are exactly the trapezoid rule on the refined grid (also on the step to 0)."""
    total = sum(bs)
    sq = [(dk - d_bar).flatten(1).double().square().sum(1) for dk in outs]
    two_g = -sum(bk * q for bk, q in zip(bs, sq, strict=True))
    if total != 1:
        two_g = two_g + (total * total - total) * (d_bar - x).flatten(1).double().square().sum(1)
    fwd = 2.0 if to_zero else 1.0
    tau, m = split
    if tau > 0:
        back = ((0.25 * h_prev / s0**4) * two_g).view_as(log_w)
        rate = ((0.25 / s0**4) * two_g).view_as(log_w)
        full = h
        h = _substep(log_w, back, rate, fwd, h, tau, grid_h / m)
        fwd = fwd if h >= full else 1.0
    return h, (0.25 * (h_prev + fwd * h) / s0**4) * two_g


def _conditional_ess(log_w: Tensor, inc: Tensor) -> float:
    """The smallest over groups of ``(sum_j W_j e^a_j)^2 / sum_j W_j e^(2 a_j)`` (in (0, 1]), ``W`` the
    normalised weights, ``a`` the increments (Zhou, Johansen & Aston 2016)."""
    lw = torch.log_softmax(log_w, dim=-1)
    two = 2 * torch.logsumexp(lw + inc, -1) - torch.logsumexp(lw + 2 * inc, -1)
    return float(two.exp().min())


def _substep(log_w, back, rate, fwd, h, tau, h_min) -> float:
    """The largest ``h' <= h`` (down to ``h_min``) with conditional ESS >= tau of the increment
    ``back + fwd rate h`` for the whole ``h`` and ``back + rate h'`` for a shorter ``h'`` (an inner
    point: the next sub-step's point takes the other half of the interval)."""
    if h <= h_min or _conditional_ess(log_w, back + fwd * rate * h) >= tau:
        return h
    if _conditional_ess(log_w, back + rate * h_min) < tau:
        return h_min
    lo, hi = math.log(h_min), math.log(h)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (
            (mid, hi) if _conditional_ess(log_w, back + rate * math.exp(mid)) >= tau else (lo, mid)
        )
    return min(math.exp(lo), h)
