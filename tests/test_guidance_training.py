"""Guidance that is trained: the DLSM loss of a noisy classifier and the guidance-free training target,
checked on exact class-conditional mixtures (their minimiser / expectation is the exact answer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scorekit.guidance import class_target
from scorekit.train.classifier import dlsm_loss

PAIR = class_target("pair1d")  # N(-0.6, 0.5^2) class 0, N(0.6, 0.5^2) class 1, equal priors


def _joint(n, g):
    """``n`` exact draws of ``(x0, y)`` (half per class: the priors are equal), sigma and noise."""
    y = torch.arange(n) % 2
    x0 = torch.cat([PAIR.cond(0).sample(n // 2, g), PAIR.cond(1).sample(n // 2, g)])
    y = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.ones(n // 2, dtype=torch.long)])
    sigma = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-3, 1.6, generator=g))
    return x0, y, sigma, torch.randn(n, 1, generator=g, dtype=torch.float64)


def _vertex(loss_of, h=0.4):
    """The minimiser of the parabola through ``loss_of(-h), loss_of(0), loss_of(h)``."""
    lm, l0, lp = loss_of(-h), loss_of(0.0), loss_of(h)
    assert lm - 2 * l0 + lp > 0
    return h * (lm - lp) / (2 * (lm - 2 * l0 + lp))


def test_dlsm_is_minimised_by_the_exact_noisy_classifier():
    g = torch.Generator().manual_seed(0)
    x0, y, sigma, noise = _joint(40_000, g)

    def family(
        a,
    ):  # the exact classifier at temperature 1 / (1 + a), tilted by a sin(2x) on class 0
        def lp(x, s):
            tilt = a * torch.sin(2 * x) / (1 + s[:, None] ** 2)
            logits = (1 + a) * PAIR.log_classifier(x, s) + torch.cat([tilt, 0 * x], 1)
            return F.log_softmax(logits, dim=1)

        return lp

    def loss_with(uncond, labels=y):
        return lambda a: float(
            dlsm_loss(family(a), uncond, x0, labels, sigma, noise).mean().detach()
        )

    # With the exact unconditional denoiser the exact classifier (a = 0) is the minimiser ...
    assert abs(_vertex(loss_with(PAIR.uncond), h=0.2)) < 0.02
    # ... and the test can fail: with the labels swapped the minimiser moves far (towards a = -2,
    # the classifier with its sign flipped). An error in D_u that does not depend on y cannot move it
    # (sum_y p(y|x) grad log p(y|x) = 0), so swapped labels are the control.
    assert _vertex(loss_with(PAIR.uncond, 1 - y), h=0.2) < -0.3


def test_dlsm_is_the_denoising_loss_of_the_implied_conditional_denoiser():
    # At the exact classifier, D_u + sigma^2 grad log p(y|x) is the exact conditional denoiser of
    # class y (Tweedie), so the DLSM loss equals the EDM-weighted denoising loss of D_c, written here.
    g = torch.Generator().manual_seed(1)
    x0, y, sigma, noise = _joint(64, g)
    got = dlsm_loss(lambda x, s: PAIR.log_classifier(x, s), PAIR.uncond, x0, y, sigma, noise,
                    sigma_data=0.5)  # fmt: skip
    x = x0 + sigma[:, None] * noise
    d_c = torch.stack(
        [PAIR.cond(int(k))(x[i : i + 1], sigma[i : i + 1])[0] for i, k in enumerate(y)]
    )
    w = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(got, w * (d_c - x0).square().squeeze(1), rtol=1e-8, atol=1e-10)
