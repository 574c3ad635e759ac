"""GaussianMixture.posterior against Bayes' rule and brute-force importance sampling."""

from __future__ import annotations

import math

import pytest
import torch

from scorekit.analytic import LOG_2PI, GaussianMixture, target


def _log_lik(x, A, y, sigma_y):
    r = y[None] - x @ A.T
    return -0.5 * (r.square().sum(1) / sigma_y**2 + A.shape[0] * (LOG_2PI + 2 * math.log(sigma_y)))


def _problems():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    full = GaussianMixture(
        torch.randn(3, 2, generator=g, dtype=torch.float64),
        a @ a.mT + 0.1 * torch.eye(2, dtype=torch.float64),
        torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
    )
    return {
        "ring8_observe_x": (target("ring8"), torch.tensor([[1.0, 0.0]]), torch.tensor([0.7]), 0.2),
        "full_projection": (full, torch.tensor([[1.0, -0.5]]), torch.tensor([0.3]), 0.5),
        "full_two_rows": (
            full,
            torch.tensor([[1.0, 0.2], [0.3, 1.0]]),
            torch.tensor([0.1, -1.0]),
            0.4,
        ),
    }


@pytest.mark.parametrize("name", list(_problems()))
def test_posterior_is_bayes_rule(name):
    """log p(x | y) - log p(x) - log p(y | x) is the same constant (-log p(y)) at every x."""
    gm, A, y, sy = _problems()[name]
    A, y = A.double(), y.double()
    post = gm.posterior(A, y, sy)
    x = 2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = post.log_prob(x) - gm.log_prob(x) - _log_lik(x, A, y, sy)
    assert float(c.max() - c.min()) < 1e-9
    # and the constant is -log p(y), computed by quadrature-free Monte Carlo over the prior
    xs = gm.sample(400_000, generator=torch.Generator().manual_seed(1))
    log_py = torch.logsumexp(_log_lik(xs, A, y, sy), 0) - math.log(xs.shape[0])
    assert abs(float(c.mean() + log_py)) < 0.02
    assert abs(float(post.weights.sum()) - 1) < 1e-12


@pytest.mark.parametrize("name", list(_problems()))
def test_posterior_moments_match_importance_sampling(name):
    gm, A, y, sy = _problems()[name]
    A, y = A.double(), y.double()
    post = gm.posterior(A, y, sy)
    xs = gm.sample(400_000, generator=torch.Generator().manual_seed(2))
    w = torch.softmax(_log_lik(xs, A, y, sy), 0)
    mean = w @ xs
    cov = (w[:, None] * (xs - mean)).T @ (xs - mean)
    ess = 1 / float(w.square().sum())
    tol = 6 / math.sqrt(ess)  # a few Monte Carlo standard errors of a unit-scale quantity
    assert ess > 2000
    assert torch.allclose(post.mean, mean, atol=tol)
    assert torch.allclose(post.covariance, cov, atol=tol)


def test_huge_sigma_y_returns_the_prior():
    gm = target("ring8")
    post = gm.posterior(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5]), 1e8)
    assert torch.allclose(post.weights, gm.weights, atol=1e-12)
    assert torch.allclose(post.means, gm.means, atol=1e-12)
    assert torch.allclose(post.covs, torch.diag_embed(gm.covs), atol=1e-12)


def test_tiny_sigma_y_with_identity_concentrates_on_y():
    gm = target("ring8")
    y = torch.tensor([0.3, -1.1], dtype=torch.float64)
    post = gm.posterior(torch.eye(2, dtype=torch.float64), y, 1e-4)
    assert torch.allclose(post.mean, y, atol=1e-6)
    assert float(post.covariance.diagonal().max()) < 1.1e-8


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.ones(1, 3), torch.ones(1), 0.1), "A must have shape"),
        ((torch.ones(1, 2), torch.ones(2), 0.1), "y must have shape"),
        ((torch.ones(1, 2), torch.ones(1), 0.0), "sigma_y must be"),
        ((torch.ones(1, 2), torch.ones(1), -1.0), "sigma_y must be"),
        ((torch.ones(1, 2), torch.ones(1), float("nan")), "sigma_y must be"),
        ((torch.ones(1, 2), torch.tensor([float("inf")]), 0.1), "must be finite"),
    ],
)
def test_posterior_bad_input(args, match):
    with pytest.raises(ValueError, match=match) as err:
        target("ring8").posterior(*args)
    assert "\n" not in str(err.value)
