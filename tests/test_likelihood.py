"""Likelihoods against exact mathematics: Gaussian-mixture noised densities, closed-form Gaussian
SDE/ODE marginals, and bin probabilities of discretised Gaussians."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.stats import norm

from scorekit.analytic import GaussianMixture, gaussian, target
from scorekit.likelihood import (
    ODESolveError,
    bits_per_dim,
    dequantize,
    dequantized_log_likelihood,
    elbo,
    log_det_normalization,
    log_likelihood,
)

F64 = torch.float64


def mixture16(seed: int = 0) -> GaussianMixture:
    """A 16-D mixture of 4 full-covariance Gaussians, centred, per-dimension variance about 1."""
    g = torch.Generator().manual_seed(seed)
    k, d = 4, 16
    means = torch.randn(k, d, generator=g, dtype=F64)
    a = torch.randn(k, d, d, generator=g, dtype=F64) / math.sqrt(2 * d)
    covs = 0.2 * (a @ a.mT + 0.2 * torch.eye(d, dtype=F64))
    means = means - means.mean(0)
    return GaussianMixture(means, covs)


# -- ODE log-likelihood -------------------------------------------------------------------------
# Tolerance: the prior N(0, sigma_max^2 I) replaces p_{sigma_max} = p * N(0, sigma_max^2). For centred
# data of per-dimension variance c the pointwise log-density gap is O(c |x|^2 / sigma_max^4 + d c /
# sigma_max^2) ~ 1e-4 per dimension at sigma_max = 100; the solver at rtol = atol = 1e-6 adds about
# 1e-5. Both are well inside 1e-3 nats per dimension. Replacing the prior term by the exact
# p_{sigma_max} at the trajectory's end point removes the first error, leaving only the solver's.


@pytest.mark.parametrize("name", ["ring8", pytest.param("m16", marks=pytest.mark.slow)])
def test_ode_exact_divergence_matches_mixture_density(name):
    gm = target("ring8") if name == "ring8" else mixture16()
    x = gm.sample(6, torch.Generator().manual_seed(1))
    x[0] += 0.5  # one point off the data, in a low-density region
    sigma_min, sigma_max = 0.01, 100.0
    lp, info = log_likelihood(
        gm, x, sigma_min=sigma_min, sigma_max=sigma_max, rtol=1e-6, atol=1e-6, return_info=True
    )
    exact = gm.log_prob(x, sigma_min)
    assert lp.shape == (6,) and lp.dtype == F64
    assert (lp - exact).abs().max() < 1e-3 * gm.dim
    # with the exact density at sigma_max in place of the prior, only the solver's error is left
    exact_end = lp - info.prior_logp + gm.log_prob(info.prior_point, sigma_max)
    assert (exact_end - exact).abs().max() < 2e-4 * gm.dim
    assert info.status == "ok" and info.nfe > 10 and torch.equal(info.stderr, torch.zeros(6))


def test_ode_likelihood_float32_and_other_method():
    gm = target("checker")
    x = gm.sample(4, torch.Generator().manual_seed(2))
    exact = gm.log_prob(x, 0.05)
    lp = log_likelihood(gm.to(F64), x.float(), sigma_min=0.05, sigma_max=80.0, method="bosh3")
    assert lp.dtype == torch.float32
    assert (lp.double() - exact).abs().max() < 1e-3 * 2 + 1e-3  # float32 rounding on top


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_within_reported_stderr(probe):
    gm = mixture16(1)
    x = gm.sample(12, torch.Generator().manual_seed(3))
    kw = {"sigma_min": 0.02, "sigma_max": 50.0, "rtol": 1e-5, "atol": 1e-5}
    exact = log_likelihood(gm, x, **kw)
    est, info = log_likelihood(
        gm, x, divergence="hutchinson", n_probes=8, probe=probe,
        generator=torch.Generator().manual_seed(4), return_info=True, **kw,
    )  # fmt: skip
    se = info.stderr
    assert se.shape == (12,) and (se > 0).all()
    z = (est - exact) / se
    pooled = (est - exact).sum() / se.square().sum().sqrt()
    assert abs(pooled) < 4, f"pooled z = {pooled:.2f}"
    # each row's z is Student-t with 7 dof (variance 1.4); the mean square must be of that order
    assert 0.2 < z.square().mean() < 4.0, z
    # per-probe values average to the estimate
    torch.testing.assert_close(info.per_probe.mean(1), est)


def test_hutchinson_single_probe_has_no_stderr():
    gm = target("ring8")
    x = gm.sample(3, torch.Generator().manual_seed(0))
    _, info = log_likelihood(gm, x, sigma_min=0.05, sigma_max=20.0, divergence="hutchinson",
                             return_info=True)  # fmt: skip
    assert info.stderr is None and info.per_probe.shape == (3, 1)


def test_likelihood_bad_inputs_are_clear():
    gm = target("ring8")
    x = gm.sample(3)
    ok = {"sigma_min": 0.01, "sigma_max": 10.0}
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        log_likelihood(gm, x, sigma_min=1.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        log_likelihood(gm, x, sigma_min=0.0, sigma_max=1.0)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf in rows \[1\]"):
        log_likelihood(gm, bad, **ok)
    with pytest.raises(TypeError, match="floating-point"):
        log_likelihood(gm, x.long(), **ok)
    with pytest.raises(ValueError, match=r"shape \[B, \.\.\.\]"):
        log_likelihood(gm, x[:, 0], **ok)
    with pytest.raises(ValueError, match="rtol"):
        log_likelihood(gm, x, rtol=1e-20, **ok)
    with pytest.raises(ValueError, match="rtol"):
        log_likelihood(gm.to(torch.float32), x.float(), rtol=1e-9, **ok)  # below float32 reach
    with pytest.raises(ValueError, match="atol"):
        log_likelihood(gm, x, atol=-1.0, **ok)
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(gm, x, divergence="trace", **ok)
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(gm, x, divergence="hutchinson", probe="sphere", **ok)
    with pytest.raises(ValueError, match="method"):
        log_likelihood(gm, x, method="euler", **ok)
    with pytest.raises(TypeError):
        log_likelihood(gm, x, 0.01, 10.0)  # options are keyword-only


def test_solver_failure_names_rows_and_reason():
    gm = target("ring8")
    x = gm.sample(5, torch.Generator().manual_seed(0))

    def poisoned(z, sigma):  # rows with a flag value turn non-finite above sigma = 1
        out = gm(z, sigma)
        flag = (z[:, 0] > 100) & (sigma > 1)
        return torch.where(flag[:, None], torch.nan, out)

    x[[1, 3], 0] = 200.0
    with pytest.raises(ODESolveError, match="non-finite") as err:
        log_likelihood(poisoned, x, sigma_min=0.01, sigma_max=10.0)
    assert set(err.value.failures) == {1, 3}
    # a step budget too small for every row: bisection names all of them, with the reason
    with pytest.raises(ODESolveError, match="max_steps") as err:
        log_likelihood(gm, x[:3], sigma_min=1e-3, sigma_max=10.0, max_steps=2)
    assert set(err.value.failures) == {0, 1, 2}


# -- ELBO -----------------------------------------------------------------------------------------


def test_elbo_gaussian_closed_form_is_tight():
    # exact denoiser of N(m, diag(c)) used as its own control variate: the Monte Carlo part vanishes and
    # the bound must equal log N(x; m, c + sigma_min^2) up to the prior's gap (O(c / sigma_max^2)/dim)
    m = torch.tensor([0.3, -1.0, 0.5], dtype=F64)
    c = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    gm = gaussian(m, c)
    x = gm.sample(5, torch.Generator().manual_seed(0))
    for sigma_min in (1e-3, 0.3):
        b = elbo(gm, x, sigma_min=sigma_min, sigma_max=100.0, n_sigma=4, reference=(m, c))
        assert (b - gm.log_prob(x, sigma_min)).abs().max() < 1e-3 * 3


@pytest.mark.parametrize("ref_var", [None, 1e-8])
def test_elbo_monte_carlo_part_unbiased_on_gaussian(ref_var):
    # Model and control variate differ (batch Gaussian, or a near-constant denoiser), so the Monte
    # Carlo part carries real weight; at sigma_min = 0.3 the sigma_min^2 cross term is about a nat
    # per row. The bound is tight for the exact denoiser: pooled z of (ELBO - log p) must be small.
    m = torch.tensor([0.3, -1.0, 0.5], dtype=F64)
    c = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    gm = gaussian(m, c)
    x = gm.sample(64, torch.Generator().manual_seed(0))
    ref = (
        None
        if ref_var is None
        else (torch.zeros(3, dtype=F64), torch.full((3,), ref_var, dtype=F64))
    )
    b, info = elbo(gm, x, sigma_min=0.3, sigma_max=100.0, n_sigma=128, reference=ref,
                   generator=torch.Generator().manual_seed(1), return_info=True)  # fmt: skip
    pooled = (b - gm.log_prob(x, 0.3)).sum() / info.stderr.square().sum().sqrt()
    assert abs(pooled) < 3.5, f"pooled z = {pooled:.2f}"


@pytest.mark.parametrize(
    ("name", "sigma_min", "far_reference"),
    [("ring8", 0.01, False), ("m16", 0.01, False), ("ring8", 0.3, True), ("m16", 0.1, True)],
)
def test_elbo_below_and_close_to_exact_for_exact_denoiser(name, sigma_min, far_reference):
    # For an exact denoiser the continuous-time bound is tight (the path posterior equals the forward
    # process), so the estimate must not exceed log p beyond Monte Carlo error and must come close.
    # A far-off control variate (a ~ 1 at every sigma) leaves every term to the Monte Carlo part, and
    # sigma_min near the components' scale makes the sigma_min^2 cross term matter.
    gm = target("ring8") if name == "ring8" else mixture16()
    x = gm.sample(32, torch.Generator().manual_seed(5))
    ref = (torch.zeros(gm.dim, dtype=F64), torch.full((gm.dim,), 1e6, dtype=F64))
    b, info = elbo(gm, x, sigma_min=sigma_min, sigma_max=100.0, n_sigma=64,
                   reference=ref if far_reference else None,
                   generator=torch.Generator().manual_seed(6), return_info=True)  # fmt: skip
    exact = gm.log_prob(x, sigma_min)
    pooled = (b - exact).sum() / info.stderr.square().sum().sqrt()
    assert pooled < 3.5, f"ELBO above log p: pooled z = {pooled:.2f}"
    assert pooled > -3.5, f"ELBO far below log p for an exact denoiser: pooled z = {pooled:.2f}"
    assert info.nfe == 128


def test_elbo_strictly_below_sde_likelihood_for_inexact_denoiser():
    # D = a(sigma) x with a = c(sigma)/(c(sigma) + sigma^2) and c varying with sigma is no Gaussian's
    # exact denoiser. Its reverse SDE (prior N(0, sigma_max^2)) keeps x Gaussian with variance v,
    # dv/dsigma = 4 sigma v / (c + sigma^2) - 2 sigma, v(sigma_max) = sigma_max^2; the ELBO bounds
    # log N(x; 0, v(sigma_min)) from below, with a strict gap. The PF-ODE gives another Gaussian.
    torch.manual_seed(0)
    cfun = lambda s: (1 + s**2) / (1 + s**2 / 4)  # noqa: E731

    def den(x, s):
        c = cfun(s)[:, None]
        return c / (c + s[:, None] ** 2) * x

    smin, smax, d = 0.01, 100.0, 4
    sol = solve_ivp(lambda s, v: 4 * s * v / (cfun(s) + s**2) - 2 * s, [smax, smin], [smax**2],
                    rtol=1e-11, atol=1e-12, method="DOP853")  # fmt: skip
    v_sde = float(sol.y[0, -1])
    x = torch.randn(100, d, generator=torch.Generator().manual_seed(0), dtype=F64) * v_sde**0.5
    log_sde = -0.5 * (x.square().sum(1) / v_sde + d * math.log(2 * math.pi * v_sde))
    b, info = elbo(den, x, sigma_min=smin, sigma_max=smax, n_sigma=32,
                   generator=torch.Generator().manual_seed(1), return_info=True)  # fmt: skip
    gap = log_sde - b
    se = info.stderr.square().sum().sqrt() / 100
    assert gap.mean() > 5 * se and gap.mean() > 0.05, (gap.mean(), se)
    # and the ODE log-likelihood of this denoiser (a different Gaussian) is matched exactly
    integral = solve_ivp(lambda s, y: s / (cfun(s) + s**2), [smin, smax], [0.0],
                         rtol=1e-11, atol=1e-14).y[0, -1]  # fmt: skip
    v_ode = smax**2 * math.exp(-2 * integral)
    lp = log_likelihood(den, x[:4], sigma_min=smin, sigma_max=smax)
    log_ode = -0.5 * (x[:4].square().sum(1) / v_ode + d * math.log(2 * math.pi * v_ode))
    assert (lp - log_ode).abs().max() < 1e-3 * d


def test_elbo_bad_inputs():
    gm = target("ring8")
    x = gm.sample(2)
    with pytest.raises(ValueError, match="n_sigma"):
        elbo(gm, x, sigma_min=0.01, sigma_max=10.0, n_sigma=3)
    with pytest.raises(ValueError, match="reference"):
        elbo(gm, x, sigma_min=0.01, sigma_max=10.0, reference=(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        elbo(gm, x, sigma_min=10.0, sigma_max=1.0)


# -- dequantisation and bits per dimension -------------------------------------------------------


def test_dequantize_range_and_errors():
    k = torch.tensor([[0, 3], [16, 7]])
    x = dequantize(k, generator=torch.Generator().manual_seed(0))
    assert ((x - k) >= -0.5).all() and ((x - k) < 0.5).all()
    y = dequantize(k, generator=torch.Generator().manual_seed(0), centered=False)
    assert ((y - k) >= 0).all() and ((y - k) < 1).all()
    with pytest.raises(ValueError, match="whole numbers"):
        dequantize(torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="scale"):
        log_det_normalization(0.0, 3)


def test_bits_per_dim_of_dequantised_gaussian_matches_hand_formula():
    # Model in normalised units y = (x~ - shift) / scale: N(mu, s^2) per dimension; integer levels.
    # By hand, with u ~ U[-1/2, 1/2):  E_u log p_X~(k + u) = sum_i [ -1/2 log(2 pi S^2)
    #   - ((k_i - M)^2 + 1/12) / (2 S^2) ]  where M = shift + scale mu, S = scale s (data units).
    scale, shift, mu, s, d = 8.0, 8.0, 0.1, 0.4, 3
    gm = gaussian(torch.full((d,), mu, dtype=F64), torch.full((d,), s**2, dtype=F64))
    levels = torch.tensor([[0, 8, 16], [5, 9, 12], [8, 8, 8]])
    M, S = shift + scale * mu, scale * s
    by_hand = (-0.5 * math.log(2 * math.pi * S**2) - ((levels - M) ** 2 + 1 / 12) / (2 * S**2)).sum(
        1
    )
    est, se = dequantized_log_likelihood(
        lambda y: gm.log_prob(y), levels, scale=scale, shift=shift, n_samples=4000,
        generator=torch.Generator().manual_seed(0), dtype=F64,
    )  # fmt: skip
    assert ((est - by_hand).abs() < 4 * se).all(), (est, by_hand, se)
    bpd = bits_per_dim(
        est - log_det_normalization(scale, d), dim=d, log_det_jacobian=-d * math.log(scale)
    )
    torch.testing.assert_close(bpd, -est / (d * math.log(2)))
    # Jensen: the bound lies below the exact log-probability of each bin (numerical integration)
    p_bin = norm.cdf((levels + 0.5 - M) / S) - norm.cdf((levels - 0.5 - M) / S)
    log_p_bin = torch.as_tensor(p_bin).log().sum(1)
    assert (by_hand <= log_p_bin).all() and (log_p_bin - by_hand < 0.05 * d).all()


def test_dequantized_ode_likelihood_uses_same_draws():
    # the ODE path gives the same numbers as the exact density on identical dequantisation draws
    gm = gaussian(torch.zeros(2, dtype=F64), torch.tensor([0.3, 0.6], dtype=F64))
    levels = torch.tensor([[3, 4], [1, 6], [4, 4]])
    kw = {"scale": 4.0, "shift": 4.0, "n_samples": 2, "dtype": F64}
    smin = 0.01
    ode, _ = dequantized_log_likelihood(
        lambda y: log_likelihood(gm, y, sigma_min=smin, sigma_max=100.0, rtol=1e-6, atol=1e-6),
        levels, generator=torch.Generator().manual_seed(3), **kw,
    )  # fmt: skip
    ref, _ = dequantized_log_likelihood(
        lambda y: gm.log_prob(y, smin), levels, generator=torch.Generator().manual_seed(3), **kw
    )
    assert (ode - ref).abs().max() < 1e-3 * 2


# -- the command line ------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_matches_library_and_reports_bad_data(tmp_path, capsys):
    import csv

    import numpy as np

    from scorekit.cli import main
    from scorekit.data import Normalization
    from scorekit.runs import load_run
    from scorekit.train.loop import TrainConfig, train

    run = tmp_path / "run"
    cfg = TrainConfig(data="moons", out=str(run), steps=10, batch=64, ckpt_every=10,
                      net={"hidden": 16, "depth": 1, "emb_dim": 8})  # fmt: skip
    train(cfg, progress=False)
    out = tmp_path / "ll.csv"
    argv = ["likelihood", "--run", str(run), "--data", "moons", "--out", str(out), "--limit", "6",
            "--divergence", "exact", "--bpd", "--float64", "--sigma-min", "0.01"]  # fmt: skip
    assert main(argv) == 0
    assert "bits/dim" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    got = torch.tensor([float(r["ode_log_likelihood_nats"]) for r in rows], dtype=F64)
    bpd = torch.tensor([float(r["ode_bits_per_dim"]) for r in rows], dtype=F64)
    # the same numbers straight from the library, on the run's normalised data
    den, info = load_run(run)
    from scorekit.data import load

    norm = Normalization.from_dict(info["normalization"])
    x = norm.encode(load("moons").normalization.decode(load("moons").x[:6])).double()
    want = log_likelihood(den.double(), x, sigma_min=0.01, sigma_max=80.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # bits/dim in the data's units, by hand: log p_raw = log p_model - sum_i log scale_i
    log_raw = want - sum(math.log(s) for s in norm.scale)
    torch.testing.assert_close(bpd, -log_raw / (2 * math.log(2)), rtol=0, atol=1e-9)
    # data of the wrong shape, and non-integer data with --dequantize: clear one-line errors
    np.save(tmp_path / "three.npy", np.ones((4, 3)))
    bad = ["likelihood", "--run", str(run), "--out", str(tmp_path / "x.csv"), "--data"]
    assert main([*bad, str(tmp_path / "three.npy")]) == 2
    assert "[N, 2]" in capsys.readouterr().err
    assert main([*bad, "moons", "--dequantize"]) == 2
    assert "integer levels" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
