"""Sample-set distances: floors for equal distributions, closed forms for Gaussians, peers, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from scorekit.analytic import gaussian, target
from scorekit.metrics import (
    energy_distance,
    frechet_distance,
    frechet_distance_from_stats,
    mean_log_likelihood,
    mmd,
    negative_log_likelihood_gap,
    sliced_wasserstein,
)

F64 = torch.float64


def _normal(n, d, *, mean=0.0, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, d, generator=g, dtype=F64)


def _shift(d, a):
    v = torch.zeros(d, dtype=F64)
    v[0] = a
    return v


# -- sliced Wasserstein -------------------------------------------------------------------------------


def test_sliced_w2_zero_for_the_same_set_and_permutation_invariant():
    x = _normal(300, 3)
    assert sliced_wasserstein(x, x) == 0.0
    assert sliced_wasserstein(x, x[torch.randperm(300)]) == pytest.approx(0.0, abs=1e-12)


def test_sliced_w2_unequal_sizes_equal_replicated_sets():
    # An empirical distribution is unchanged by repeating every row k times, so sizes 200 and 300
    # replicated to 600 and 600 give the same value through the equal-size (sorted pairs) path.
    x, y = _normal(200, 3, seed=1), _normal(300, 3, mean=0.5, seed=2)
    got = sliced_wasserstein(x, y, n_projections=64, seed=5)
    ref = sliced_wasserstein(
        x.repeat_interleave(3, 0), y.repeat_interleave(2, 0), n_projections=64, seed=5
    )
    assert got == pytest.approx(ref, rel=1e-12)


def test_sliced_w2_in_1d_is_w2_of_sorted_samples():
    # In 1-D the only directions are +-1, so SW2 = W2 = sqrt(mean (sorted x - sorted y)^2).
    x, y = _normal(500, 1, seed=3), _normal(500, 1, mean=2.0, std=0.5, seed=4)
    expected = math.sqrt(
        float((x.flatten().sort().values - y.flatten().sort().values).square().mean())
    )
    assert sliced_wasserstein(x, y) == pytest.approx(expected, rel=1e-12)


def test_sliced_w2_shifted_isotropic_gaussians():
    # For N(m1, I) and N(m2, I) in R^d each projection theta gives 1-D Gaussians of equal variance,
    # whose W2^2 is (theta . dmu)^2. For theta uniform on the sphere E[theta theta^T] = I / d (by
    # symmetry, with trace 1), so SW2^2 = dmu^T (I / d) dmu = |dmu|^2 / d.
    d, n, p = 2, 5000, 500
    dmu = torch.tensor([1.6, 1.2], dtype=F64)  # |dmu|^2 = 4, SW2^2 = 2
    x, y = _normal(n, d, seed=5), _normal(n, d, seed=6) + dmu
    got = sliced_wasserstein(x, y, n_projections=p, seed=0) ** 2
    # Standard errors: directions (|dmu|^2 std(theta_1^2) / sqrt(p), std(theta_1^2) = sqrt(1/8) in 2-D)
    # and the sample means (|dmu + e|^2 / d with e ~ N(0, 2/n I): 2 |dmu| sqrt(2/n) / d).
    se = math.sqrt((4 * math.sqrt(1 / 8)) ** 2 / p + (2 * 2 * math.sqrt(2 / n) / d) ** 2)
    assert abs(got - 2.0) < 5 * se, (got, se)


def test_sliced_w2_floor_shrinks_with_samples_and_is_seeded():
    small = sliced_wasserstein(_normal(200, 4, seed=1), _normal(200, 4, seed=2))
    large = sliced_wasserstein(_normal(5000, 4, seed=1), _normal(5000, 4, seed=2))
    shifted = sliced_wasserstein(_normal(5000, 4, seed=1), _normal(5000, 4, mean=1.0, seed=2))
    assert 0 < large < small < shifted  # biased upward, by less as N grows
    x, y = _normal(100, 4, seed=1), _normal(100, 4, seed=2)
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x, y, seed=3)


# -- MMD -------------------------------------------------------------------------------------------------


def _mmd_direct(x, y, hs):
    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )


def test_mmd_matches_direct_u_statistic_across_chunks():
    x, y = (
        _normal(1500, 3, seed=1),
        _normal(1100, 3, mean=0.3, seed=2),
    )  # several 512-row tiles, ragged edges
    hs = [0.5, 1.0, 3.0]
    assert mmd(x, y, bandwidths=hs) == pytest.approx(_mmd_direct(x, y, hs), rel=1e-9, abs=1e-12)


def test_mmd_default_bandwidths_are_multiples_of_the_median_distance():
    # Default: h = m * (4, 2, 1, 1/2, 1/4), m the median pairwise distance of the pooled samples
    # (all of them below 1000 rows); computed there by repeated squaring, here by direct exps.
    x, y = _normal(300, 3, seed=1), _normal(250, 3, mean=0.4, seed=2)
    med = float(torch.pdist(torch.cat([x, y])).median())
    hs = [med * f for f in (4.0, 2.0, 1.0, 0.5, 0.25)]
    assert mmd(x, y) == pytest.approx(_mmd_direct(x, y, hs), rel=1e-10)


def test_mmd_closed_form_for_shifted_gaussians():
    # For Z ~ N(mu, v I_d): E exp(-|Z|^2 / (2 h^2)) = (h^2 / (h^2 + v))^(d/2) exp(-|mu|^2 / (2 (h^2 + v))).
    # X - X' ~ N(0, 2 I), X - Y ~ N(-dmu, 2 I), so
    # MMD^2 = sum_h 2 (h^2 / (h^2 + 2))^(d/2) (1 - exp(-|dmu|^2 / (2 (h^2 + 2)))).
    d, hs, a = 2, [0.5, 1.0, 2.0], 1.0
    exact = sum(
        2 * (h * h / (h * h + 2)) ** (d / 2) * (1 - math.exp(-(a * a) / (2 * (h * h + 2))))
        for h in hs
    )
    ests = [
        mmd(_normal(800, d, seed=s), _normal(800, d, seed=100 + s) + _shift(d, a), hs)
        for s in range(8)
    ]
    mean, se = np.mean(ests), np.std(ests, ddof=1) / math.sqrt(len(ests))
    assert abs(mean - exact) < 5 * se + 1e-3, (mean, exact, se)
    assert min(ests) > 0


def test_mmd_and_energy_unbiased_floor_for_equal_distributions():
    # Both are U-statistics with expectation 0 when the distributions are equal: the mean over
    # independent repeats must be within 5 standard errors of 0 (individual values may be negative).
    mmds, energies = [], []
    for s in range(30):
        x, y = _normal(150, 3, seed=s), _normal(150, 3, seed=1000 + s)
        mmds.append(mmd(x, y, bandwidths=[1.0, 2.0]))
        energies.append(energy_distance(x, y))
    for vals in (mmds, energies):
        mean, se = np.mean(vals), np.std(vals, ddof=1) / math.sqrt(len(vals))
        assert abs(mean) < 5 * se
    # A shift of 0.5 standard deviations is far above that floor with the default bandwidths.
    x, y = _normal(400, 3, seed=1), _normal(400, 3, mean=0.5, seed=2)
    assert mmd(x, y) > 10 * np.std(mmds)
    assert energy_distance(x, y) > 10 * np.std(energies)


# -- energy distance -------------------------------------------------------------------------------------


def test_energy_distance_matches_direct_computation():
    x, y = _normal(1300, 3, seed=1), _normal(700, 3, std=1.3, seed=2)
    n, m = len(x), len(y)
    dxx, dyy = torch.cdist(x, x), torch.cdist(y, y)
    direct = 2 * torch.cdist(x, y).mean() - dxx.sum() / (n * (n - 1)) - dyy.sum() / (m * (m - 1))
    assert energy_distance(x, y) == pytest.approx(float(direct), rel=1e-9)


def test_energy_distance_closed_form_1d():
    # X ~ N(0, 1), Y ~ N(a, 1): X - Y ~ N(-a, 2), E|N(m, v)| = sqrt(2 v / pi) exp(-m^2 / (2 v))
    # + m (1 - 2 Phi(-m / sqrt(v))); E|X - X'| = 2 / sqrt(pi).
    a, v = 1.0, 2.0
    e_xy = math.sqrt(2 * v / math.pi) * math.exp(-a * a / (2 * v)) + a * math.erf(
        a / math.sqrt(2 * v)
    )
    exact = 2 * e_xy - 2 * (2 / math.sqrt(math.pi))
    ests = [
        energy_distance(_normal(1000, 1, seed=s), _normal(1000, 1, mean=a, seed=50 + s))
        for s in range(6)
    ]
    mean, se = np.mean(ests), np.std(ests, ddof=1) / math.sqrt(len(ests))
    assert abs(mean - exact) < 5 * se + 1e-3, (mean, exact, se)


# -- Fréchet ---------------------------------------------------------------------------------------------


def _random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


def test_frechet_from_stats_matches_scipy_sqrtm():
    d = 6
    mu1, mu2 = _normal(1, d, seed=1)[0], _normal(1, d, seed=2)[0]
    c1, c2 = _random_spd(d, 3), _random_spd(d, 4)  # do not commute
    root = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy())
    peer = float((mu1 - mu2).square().sum()) + float(
        np.trace(c1.numpy() + c2.numpy() - 2 * root.real)
    )
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(peer, rel=1e-8)
    assert frechet_distance_from_stats(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_closed_form_commuting_and_singular():
    # Diagonal covariances commute: W2^2 = |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2, zeros allowed.
    a = torch.tensor([1.0, 4.0, 0.0, 2.0], dtype=F64)
    b = torch.tensor([9.0, 1.0, 1.0, 0.0], dtype=F64)
    mu1, mu2 = torch.zeros(4, dtype=F64), torch.tensor([1.0, -2.0, 0.0, 0.5], dtype=F64)
    expected = 1 + 4 + 0.25 + float((a.sqrt() - b.sqrt()).square().sum())
    got = frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_from_samples_of_gaussians():
    d, n = 3, 2000
    c1, c2 = _random_spd(d, 5), _random_spd(d, 6)
    mu2 = torch.tensor([1.0, 0.0, -0.5], dtype=F64)
    exact = frechet_distance_from_stats(torch.zeros(d, dtype=F64), c1, mu2, c2)
    l1, l2 = torch.linalg.cholesky(c1), torch.linalg.cholesky(c2)
    ests = []
    for s in range(12):
        x = _normal(n, d, seed=s) @ l1.T
        y = _normal(n, d, seed=200 + s) @ l2.T + mu2
        ests.append(frechet_distance(x, y))
        if s == 0:  # the plug-in statistics, computed by numpy
            xs, ys = x.numpy(), y.numpy()
            peer = frechet_distance_from_stats(
                torch.from_numpy(xs.mean(0)),
                torch.from_numpy(np.cov(xs.T)),
                torch.from_numpy(ys.mean(0)),
                torch.from_numpy(np.cov(ys.T)),
            )
            assert ests[0] == pytest.approx(peer, rel=1e-10)
    mean, se = np.mean(ests), np.std(ests, ddof=1) / math.sqrt(len(ests))
    # The plug-in estimate is biased upward by O(d / n); allow that on top of 5 standard errors.
    assert abs(mean - exact) < 5 * se + 5 * d / n, (mean, exact, se)
    x = _normal(4000, d, seed=7)
    assert frechet_distance(x[:2000], x[2000:]) < 5 * d / 2000 + 0.01


# -- log-likelihood under an exact target ------------------------------------------------------------


def test_mean_log_likelihood_of_a_gaussian():
    # E log N(x; 0, I_d) under its own samples = -d/2 (log 2 pi + 1); the std of log p is sqrt(d/2).
    d, n = 4, 20_000
    tg = gaussian(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    got = mean_log_likelihood(tg.sample(n, generator=torch.Generator().manual_seed(0)), tg)
    assert abs(got + d / 2 * (math.log(2 * math.pi) + 1)) < 5 * math.sqrt(d / 2 / n)


def test_negative_log_likelihood_gap_for_a_wider_gaussian():
    # Samples from N(0, s^2 I) under p = N(0, I): E_q[log p] = -d/2 log 2 pi - d s^2 / 2, so the
    # gap E_p[log p] - E_q[log p] = d (s^2 - 1) / 2. Standard errors from var(|x|^2 / 2) = s^4 d / 2.
    d, n, s = 2, 20_000, 1.5
    tg = gaussian(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64))
    q = _normal(n, d, std=s, seed=9)
    se = math.sqrt(s**4 * d / 2 / n + d / 2 / n)
    assert abs(negative_log_likelihood_gap(q, tg, seed=1) - d * (s * s - 1) / 2) < 5 * se
    own = tg.sample(n, generator=torch.Generator().manual_seed(2))
    assert abs(negative_log_likelihood_gap(own, tg, seed=1)) < 5 * math.sqrt(2 * d / 2 / n)


def test_metrics_on_a_builtin_target():
    tg = target("ring8")
    good = tg.sample(1000, generator=torch.Generator().manual_seed(0))
    ref = tg.sample(1000, generator=torch.Generator().manual_seed(1))
    blurred = ref + 0.3 * _normal(1000, 2, seed=3)
    for fn in (sliced_wasserstein, mmd, energy_distance, frechet_distance):
        assert fn(good, ref) < fn(blurred, ref), fn.__name__
    assert mean_log_likelihood(good, tg) > mean_log_likelihood(blurred, tg)


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [sliced_wasserstein, mmd, energy_distance, frechet_distance])
def test_bad_input_messages(fn):
    x = _normal(10, 3)
    names = ("feats_x", "feats_y") if fn is frechet_distance else ("x", "y")
    with pytest.raises(
        ValueError,
        match=f"{names[0]} and {names[1]} must have the same number of values per row; got 3",
    ):
        fn(x, _normal(10, 2))
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=f"{names[1]} contains NaN or inf in 1 of 10 rows"):
        fn(x, bad)
    with pytest.raises(ValueError, match=rf"{names[0]} must have shape \[N, ...\]"):
        fn(torch.zeros(3), x)
    with pytest.raises(TypeError, match=f"{names[0]} must be a torch.Tensor"):
        fn(x.numpy(), x)
    if fn is not sliced_wasserstein:
        with pytest.raises(ValueError, match=f"{names[0]} needs at least 2 samples"):
            fn(x[:1], x)


def test_bad_options_and_stats():
    x = _normal(10, 3)
    with pytest.raises(ValueError, match="n_projections must be a positive int"):
        sliced_wasserstein(x, x, n_projections=0)
    with pytest.raises(
        ValueError, match="bandwidths must be a non-empty sequence of finite values > 0"
    ):
        mmd(x, x, bandwidths=[1.0, -1.0])
    eye = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match=r"cov2 must have shape \[d, d\] = \[3, 3\]"):
        frechet_distance_from_stats(torch.zeros(3), eye, torch.zeros(3), torch.eye(2))
    with pytest.raises(ValueError, match=r"mu1 and mu2 must both have shape \[d\]"):
        frechet_distance_from_stats(torch.zeros(3), eye, torch.zeros(2), eye)
    with pytest.raises(ValueError, match="cov1 must be symmetric"):
        frechet_distance_from_stats(
            torch.zeros(3), torch.triu(torch.ones(3, 3)), torch.zeros(3), eye
        )
    with pytest.raises(ValueError, match="mu2 contains NaN"):
        frechet_distance_from_stats(torch.zeros(3), eye, torch.full((3,), float("nan")), eye)
    tg = target("ring8")
    with pytest.raises(ValueError, match="samples contains NaN"):
        mean_log_likelihood(torch.full((4, 2), float("nan")), tg)
    with pytest.raises(ValueError, match="n_reference must be >= 1"):
        negative_log_likelihood_gap(x[:, :2], tg, n_reference=0)
