"""Sampler-level guidance (fk_smc, cfg_pc) and guided sampling measured against exact tilted samples.

The exact tilted target ``p(x|y)^w p(x)^(1-w)`` of a class-conditional mixture is sampled exactly by
``ClassMixture.tilted_sample`` (its moments are checked by quadrature in ``test_guidance.py``); the
sample-size floor is the sliced W2 between two independent exact sample sets of the same size.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from scorekit.analytic import gaussian
from scorekit.guidance import (
    cfg,
    cfg_pc,
    class_target,
    classifier_guidance,
    effective_sample_size,
    fk_product,
    fk_smc,
    svdd,
    systematic_resample,
)
from scorekit.metrics import sliced_wasserstein
from scorekit.samplers import REGISTRY
from scorekit.samplers.common import PresetNoise, row_generators
from scorekit.schedules import karras

PAIR = class_target("pair1d")


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.inner(x, sigma)


def _start(m, d=1, seed=10, sigma_max=80.0):
    g = torch.Generator().manual_seed(seed)
    return sigma_max * torch.randn(m, d, generator=g, dtype=torch.float64)


def _floor(target, scale, m):
    """Mean sliced W2 between independent exact tilted sample sets of size ``m``, and one set."""
    sets = [
        target.tilted_sample(0, scale, m, torch.Generator().manual_seed(100 + i)) for i in range(4)
    ]
    floor = np.mean([sliced_wasserstein(sets[0], s) for s in sets[1:]])
    return float(floor), sets[0]


def test_systematic_resampling_copies_each_particle_floor_or_ceil_of_p_w_times():
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(3, 50, generator=g, dtype=torch.float64) * 2
    anc = systematic_resample(log_w, torch.rand(3, generator=g, dtype=torch.float64))
    w = torch.softmax(log_w, 1).numpy()
    for row in range(3):
        counts = np.bincount(anc[row].numpy(), minlength=50)
        assert counts.sum() == 50
        assert (counts >= np.floor(50 * w[row]) - 1e-9).all()
        assert (counts <= np.ceil(50 * w[row]) + 1e-9).all()
    wn = np.exp(log_w.numpy()) / np.exp(log_w.numpy()).sum(1, keepdims=True)
    np.testing.assert_allclose(effective_sample_size(log_w).numpy(), 1 / (wn**2).sum(1))


def test_fk_smc_at_scale_one_is_ddpm_ancestral_sampling_of_cond():
    # w = 1: the FK weight increments vanish, nothing is resampled, the move is DDPM's step.
    t = class_target("ring6")
    sig = karras(12, 0.01, 20.0, dtype=torch.float64)
    x = _start(6, d=2, sigma_max=20.0)
    c, u = Counting(t.cond(1)), Counting(t.uncond)
    stats = {}
    got = fk_smc(c, u, x, sig, scale=1.0, generator=row_generators(3, range(6)), stats=stats)
    want = REGISTRY["euler_ancestral"](
        t.cond(1), x, sig, generator=row_generators(3, range(6)), eta=1.0
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert c.calls == u.calls == 12 and stats["nfe"] == 24 and stats["resampled"] == []


@pytest.mark.slow
def test_fk_smc_converges_to_the_exact_tilted_target_and_cfg_does_not():
    # 2048 samples as 2048 / P independent populations of P particles, 200 karras steps.
    # Measured (4 seeds): sliced W2 / floor is about 11 for P = 1 (no reweighting: CFG's DDPM
    # sampler), 5 for P = 16 and 2-4 for P = 256; what is left at large P is the time discretisation.
    scale, m = 4.0, 2048
    floor, exact = _floor(PAIR, scale, m)
    sig = karras(200, 0.002, 80.0, dtype=torch.float64)
    x = _start(m)
    dist = {}
    for p in (1, 16, 256):
        gen = torch.Generator().manual_seed(1)
        out = fk_smc(PAIR.cond(0), PAIR.uncond, x, sig, scale=scale, particles=p, generator=gen)
        dist[p] = sliced_wasserstein(out, exact)
    # P = 1 is exactly plain CFG sampled by DDPM steps: biased far above the floor
    gen = torch.Generator().manual_seed(1)
    plain = REGISTRY["euler_ancestral"](
        cfg(PAIR.cond(0), PAIR.uncond, scale), x, sig, generator=gen
    )
    torch.testing.assert_close(
        plain,
        fk_smc(
            PAIR.cond(0),
            PAIR.uncond,
            x,
            sig,
            scale=scale,
            particles=1,
            generator=torch.Generator().manual_seed(1),
        ),
    )
    assert dist[1] > 8 * floor, (dist, floor)
    assert dist[1] > 1.5 * dist[16] > 1.5 * dist[256], (dist, floor)
    assert dist[256] < 5 * floor, (dist, floor)


def test_fk_smc_particle_groups_are_independent_populations():
    t = class_target("ring6")
    sig = karras(10, 0.01, 20.0, dtype=torch.float64)
    x = _start(16, d=2, sigma_max=20.0)
    kw = {"scale": 3.0, "particles": 8, "ess_threshold": 0.9}
    stats = {}
    full = fk_smc(
        t.cond(0), t.uncond, x, sig, generator=row_generators(5, range(16)), stats=stats, **kw
    )
    assert stats["resampled"], "the test should exercise resampling"
    alone = fk_smc(t.cond(0), t.uncond, x[8:], sig, generator=row_generators(5, range(8, 16)), **kw)
    torch.testing.assert_close(alone, full[8:], rtol=0, atol=0)
    again = fk_smc(t.cond(0), t.uncond, x, sig, generator=row_generators(5, range(16)), **kw)
    torch.testing.assert_close(again, full, rtol=0, atol=0)


def test_fk_smc_nan_weights_are_an_error_naming_the_step():
    t = class_target("ring6")
    sig = karras(8, 0.01, 20.0, dtype=torch.float64)

    def broken(x, sigma):
        out = t.cond(0)(x, sigma)
        return out * float("nan") if float(sigma[0]) < 1.0 else out

    s = sig.tolist()
    first_bad = next(i for i, v in enumerate(s) if v < 1.0)
    with pytest.raises(FloatingPointError, match=rf"^fk_smc: at step {first_bad} \(sigma="):
        fk_smc(broken, t.uncond, _start(4, d=2, sigma_max=20.0), sig, scale=2.0)


def test_fk_smc_and_cfg_pc_bad_input():
    t = class_target("ring6")
    sig = karras(4, 0.01, 20.0, dtype=torch.float64)
    x = _start(8, d=2)
    for scale in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^scale must be a finite number >= 0"):
            fk_smc(t.cond(0), t.uncond, x, sig, scale=scale)
        with pytest.raises(ValueError, match=r"^scale must be a finite number >= 0"):
            cfg_pc(t.cond(0), t.uncond, x, sig, scale=scale)
    with pytest.raises(ValueError, match=r"^particles must divide the batch B = 8; got 3"):
        fk_smc(t.cond(0), t.uncond, x, sig, scale=2.0, particles=3)
    with pytest.raises(ValueError, match=r"^ess_threshold"):
        fk_smc(t.cond(0), t.uncond, x, sig, scale=2.0, ess_threshold=1.5)
    with pytest.raises(ValueError, match=r"^n_corrector"):
        cfg_pc(t.cond(0), t.uncond, x, sig, scale=2.0, n_corrector=-1)
    preset = PresetNoise(torch.zeros(100, 8, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^generator: a PresetNoise hands out normal draws only"):
        fk_smc(t.cond(0), t.uncond, x, sig, scale=2.0, generator=preset)


def test_cfg_pc_cost_and_its_corrector_free_limit():
    t = class_target("ring6")
    sig = karras(9, 0.01, 20.0, dtype=torch.float64)
    x = _start(5, d=2, sigma_max=20.0)
    for c_steps in (0, 1, 3):
        c, u = Counting(t.cond(2)), Counting(t.uncond)
        cfg_pc(c, u, x, sig, scale=2.0, n_corrector=c_steps, generator=row_generators(0, range(5)))
        n = len(sig) - 1
        assert c.calls + u.calls == (n - 1) * (1 + 2 * c_steps) + 2
    # no corrector and w = 1: DDIM on the conditional model
    got = cfg_pc(t.cond(2), t.uncond, x, sig, scale=1.0, n_corrector=0)
    torch.testing.assert_close(got, REGISTRY["euler"](t.cond(2), x, sig), rtol=1e-9, atol=1e-9)
    # per-row generators: row i does not depend on the batch
    full = cfg_pc(
        t.cond(2), t.uncond, x, sig, scale=3.0, n_corrector=2, generator=row_generators(4, range(5))
    )
    one = cfg_pc(
        t.cond(2), t.uncond, x[3:4], sig, scale=3.0, n_corrector=2, generator=row_generators(4, [3])
    )
    torch.testing.assert_close(one[0], full[3], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_cfg_pc_converges_to_the_tilted_target_as_corrector_steps_grow():
    scale, m = 4.0, 2048
    floor, exact = _floor(PAIR, scale, m)
    sig = karras(25, 0.002, 80.0, dtype=torch.float64)
    dist = {}
    for c_steps in (0, 1, 16):
        out = cfg_pc(
            PAIR.cond(0),
            PAIR.uncond,
            _start(m),
            sig,
            scale=scale,
            n_corrector=c_steps,
            generator=torch.Generator().manual_seed(1),
        )
        dist[c_steps] = sliced_wasserstein(out, exact)
    assert dist[0] > 4 * floor and dist[0] > dist[1] > dist[16], (dist, floor)
    assert dist[16] < 1.5 * floor, (dist, floor)


def test_classifier_guidance_with_the_exact_classifier_samples_the_exact_conditional():
    t, m = class_target("ring6"), 2000
    exact = [t.cond(1).sample(m, torch.Generator().manual_seed(i)) for i in range(3)]
    floor = np.mean([sliced_wasserstein(exact[0], e) for e in exact[1:]])
    guided = classifier_guidance(t.uncond, t.classifier(1), 1.0)
    sig = karras(30, 0.002, 80.0, dtype=torch.float64)
    out = REGISTRY["heun"](guided, _start(m, d=2), sig)
    assert sliced_wasserstein(out, exact[0]) < 1.5 * floor
    # and not the unconditional distribution
    assert (
        sliced_wasserstein(t.uncond.sample(m, torch.Generator().manual_seed(9)), exact[0])
        > 5 * floor
    )


def test_fk_product_moves_a_product_of_experts_and_an_annealed_density_towards_the_exact_answer():
    # Exact answers: N(-0.5, 0.5) x N(1.0, 0.25) is N(0.5, 1/6); N(0.3, 0.5)^2 is N(0.3, 0.25).
    # The unweighted process (P = 1) is biased; the FK weights remove most of the bias at 200
    # steps (measured: product variance 0.102 -> 0.149, annealed variance 0.149 -> 0.213).
    one = torch.tensor([[1.0]], dtype=torch.float64)
    g1 = gaussian(torch.tensor([-0.5], dtype=torch.float64), 0.5 * one)
    g2 = gaussian(torch.tensor([1.0], dtype=torch.float64), 0.25 * one)
    g0 = gaussian(torch.tensor([0.3], dtype=torch.float64), 0.5 * one)
    sig = karras(200, 0.002, 80.0, dtype=torch.float64)
    m = 4096
    for experts, betas, mean, var in (([g1, g2], [1.0, 1.0], 0.5, 1 / 6), ([g0], [2.0], 0.3, 0.25)):
        x = _start(m) / math.sqrt(sum(betas))
        err = {}
        for p in (1, m):
            c = [Counting(e) for e in experts]
            out = fk_product(
                c, betas, x, sig, particles=p, generator=torch.Generator().manual_seed(0)
            )
            assert all(k.calls == 200 for k in c)
            err[p] = (abs(float(out.mean()) - mean), abs(float(out.var()) - var))
        assert err[m][1] < 0.5 * err[1][1], err
        # the mean: within the Monte Carlo error of one weighted population (ESS of a few hundred)
        assert err[m][0] < max(0.5 * err[1][0], 0.06), err
    with pytest.raises(ValueError, match=r"^betas must have a positive sum"):
        fk_product([g1, g2], [1.0, -1.0], _start(4), sig)
    with pytest.raises(ValueError, match=r"^denoisers and betas must be non-empty"):
        fk_product([g1], [1.0, 1.0], _start(4), sig)


def test_svdd_one_candidate_is_ddpm_and_its_cost_is_counted():
    t = class_target("ring6")
    sig = karras(10, 0.01, 20.0, dtype=torch.float64)
    x = _start(5, d=2, sigma_max=20.0)
    c = Counting(t.uncond)
    got = svdd(c, lambda x0: x0[:, 0], x, sig, candidates=1, generator=row_generators(1, range(5)))
    want = REGISTRY["euler_ancestral"](t.uncond, x, sig, generator=row_generators(1, range(5)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert c.calls == 10
    calls = []
    c = Counting(t.uncond)

    def reward(x0):
        calls.append(x0.shape[0])
        return x0[:, 0]

    svdd(c, reward, x, sig, candidates=3, alpha=0.5, generator=row_generators(1, range(5)))
    assert c.calls == 1 + 3 * 9 and sum(calls) == 3 * 9 * 5
    # per-row generators: row i does not depend on the batch
    full = svdd(
        t.uncond, reward, x, sig, candidates=3, alpha=0.5, generator=row_generators(2, range(5))
    )
    one = svdd(
        t.uncond, reward, x[2:3], sig, candidates=3, alpha=0.5, generator=row_generators(2, [2])
    )
    torch.testing.assert_close(one[0], full[2], rtol=1e-12, atol=1e-12)


def test_svdd_moves_towards_the_exact_reward_tilted_mixture():
    # p(x) exp(r(x) / alpha) with r(x) = x on the pair1d mixture is again a mixture: each component
    # N(m_k, v_k) becomes N(m_k + v_k / alpha, v_k) with weight ∝ w_k exp(m_k / alpha + v_k / (2 alpha^2)).
    from scorekit.analytic import GaussianMixture

    p, alpha, m = PAIR.uncond, 1.0, 2048
    logw = p.weights.log() + p.means[:, 0] / alpha + p.covs[:, 0] / (2 * alpha**2)
    tilt = GaussianMixture(p.means + p.covs / alpha, p.covs, torch.softmax(logw, 0))
    exact = tilt.sample(m, torch.Generator().manual_seed(1))
    sig = karras(30, 0.002, 80.0, dtype=torch.float64)
    x = _start(m)
    base = REGISTRY["euler_ancestral"](p, x, sig, generator=torch.Generator().manual_seed(4))
    dist = {1: sliced_wasserstein(base, exact)}
    for k in (2, 16):
        out = svdd(
            p,
            lambda x0: x0[:, 0],
            x,
            sig,
            candidates=k,
            alpha=alpha,
            generator=torch.Generator().manual_seed(4),
        )
        dist[k] = sliced_wasserstein(out, exact)
    # measured: 0.58, 0.35, 0.19 (floor 0.03): closer with more candidates, not exact (SVDD values
    # a candidate by r(D(x)), an approximation of the soft value)
    assert dist[1] > 1.5 * dist[2] > 1.5 * dist[16], dist


def test_fk_smc_resample_move_correctors_reach_the_exact_tilted_variance():
    # cond N(0, 0.25 I), uncond N(0, I) in 4-D, scale 4: the tilted target is N(0, I / 13) exactly
    # (precisions 4 * 4 - 3 * 1). 30 steps without correctors are far off (time discretisation of the
    # move and weights); 4 Langevin steps per level on the tilted score after each move close the gap.
    from scorekit.analytic import GaussianMixture

    d = 4
    mk = lambda v: GaussianMixture(torch.zeros(1, d, dtype=torch.float64),  # noqa: E731
                                   torch.full((1, d), v, dtype=torch.float64))  # fmt: skip
    c, u = mk(0.25), mk(1.0)
    var = {}
    for n_corr in (0, 4):
        g = torch.Generator().manual_seed(0)
        sig = karras(30, 0.002, 80.0, dtype=torch.float64)
        x = 80 * torch.randn(4096, d, generator=g, dtype=torch.float64)
        st = {}
        out = fk_smc(
            c, u, x, sig, scale=4.0, generator=g, particles=256, n_corrector=n_corr, stats=st
        )
        assert st["nfe"] == 2 * 30 + 2 * n_corr * 29
        var[n_corr] = float(out.var(0).mean())
    assert abs(var[4] - 1 / 13) < 0.004 and abs(var[0] - 1 / 13) > 0.03, var


def test_fk_smc_sigma_final_returns_distinct_rows_at_the_exact_tilted_variance():
    # The same 4-D Gaussian pair (tilted target N(0, I / 13) exactly). Without sigma_final the last
    # resample copies rows exactly; with it the last resample happens at the first sigma <= 0.05
    # and the remaining moves separate the copies, so every returned row is distinct, and the
    # variance still matches the exact one.
    from scorekit.analytic import GaussianMixture

    d = 4
    mk = lambda v: GaussianMixture(torch.zeros(1, d, dtype=torch.float64),  # noqa: E731
                                   torch.full((1, d), v, dtype=torch.float64))  # fmt: skip
    c, u = mk(0.25), mk(1.0)
    sig = karras(30, 0.002, 80.0, dtype=torch.float64)
    out, st = {}, {}
    for sf in (0.0, 0.05):
        g = torch.Generator().manual_seed(0)
        x = 80 * torch.randn(4096, d, generator=g, dtype=torch.float64)
        st[sf] = {}
        out[sf] = fk_smc(c, u, x, sig, scale=4.0, generator=g, particles=256, n_corrector=4,
                         sigma_final=sf, stats=st[sf])  # fmt: skip
    last = int((sig[:-1] <= 0.05).nonzero()[0])  # the first step at or below sigma_final
    assert st[0.05]["resampled"][-1] == last and st[0.0]["resampled"][-1] == 30
    assert torch.unique(out[0.0], dim=0).shape[0] < 4096  # exact copies from the final resample
    assert torch.unique(out[0.05], dim=0).shape[0] == 4096
    assert abs(float(out[0.05].var(0).mean()) - 1 / 13) < 0.004


def test_fk_smc_ess_step_substeps_reach_the_exact_tilted_variance_on_a_coarse_grid():
    # The 4-D Gaussian pair (tilted target N(0, I / 13) exactly) on 12 karras steps with 2
    # correctors: the weights of single steps collapse at small sigma and the variance is about
    # twice the exact one; with ess_step = 0.5 the steps whose increment would take a group's
    # conditional ESS below P / 2 are split in u = sigma^2 and the variance comes to the exact one.
    # Every extra sub-step costs its network evaluations (counted by the denoisers themselves).
    from scorekit.analytic import GaussianMixture

    d, n, c_steps = 4, 12, 2
    mk = lambda v: GaussianMixture(torch.zeros(1, d, dtype=torch.float64),  # noqa: E731
                                   torch.full((1, d), v, dtype=torch.float64))  # fmt: skip
    var = {}
    for tau in (0.0, 0.5):
        c, u = Counting(mk(0.25)), Counting(mk(1.0))
        g = torch.Generator().manual_seed(0)
        sig = karras(n, 0.002, 80.0, dtype=torch.float64)
        x = 80 * torch.randn(4096, d, generator=g, dtype=torch.float64)
        st = {}
        out = fk_smc(c, u, x, sig, scale=4.0, generator=g, particles=256, n_corrector=c_steps,
                     ess_step=tau, stats=st)  # fmt: skip
        k = st["substeps"]
        assert (k == 0) == (tau == 0) and k <= 16 * n
        assert st["nfe"] == c.calls + u.calls == 2 * (n + k) + 2 * c_steps * (n - 1 + k)
        var[tau] = float(out.var(0).mean())
    assert abs(var[0.5] - 1 / 13) < 0.012 and abs(var[0.0] - 1 / 13) > 0.05, var


def test_fk_smc_ess_step_without_a_split_is_the_unsplit_sampler():
    # ess_step = 1e-4 is below every conditional ESS this run meets (substeps == 0 checks it), so the
    # split machinery runs but never splits: the same draws give the same rows as ess_step = 0, and
    # no extra evaluation is counted. Bad values are errors.
    sig = karras(20, 0.002, 80.0, dtype=torch.float64)
    out, st = {}, {}
    for tau in (0.0, 1e-4):
        g = torch.Generator().manual_seed(3)
        x = 80 * torch.randn(512, 1, generator=g, dtype=torch.float64)
        st[tau] = {}
        out[tau] = fk_smc(PAIR.cond(0), PAIR.uncond, x, sig, scale=4.0, generator=g, particles=64,
                          n_corrector=1, ess_step=tau, stats=st[tau])  # fmt: skip
    assert torch.equal(out[0.0], out[1e-4]) and st[1e-4]["substeps"] == 0
    assert st[0.0]["nfe"] == st[1e-4]["nfe"] == 2 * 20 + 2 * 19
    x = torch.zeros(8, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="ess_step"):
        fk_smc(PAIR.cond(0), PAIR.uncond, x, sig, scale=2.0, ess_step=1.5)
    with pytest.raises(ValueError, match="max_split"):
        fk_smc(PAIR.cond(0), PAIR.uncond, x, sig, scale=2.0, ess_step=0.5, max_split=0)


def test_fk_smc_ess_step_weights_are_the_trapezoid_rule_on_the_refined_grid(monkeypatch):
    # cond N(0, 0.25 I) and uncond N(0, I) in 2-D, written out here: D_v(x, s) = v x / (v + s^2), so
    # the FK rate is g = w (w - 1) / 2 (0.75 / ((0.25 + u) (1 + u)))^2 |x|^2 in u = s^2. A coarse grid
    # with ess_step = 0.9 splits the last step (to sigma 0) and an inner one. With no resampling
    # before the end (ess_threshold = 0) the log-weights must be the trapezoid rule in u over every
    # point the sampler visited (the callback gives them), computed here from g: each point takes
    # half of the interval before and after it, the last one all of the interval to 0. The same
    # points as a plain grid (ess_step = 0, same draws) give the same weights. Each sub-step's
    # increment keeps the conditional ESS >= 0.9 and an inner split point sits on 0.9 (bisection).
    smc = importlib.import_module("scorekit.guidance.smc")
    w, vc, vu, tau, m = 4.0, 0.25, 1.0, 0.9, 8
    den = lambda v: lambda x, s: v / (v + s[:, None] ** 2) * x  # noqa: E731
    sig = torch.tensor([4.0, 2.0, 0.8, 0.0], dtype=torch.float64)
    x0 = 4.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    real = smc._resample

    def run(sigmas, es):
        pts, lws, st = [], [], {}

        def spy(x, d, log_w, *a):
            lws.append(log_w.flatten().clone())
            return real(x, d, log_w, *a)

        monkeypatch.setattr(smc, "_resample", spy)
        fk_smc(den(vc), den(vu), x0, sigmas, scale=w, generator=torch.Generator().manual_seed(1),
               ess_threshold=0.0, ess_step=es, max_split=m, stats=st,
               callback=lambda e: pts.append((e["i"], e["sigma"], e["x"].clone())))  # fmt: skip
        return pts, lws, st

    pts, lws, st = run(sig, tau)
    steps_of = [i for i, _, _ in pts]
    assert steps_of.count(2) >= 2 and max(steps_of.count(i) for i in range(2)) >= 2, steps_of
    assert st["substeps"] == len(pts) - 3
    u = np.array([s * s for _, s, _ in pts] + [0.0])
    h = u[:-1] - u[1:]
    rate = w * (w - 1) / 2 * (0.75 / ((vc + u[:-1]) * (vu + u[:-1]))) ** 2
    g = rate[:, None] * np.stack([x.square().sum(1).numpy() for _, _, x in pts])
    halves = np.concatenate([[0.0], h[:-1]]) + h * np.where(np.arange(len(h)) == len(h) - 1, 2, 1)
    inc = g * halves[:, None] / 2
    want = np.cumsum(inc, 0)
    np.testing.assert_allclose(torch.stack(lws[:-1]).numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(lws[-1].numpy(), want[-1], rtol=1e-10)
    # conditional ESS of each sub-step's increment, from the weights before it
    grid_h = {i: float(sig[i] ** 2 - sig[i + 1] ** 2) for i in range(3)}
    before = np.concatenate([np.zeros((1, 64)), want[:-1]])
    wn = np.exp(before - before.max(1, keepdims=True))
    wn /= wn.sum(1, keepdims=True)
    cess = (wn * np.exp(inc)).sum(1) ** 2 / (wn * np.exp(2 * inc)).sum(1)
    at_min = np.array(
        [abs(hk - grid_h[i] / m) < 1e-9 * grid_h[i] for hk, (i, _, _) in zip(h, pts, strict=True)]
    )
    inner = np.array([k + 1 < len(pts) and pts[k + 1][0] == pts[k][0] for k in range(len(pts))])
    assert ((cess >= tau - 1e-9) | at_min).all(), cess
    bisected = inner & ~at_min  # must include one of the last step's inner points
    assert (bisected & (np.array(steps_of) == 2)).any(), (steps_of, at_min)
    assert np.abs(cess[bisected] - tau).max() < 1e-6, cess
    # the refined points as a plain grid: the same weights (same draws: no corrector, no resample)
    refined = torch.tensor([s for _, s, _ in pts] + [0.0], dtype=torch.float64)
    _, plain, st0 = run(refined, 0.0)
    assert st0["substeps"] == 0
    np.testing.assert_allclose(torch.stack(plain).numpy(), torch.stack(lws).numpy(), rtol=1e-9)
