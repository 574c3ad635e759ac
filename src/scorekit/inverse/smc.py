"""Twisted diffusion sampler (TDS): sequential Monte Carlo, asymptotically exact as particles grow."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from scorekit._util import append_dims
from scorekit.inverse.common import (
    cg,
    check_option,
    check_problem,
    finish_watched,
    gram_solve,
    solver,
    vjp,
    watch,
)
from scorekit.inverse.operators import Operator
from scorekit.samplers.common import GeneratorLike, emit, prepare, randn_like, steps

__all__ = ["auto_particles", "particles_for_budget", "tds"]


def _uniforms(b: int, like: Tensor, generator: GeneratorLike) -> Tensor:
    """One uniform per output row ``[B]``, from that row's generator when there is one per row."""
    kw = {"dtype": like.dtype, "device": like.device}
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand((), generator=g, **kw) for g in generator])
    return torch.rand(b, generator=generator, **kw)


def _systematic(logw: Tensor, u: Tensor) -> Tensor:
    """Systematic resampling per row: ``logw`` ``[B, K]``, ``u`` ``[B]`` -> ancestor indices ``[B, K]``."""
    k = logw.shape[1]
    cdf = torch.softmax(logw, dim=1).cumsum(1)
    cdf[:, -1] = 1.0
    points = (u[:, None] + torch.arange(k, dtype=logw.dtype, device=logw.device)[None]) / k
    return torch.searchsorted(cdf, points).clamp(max=k - 1)


def _tweedie_noise(
    d: Tensor, xg: Tensor, b: int, k: int, generator: GeneratorLike, m: int
) -> Tensor:
    """``f(J) z`` per particle, ``f(l) = sqrt(min(l, 1))``, by ``m`` Lanczos steps on ``J = dD/dx`` from
    ``z`` (standard normal from each row's generator): noise of covariance ``J`` in the directions where
    ``x0 | x`` spreads less than the noise (eigenvalues <= 1, one mixture component), capped at ``I``
    where it spans several modes. ``m`` backward passes (the graph is kept for the twist).

    References:
        Chow & Saad, "Preconditioned Krylov Subspace Methods for Sampling Multivariate Gaussian
        Distributions", SIAM J. Sci. Comput. 2014 (Lanczos approximation of ``f(J) z``).
    """
    z = randn_like(d.detach().reshape(b, k, *d.shape[1:]), generator).reshape(d.shape).flatten(1)
    norm = z.norm(dim=1, keepdim=True)
    tiny = torch.finfo(z.dtype).tiny
    q, q_prev, beta = z / norm.clamp(min=tiny), torch.zeros_like(z), torch.zeros_like(norm)
    basis, alphas, betas = [q], [], []
    for j in range(m):
        w = vjp(d, xg, q.reshape(d.shape)).detach().flatten(1)
        alpha = (q * w).sum(1, keepdim=True)
        w = w - alpha * q - beta * q_prev
        for u in basis:  # full re-orthogonalisation (m is small)
            w = w - (u * w).sum(1, keepdim=True) * u
        alphas.append(alpha)
        if j < m - 1:
            beta = w.norm(dim=1, keepdim=True)
            betas.append(beta)
            q_prev, q = q, w / beta.clamp(min=tiny)
            basis.append(q)
    t = torch.diag_embed(torch.cat(alphas, 1))
    if betas:
        off = torch.diag_embed(torch.cat(betas, 1), offset=1)
        t = t + off + off.mT
    # a non-finite J (a diverging denoiser) is left for ``watch`` to report with its step
    lam, vec = torch.linalg.eigh(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0))
    fl = lam.clamp(0.0, 1.0).sqrt()
    coef = vec @ (fl * vec[:, 0, :]).unsqueeze(-1)  # f(T) e1, [BK, m, 1]
    out = norm * (torch.stack(basis, 2) @ coef).squeeze(-1)
    return out.reshape(d.shape)


def _gaussian_twist(d, xg, y, operator, var, sy, last):
    """``log N(y; A d, sigma_y^2 I + r^2 A A^T)`` (up to a constant) and its gradient in ``x``."""
    r = y - operator.forward(d)
    if operator.linear:
        lt = -0.5 * (r * gram_solve(operator, r, var - sy * sy, sy * sy)).flatten(1).sum(1)
    else:
        lt = -0.5 * r.flatten(1).square().sum(1) / var
    g = None if last else vjp(lt.sum(), xg, torch.ones_like(lt.sum()), retain=False)
    return lt, g


def _tweedie_twist(d, xg, y, operator, s0, sy, iters):
    """``-(r^T S^{-1} r) / 2`` with ``S = sigma_y^2 I + s0^2 A J A^T`` (``J = dD/dx``, Tweedie's
    covariance), ``S^{-1} r`` by ``iters`` CG steps, and ``J A^T S^{-1} r``, its gradient with ``S`` held
    fixed. ``iters + 1`` backward passes."""
    r = (y - operator.forward(d)).detach()

    def matvec(u: Tensor) -> Tensor:
        return sy * sy * u + s0 * s0 * operator.forward(vjp(d, xg, operator.adjoint(u)))

    v = cg(matvec, r, iters)
    lt = -0.5 * (r * v).flatten(1).sum(1)
    return lt, vjp(d, xg, operator.adjoint(v), retain=False)


def auto_particles(steps: int) -> int:
    """TDS's default particle count for ``steps`` steps: 2 below 12 steps, 4 below 16, else 6 (so 100
    network evaluations run 6 x 16, 50 run 4 x 12, 20 run 2 x 10). Chosen on the inverse bench's tuning
    problems, where the Tweedie-variance step needs about 12-16 steps and more particles weigh
    modes better (docs/inverse-problems.md). For a given schedule; a budget picks its particles with
    ``particles_for_budget`` (here the cost ``N K`` jumps: 11 steps cost 22, 12 cost 48)."""
    return 2 if steps < 12 else 4 if steps < 16 else 6


#: The measured rule as (particles, fewest steps that may run them), most particles first: 6 from 16
#: steps, 4 from 12, 2 always (``auto_particles``).
_TIERS = ((6, 16), (4, 12), (2, 1))


def particles_for_budget(budget: int) -> int:
    """TDS's default particle count for a budget of ``budget`` network evaluations per sample: the most
    particles ``K`` whose fewest steps under ``auto_particles``'s rule fit, ``K x min_steps(K) <=
    budget`` (6 from 96, 4 from 48, else 2); the budget then runs ``budget // K`` steps. So 20 runs 2 x
    10, 50 runs 4 x 12 and 100 runs 6 x 16, as ``auto_particles`` (the measured choices), and every
    budget of 20 or more spends at least ``budget - K + 1`` of itself (94%): choosing ``K`` from the
    steps instead would leave budgets just short of a jump (47 -> 2 x 11 = 22, 95 -> 4 x 15 = 60)
    half spent. More particles still only run with enough steps; fewer than ``auto_particles(N)`` may
    run on ``N`` steps (2 x 23 at 47)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (network evaluations); got {budget!r}")
    return next(k for k, n in _TIERS if k * n <= budget or n == 1)


def _k(n: int, o: dict) -> int:
    return auto_particles(n) if o["particles"] is None else o["particles"]


@solver(
    nfe=lambda n, o: n * _k(n, o),
    vjp=lambda n, o: (
        (n - 1)
        * _k(n, o)
        * (
            (o["cg_iters"] + 1 if o["twist"] == "tweedie" else 1)
            + o["lanczos"] * (o["variance"] == "tweedie")
        )
    ),
)
def tds(
    denoiser: Callable,
    y: Tensor,
    operator: Operator,
    x: Tensor,
    sigmas: Tensor,
    *,
    sigma_y: float,
    generator: GeneratorLike = None,
    callback: Callable | None = None,
    progress: bool = False,
    particles: int | None = None,
    data_var: float = 1.0,
    twist: str = "tweedie",
    cg_iters: int = 4,
    variance: str = "tweedie",
    lanczos: int = 3,
) -> Tensor:
    """Twisted diffusion sampler: SMC over the DDPM chain, twisted by an approximate likelihood.

    Each output row runs its own ``K = particles`` particles (``None``: ``auto_particles(N)``, 6 at 16
    steps or more; ``scorekit.inverse.posterior_samples`` with a budget passes
    ``particles_for_budget(nfe)`` instead) (row ``b``'s particle 0 starts at
    ``x[b]``, the others at fresh ``sigma_0`` noise from that row's generator). With ``d = D(x, sigma)``,
    ``r = y - A d`` and ``J = dD/dx``, the twisting function is a Gaussian likelihood ``log pt_i(y | x) =
    -r^T S_i^{-1} r / 2``:

    * ``twist="tweedie"`` (default; linear ``A``): ``S_i = sigma_y^2 I + s^2 A J A^T``, Tweedie's
      covariance of ``x0 | x`` as in MMPS; ``S^{-1} r`` by ``cg_iters`` conjugate-gradient steps (each a
      backward pass), gradient ``g = J A^T S^{-1} r`` with ``S`` held fixed (one more);
    * ``twist="pigdm"``: ``S_i = sigma_y^2 I + r_i^2 A A^T``, ``r_i^2 = data_var s^2 / (data_var + s^2)``
      (PiGDM's likelihood; Gram solve by SVD or CG; for a non-linear ``A`` the isotropic
      ``-|y - A(d)|^2 / (2 (sigma_y^2 + r_i^2))``), gradient by autograd.

    A step from ``s0`` to ``s1`` proposes from the DDPM transition shifted by ``g``:

        mu  = d + (s1/s0)^2 (x - d),        v = s1^2 (1 - (s1/s0)^2)           (model transition p)
        x'  ~ q = N(mu + (s0^2 - s1^2) g, v)
        log w' = log p(x' | x) - log q(x' | x) + log pt_{i+1}(y | x') - log pt_i(y | x),

    resampling every step (systematic, per row). ``variance="tweedie"`` adds to the model transition
    ``p`` the spread of ``x0 | x`` that the DDPM step (a point mass at ``d``) leaves out:
    ``mu += (1 - (s1/s0)^2) s0 f(J) z``, ``f(l) = sqrt(min(l, 1))`` applied by ``lanczos`` Lanczos steps
    (``J`` taken symmetric, as Tweedie's ``J = Cov[x0 | x] / s0^2`` is for an exact denoiser), so that
    for a Gaussian prior each step is the exact reverse transition at any step size (tested); children
    of one resampled parent share that term up to an alternating sign (antithetic: a duplicated parent's
    two copies do not move as one) and differ by the DDPM noise; the weights are unchanged (the term has
    the same law under ``p`` and ``q``). At ``sigma = 0`` the twist is the exact likelihood
    ``N(y; A(x0), sigma_y^2)``, so the particles target ``p(x0) p(y | x0)`` of the discretised chain
    whatever the twist, and one particle per row is returned (drawn by weight). The twist decides how
    few particles suffice (on the 64-D projection bench MMPS alone puts 7% of its samples in the wrong
    mixture component, TDS none), the Tweedie variance how few steps: the defaults (6 particles x 16
    steps at 100 NFE, 4 x 12 at 50, 2 x 10 at 20; ``variance="tweedie"``) were chosen on the bench's tuning problems, where the DDPM
    step at 25 steps left a 64-D projection 2.1x the floor (coverage 0.80) and this one 1.0x
    (docs/inverse-problems.md). Needs ``sigma_y > 0``. Cost per output row: ``NFE = N K`` (a call on ``B K`` rows counts
    ``K``), ``VJP = (N - 1) K (cg_iters + 1)`` (tweedie) or ``(N - 1) K`` (pigdm), plus ``(N - 1) K
    lanczos`` with ``variance="tweedie"``.

    References:
        Wu, Trippe, Naesseth, Blei & Cunningham, "Practical and Asymptotically Exact Conditional
        Sampling in Diffusion Models", NeurIPS 2023, Alg. 1 and eqs. 8-10.
        Chow & Saad, "Preconditioned Krylov Subspace Methods for Sampling Multivariate Gaussian
        Distributions", SIAM J. Sci. Comput. 2014 (``f(J) z`` by Lanczos).
    """
    sy = check_problem("tds", y, operator, x, sigma_y, linear=False)
    if sy <= 0:
        raise ValueError("tds needs sigma_y > 0 (the final weights are the likelihood); got 0")
    if particles is not None and (
        isinstance(particles, bool) or not isinstance(particles, int) or particles < 1
    ):
        raise ValueError(f"particles must be a positive int or None (auto); got {particles!r}")
    check_option("data_var", data_var, 1e-12)
    if twist not in ("pigdm", "tweedie"):
        raise ValueError(f"twist must be 'pigdm' or 'tweedie'; got {twist!r}")
    if twist == "tweedie" and not operator.linear:
        raise ValueError(
            f"tds twist='tweedie' needs a linear operator; got non-linear {operator!r}"
        )
    if isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 0:
        raise ValueError(f"cg_iters must be an int >= 0; got {cg_iters!r}")
    if isinstance(lanczos, bool) or not isinstance(lanczos, int) or lanczos < 1:
        raise ValueError(f"lanczos must be an int >= 1; got {lanczos!r}")
    if variance not in ("ddpm", "tweedie"):
        raise ValueError(f"variance must be 'ddpm' or 'tweedie'; got {variance!r}")
    s = prepare(denoiser, x, sigmas)[0]
    b, k, shape = x.shape[0], particles or auto_particles(len(s) - 1), x.shape[1:]
    fresh = randn_like(x.new_empty(b, k - 1, *shape), generator) * s[0]
    xp = torch.cat([x[:, None], fresh], 1).reshape(b * k, *shape)
    _, model = prepare(denoiser, xp, sigmas)
    yp = y.repeat_interleave(k, 0)
    logw = torch.zeros(b, k, dtype=x.dtype, device=x.device)
    carry = torch.zeros_like(logw)  # log p/q of the last move minus the last twist
    first = None
    for i in steps(len(s) - 1, progress):
        first = watch(xp, i, first)
        s0, s1 = s[i], s[i + 1]
        var = sy * sy + (data_var * s0 * s0 / (data_var + s0 * s0) if s1 > 0 else 0.0)
        last = s1 == 0
        with torch.enable_grad():
            xg = xp.detach().requires_grad_(not last)
            d = model(xg, s0)
            # noise of covariance ~ J for the spread of x0 | x that the DDPM step leaves out
            e2 = (
                None
                if last or variance == "ddpm"
                else _tweedie_noise(d, xg, b, k, generator, lanczos)
            )
            if twist == "tweedie" and not last:
                lt, g = _tweedie_twist(d, xg, yp, operator, s0, sy, cg_iters)
            else:
                lt, g = _gaussian_twist(d, xg, yp, operator, var, sy, last)
        d, lt = d.detach(), lt.detach().reshape(b, k)
        emit(callback, i, s0, xp, d)
        logw = carry + lt
        if last:  # x0 = D(x_1): the twist at sigma = 0 is the exact likelihood
            cdf = torch.softmax(logw, dim=1).cumsum(1)
            u = _uniforms(b, x, generator)[:, None] * cdf[:, -1:]
            pick = torch.searchsorted(cdf, u).clamp(max=k - 1)[:, 0]  # one particle, by weight
            return finish_watched(
                d.reshape(b, k, *shape)[torch.arange(b, device=x.device), pick], first, s, "tds"
            )
        anc = _systematic(logw, _uniforms(b, x, generator))
        rows = (torch.arange(b, device=x.device)[:, None] * k + anc).flatten()
        xp, d, g, lt = xp[rows], d[rows], g[rows], lt.flatten()[rows].reshape(b, k)
        ratio = (s1 / s0) ** 2
        mu = d + ratio * (xp - d)
        v = s1 * s1 * (1 - ratio)
        if e2 is not None:  # children of one parent share it (each child's law is still p's)
            # siblings alternate its sign (antithetic): two copies of a parent do not move as one
            rank = torch.arange(k, device=x.device)[None] - torch.searchsorted(anc, anc)
            sign = (1 - 2 * (rank % 2)).flatten().to(x.dtype)
            mu = mu + (1 - ratio) * s0 * append_dims(sign, xp.ndim) * e2[rows]
        shift = (s0 * s0 - s1 * s1) * g
        z = randn_like(xp.reshape(b, k, *shape), generator).reshape(b * k, *shape)
        xp = mu + shift + v**0.5 * z
        # log N(x'; mu, v) - log N(x'; mu + shift, v), per particle
        log_pq = (-(xp - mu).square() + (xp - mu - shift).square()).flatten(1).sum(1) / (2 * v)
        carry = log_pq.reshape(b, k) - lt
    raise AssertionError("unreachable: sigmas end in 0")
