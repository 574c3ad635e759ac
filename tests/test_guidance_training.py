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
    x0, y, sigma, noise = _joint(20_000, g)

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


def _read_target(loss_fn, args, kw, w):
    """The per-row target ``[B, 2]`` of a loss ``w |D - target|^2 / d`` from constant denoisers."""

    def loss_at(c):
        const = lambda xx, ss, class_labels: c.expand_as(xx)  # noqa: E731
        return loss_fn(const, *args, **kw) / w

    eye = torch.eye(2, dtype=torch.float64)
    l0 = loss_at(torch.zeros(2, dtype=torch.float64))
    return torch.stack([(2 * (l0 - loss_at(eye[j])) + 1) / 2 for j in range(2)], 1)


def test_guidance_free_target_averages_to_the_exact_cfg_denoiser_at_the_exact_model():
    # If the network already is the fixed point (D(x, y) = the exact CFG denoiser of scale s,
    # D(x, -1) = the exact unconditional one), the training target x0 + w (D(x, y) - D(x, -1)),
    # w = 1 - 1/s, averaged over the exact posterior p(x0 | x, y), is that same CFG denoiser: the
    # expected loss gradient vanishes there. x0 is drawn from the class's exact posterior mixture.
    from scorekit.guidance import cfg
    from scorekit.train.loss import guidance_free_loss

    t, y, s = class_target("ring6"), 2, 3.0
    exact_cfg = cfg(t.cond(y), t.uncond, s)

    def model(x, sigma, class_labels):  # the exact fixed point, label -1 the unconditional branch
        return torch.where(class_labels[:, None] >= 0, exact_cfg(x, sigma), t.uncond(x, sigma))

    g = torch.Generator().manual_seed(3)
    eye = torch.eye(2, dtype=torch.float64)
    for x, sigma in [(torch.tensor([0.4, 1.1]), 0.3), (torch.tensor([-1.0, 0.2]), 1.0),
                     (torch.tensor([2.0, -2.0]), 2.5)]:  # fmt: skip
        x0 = t.cond(y).posterior(eye, x.double(), sigma).sample(8000, g)
        n = x0.shape[0]
        sig = torch.full((n,), sigma, dtype=torch.float64)
        noise = (x.double()[None] - x0) / sigma  # every row lands on the same x
        labels = torch.full((n,), y)
        # The loss's target t, read back from losses against constant denoisers 0 and e_j:
        # mean_d (e_j - t)^2 - mean_d t^2 = (1 - 2 t_j) / d, so t_j = (d (l_0 - l_j) + 1) / 2.
        kw = {"class_labels": labels, "scale": s, "reference": model, "sigma_data": 0.5}
        w = (sig**2 + 0.25) / (sig * 0.5) ** 2

        target = _read_target(guidance_free_loss, (x0, sig, noise), kw, w)
        want = exact_cfg(x.double()[None], sig[:1])[0]
        torch.testing.assert_close(target.mean(0), want, rtol=0, atol=0.02)
        # The control: the same average with w = s - 1 (the eps-form scale read as a CFG scale) is
        # far from it, so the test can fail.
        wrong = x0 + (s - 1) * (model(x0 * 0 + x, sig, labels) - t.uncond(x0 * 0 + x, sig))
        assert (wrong.mean(0) - want).abs().max() > 0.1
