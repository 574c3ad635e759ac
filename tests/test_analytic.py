"""Exact targets: Tweedie's formula against autograd, a peer log-density, exact samples, numerics, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from scorekit.analytic import (
    TARGETS,
    Empirical,
    GaussianMixture,
    gaussian,
    gaussian_approximation,
    target,
)

SIGMAS = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3]


def _spd(k: int, d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    return a @ a.mT / d + 0.05 * torch.eye(d, dtype=torch.float64)


def _mixtures() -> dict[str, GaussianMixture]:
    g = torch.Generator().manual_seed(1)
    d, k = 3, 4
    means = 2 * torch.randn(k, d, generator=g, dtype=torch.float64)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return {
        "gaussian_full": gaussian(means[0], _spd(1, d, g)[0]),
        "gmm_diag": GaussianMixture(
            means, 0.05 + torch.rand(k, d, generator=g, dtype=torch.float64), w / w.sum()
        ),
        "gmm_full": GaussianMixture(means, _spd(k, d, g), w / w.sum()),
    }


MIXTURES = _mixtures()


def _peer(gm: GaussianMixture, sigma: float) -> MixtureSameFamily:
    """The noised mixture built by torch.distributions: sum_k w_k N(m_k, C_k + sigma^2 I)."""
    covs = gm.covs if gm.full else torch.diag_embed(gm.covs)
    covs = covs + sigma**2 * torch.eye(gm.dim, dtype=covs.dtype)
    return MixtureSameFamily(Categorical(probs=gm.weights), MultivariateNormal(gm.means, covs))


def _noised_points(gm, sigma: float, n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = gm.sample(n, generator=g)
    return x0 + sigma * torch.randn(x0.shape, generator=g, dtype=x0.dtype)


def _autograd_score(log_prob, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(log_prob(x).sum(), x)[0]


# -- Tweedie: score = grad log p_sigma, D = x + sigma^2 score -------------------------------------


@pytest.mark.parametrize("name", sorted(MIXTURES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_mixture_log_prob_matches_torch_distributions(name, sigma):
    gm = MIXTURES[name]
    x = _noised_points(gm, sigma)
    torch.testing.assert_close(
        gm.log_prob(x, sigma), _peer(gm, sigma).log_prob(x), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("name", sorted(MIXTURES))
@pytest.mark.parametrize("sigma", SIGMAS)
def test_tweedie_mixture_score_is_autograd_of_log_prob(name, sigma):
    gm = MIXTURES[name]
    x = _noised_points(gm, sigma)
    grad = _autograd_score(lambda z: gm.log_prob(z, sigma), x)
    score = gm.score(x, sigma)
    scale = grad.abs().max()
    torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-10 * float(scale))
    # Tweedie: E[x0 | x] = x + sigma^2 grad log p_sigma(x); the cancellation costs |x| * eps.
    denoised = gm.denoise(x, sigma)
    expected = x + sigma**2 * grad
    atol = 1e-12 * float(x.abs().max() + 1) + 1e-8 * sigma**2 * float(scale)
    torch.testing.assert_close(denoised, expected, rtol=1e-8, atol=atol)


@pytest.mark.parametrize("sigma", [1e-3, 0.5, 3.0, 1e3])
def test_gaussian_denoiser_closed_form(sigma):
    # D(x) = m + C (C + sigma^2 I)^{-1} (x - m): the posterior mean of a Gaussian prior.
    gm = MIXTURES["gaussian_full"]
    m, c = gm.means[0], gm.covs[0]
    x = _noised_points(gm, sigma)
    rhs = (x - m).T
    expected = m + (c @ torch.linalg.solve(c + sigma**2 * torch.eye(gm.dim, dtype=c.dtype), rhs)).T
    torch.testing.assert_close(gm.denoise(x, sigma), expected, rtol=1e-9, atol=1e-9)


def test_per_row_sigma_equals_scalar_sigma():
    gm = MIXTURES["gmm_full"]
    x = _noised_points(gm, 1.0, n=4)
    sig = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=torch.float64)
    batched = gm.denoise(x, sig)
    for i in range(4):
        torch.testing.assert_close(batched[i : i + 1], gm.denoise(x[i : i + 1], float(sig[i])))


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0, 10.0, 1e3])
def test_empirical_tweedie_and_log_prob(sigma):
    g = torch.Generator().manual_seed(3)
    data = torch.randn(40, 2, 3, generator=g, dtype=torch.float64)
    emp = Empirical(data, chunk=7)  # chunk smaller than the batch: exercises the chunking
    x = data[torch.randint(0, 40, (20,), generator=g)]
    x = x + sigma * torch.randn(x.shape, generator=g, dtype=x.dtype)
    # Peer: log (1/N) sum_i N(x; y_i, sigma^2 I) from torch.distributions.
    flat = data.reshape(40, -1)
    comps = MultivariateNormal(flat, sigma**2 * torch.eye(6, dtype=torch.float64).expand(40, 6, 6))
    peer = MixtureSameFamily(Categorical(logits=torch.zeros(40, dtype=torch.float64)), comps)
    torch.testing.assert_close(
        emp.log_prob(x, sigma), peer.log_prob(x.reshape(20, -1)), rtol=1e-10, atol=1e-9
    )
    grad = _autograd_score(lambda z: emp.log_prob(z, sigma), x)
    torch.testing.assert_close(
        emp.score(x, sigma), grad, rtol=1e-7, atol=1e-9 * float(grad.abs().max())
    )
    torch.testing.assert_close(
        emp.denoise(x, sigma),
        x + sigma**2 * grad,
        rtol=1e-7,
        atol=1e-10 * float(x.abs().max() + 1) + 1e-7 * sigma**2 * float(grad.abs().max()),
    )
    assert emp.denoise(x, sigma).shape == x.shape


def test_empirical_at_sigma_zero_returns_the_nearest_point():
    g = torch.Generator().manual_seed(4)
    data = torch.randn(30, 4, generator=g, dtype=torch.float64)
    emp = Empirical(data)
    x = data[:10] + 0.01 * torch.randn(10, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(emp.denoise(x, 0.0), data[:10])
    with pytest.raises(ValueError, match="sigma must be > 0"):
        emp.log_prob(x, 0.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        emp.score(x, 0.0)


def test_gaussian_approximation_matches_moments():
    g = torch.Generator().manual_seed(5)
    data = torch.randn(500, 2, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0])
    gm = gaussian_approximation(data, jitter=0.0)
    flat = data.reshape(500, 4)
    torch.testing.assert_close(gm.mean, flat.mean(0))
    centred = flat - flat.mean(0)
    torch.testing.assert_close(gm.covariance, centred.T @ centred / 499)


# -- built-in targets: exact samples and normalised densities ---------------------------------------


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_samples_match_mean_and_covariance(name):
    gm = target(name)
    n = 20_000 if gm.dim > 8 else 100_000
    x = gm.sample(n, generator=torch.Generator().manual_seed(11))
    assert x.shape == (n, gm.dim) and x.dtype == torch.float64
    # Mean: standard error sqrt(var / n) per coordinate, from the exact covariance.
    mean_se = (gm.covariance.diagonal() / n).sqrt()
    z_mean = (x.mean(0) - gm.mean).abs() / mean_se
    assert z_mean.max() < 5, f"sample mean off by {z_mean.max():.2f} standard errors"
    # Covariance entries: the standard error of the mean of c_i c_j (c = x - mean) is
    # sqrt((E[c_i^2 c_j^2] - E[c_i c_j]^2) / n), with both moments estimated from the draws.
    c = x - gm.mean
    second = c.T @ c / n
    fourth = c.square().T @ c.square() / n
    cov_se = ((fourth - second.square()) / n).sqrt()
    z_cov = (second - gm.covariance).abs() / cov_se
    assert z_cov.max() < 5, f"sample covariance off by {z_cov.max():.2f} standard errors"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_targets_are_centred_unit_scale(name):
    # The documented normalisation: mean 0 and average per-dimension variance 1.
    gm = target(name)
    torch.testing.assert_close(
        gm.mean, torch.zeros(gm.dim, dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert float(gm.covariance.diagonal().mean()) == pytest.approx(1.0, rel=1e-12)


def test_target_seed_and_dtype():
    a, b = target("gmm64", seed=0), target("gmm64", seed=1)
    assert not torch.equal(a.means, b.means)
    torch.testing.assert_close(target("gmm64", seed=0).means, a.means, rtol=0, atol=0)
    assert target("ring8", dtype=torch.float32).means.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(n for n in TARGETS if target(n).dim == 2))
@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_2d_target_density_integrates_to_one(name, sigma):
    gm = target(name)
    # A grid covering every component out to 9 of its widest standard deviations; a Riemann sum of a
    # smooth, fast-decaying density is accurate to about machine precision once the spacing is below the
    # narrowest standard deviation (here half of it).
    sd_min = math.sqrt(float(gm.evals.min()) + sigma**2)
    sd_max = math.sqrt(float(gm.evals.max()) + sigma**2)
    lo = float(gm.means.min()) - 9 * sd_max
    hi = float(gm.means.max()) + 9 * sd_max
    h = sd_min / 2
    axis = torch.arange(lo, hi + h, h, dtype=torch.float64)
    total = 0.0
    for row in axis.split(64):
        pts = torch.cartesian_prod(row, axis)
        total += float(gm.log_prob(pts, sigma).exp().sum())
    assert total * h * h == pytest.approx(1.0, abs=1e-9)


# -- numerics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("sigma", [0.0, 1e3])
def test_no_nan_at_extreme_sigma(dtype, name, sigma):
    gm = target(name, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    near = gm.sample(8, generator=g)
    far = 1e3 * torch.randn(8, gm.dim, generator=g, dtype=dtype)  # far from every component
    for x in (near, far):
        for out in (gm.denoise(x, sigma), gm.score(x, sigma), gm.log_prob(x, sigma)):
            assert out.dtype == dtype
            assert torch.isfinite(out).all(), f"non-finite output at sigma={sigma} ({dtype})"
    if sigma == 0:
        # No noise: the posterior mean of a density with full support is x itself.
        torch.testing.assert_close(gm.denoise(near, 0.0), near, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empirical_no_nan_far_away(dtype):
    data = torch.randn(50, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    emp = Empirical(data)
    far = torch.full((4, 3), 1e3, dtype=dtype)
    for sigma in (0.0, 1e-2, 1.0, 1e3):
        assert torch.isfinite(emp.denoise(far, sigma)).all()
        if sigma > 0:
            assert torch.isfinite(emp.score(far, sigma)).all()
            assert torch.isfinite(emp.log_prob(far, sigma)).all()


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_messages():
    gm = MIXTURES["gmm_full"]
    x = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \[B\] = \[4\]"):
        gm.denoise(x, torch.ones(3))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        gm.score(x, -0.5)
    with pytest.raises(ValueError, match=r"x must have shape \[B, ...\] with 3 values per row"):
        gm.log_prob(torch.zeros(4, 2), 0.0)
    means = torch.zeros(2, 2, dtype=torch.float64)
    not_pd = torch.tensor([[[1.0, 2.0], [2.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"covs must be positive definite; components \[0\]"):
        GaussianMixture(means, not_pd)
    with pytest.raises(ValueError, match="covs must be symmetric"):
        GaussianMixture(means, torch.tensor([[[1.0, 0.5], [0.0, 1.0]]] * 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"covs: diagonal variances must be > 0; components \[1\]"):
        GaussianMixture(means, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match=r"covs must have shape \[K, d, d\]"):
        GaussianMixture(means, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"weights must be >= 0 and sum to 1; got sum 0\.9"):
        GaussianMixture(means, torch.ones(2, 2), torch.tensor([0.5, 0.4]))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        GaussianMixture(means, torch.ones(2, 2), torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match=r"weights must have shape \[K\] = \[2\]"):
        GaussianMixture(means, torch.ones(2, 2), torch.ones(3) / 3)
    with pytest.raises(ValueError, match=r"means must have shape \[K, d\]"):
        GaussianMixture(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"unknown target 'moons'; allowed: \['checker', 'gmm64'"):
        target("moons")
    with pytest.raises(ValueError, match="data must have shape"):
        Empirical(torch.zeros(5))
    with pytest.raises(ValueError, match="data contains NaN or inf"):
        Empirical(torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="means contains NaN or inf"):
        GaussianMixture(torch.full((2, 2), float("nan")), torch.ones(2, 2))
    with pytest.raises(ValueError, match="covs contains NaN or inf"):
        GaussianMixture(means, torch.full((2, 2), float("inf")))


# -- derivatives through the denoisers (guidance and posterior samplers differentiate them) -----------


def test_gaussian_denoiser_jacobian_is_the_posterior_gain():
    # For N(m, C): dD/dx = C (C + sigma^2 I)^{-1}.
    gm = MIXTURES["gaussian_full"]
    sigma = 0.7
    x = _noised_points(gm, sigma, n=1)
    jac = torch.autograd.functional.jacobian(lambda z: gm.denoise(z, sigma), x)[0, :, 0, :]
    c = gm.covs[0]
    gain = c @ torch.linalg.inv(c + sigma**2 * torch.eye(gm.dim, dtype=c.dtype))
    torch.testing.assert_close(jac, gain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.2, 1.0])
def test_empirical_denoiser_jacobian_is_posterior_covariance(sigma):
    # Second-order Tweedie: dD/dx = Cov[x0 | x] / sigma^2, with Cov from the posterior weights.
    g = torch.Generator().manual_seed(6)
    data = torch.randn(25, 3, generator=g, dtype=torch.float64)
    emp = Empirical(data)
    x = data[:1] + sigma * torch.randn(1, 3, generator=g, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda z: emp.denoise(z, sigma), x)[0, :, 0, :]
    w = torch.softmax(-(x - data).square().sum(1) / (2 * sigma**2), 0)
    mean = w @ data
    cov = (w[:, None] * (data - mean)).T @ (data - mean)
    torch.testing.assert_close(jac, cov / sigma**2, rtol=1e-8, atol=1e-12)
