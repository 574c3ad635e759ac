"""Exact ground truth for guidance: a class-conditional Gaussian mixture.

A mixture ``p(x) = sum_k w_k N(m_k, C_k)`` whose components carry class labels ``c(k)`` has, at every
noise level ``sigma`` (``p_sigma = p * N(0, sigma^2 I)``):

    p(y)                = sum_{k: c(k) = y} w_k
    p_sigma(x | y)      = sum_{k: c(k) = y} (w_k / p(y)) N(x; m_k, C_k + sigma^2 I)
    p(y | x, sigma)     = p(y) p_sigma(x | y) / p_sigma(x)      (the exact noisy classifier)

so the conditional denoiser (the mixture restricted to class ``y``, renormalised), the unconditional
denoiser and the classifier are all exact (``scorekit.analytic.GaussianMixture``).

The guided ("tilted") target of scale ``s`` at ``sigma = 0`` is

    p_s(x) ∝ p(x | y)^s p(x)^(1 - s) = p(x | y) (p(y | x) / p(y))^(s - 1) ∝ p(x | y) p(y | x)^(s - 1)

and since ``p(y | x) <= 1``, exact samples come by rejection: for ``s >= 1`` propose from ``p(x | y)``
and accept with probability ``p(y | x)^(s - 1)`` (the importance weight ``(p(y|x)/p(y))^(s-1)``
divided by its bound ``p(y)^(1 - s)``); for ``0 <= s < 1`` write ``p_s ∝ p(x) p(y | x)^s``, propose
from ``p(x)`` and accept with probability ``p(y | x)^s``. Every accepted draw is an exact sample.

References:
    Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022 (the tilted target ``p(x|y) p(y|x)^w``).
    Robert & Casella, "Monte Carlo Statistical Methods", 2004, Sec. 2.3 (accept-reject).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scorekit._util import check_int, check_number
from scorekit.analytic import GaussianMixture

__all__ = ["CLASS_TARGETS", "ClassMixture", "class_target"]


class ClassMixture:
    """A Gaussian mixture whose components carry class labels: exact conditional and unconditional
    denoisers, the exact noisy classifier and exact samples of the guided target.

    Args:
        mixture: the unconditional ``GaussianMixture`` ``p(x)`` with ``K`` components.
        labels: ``[K]`` integer class of each component, covering ``0 .. C-1`` (every class non-empty).

    ``cond(y)`` and ``uncond`` are exact denoisers ``D(x [B, ...], sigma [B]) -> [B, ...]``.
    """

    def __init__(self, mixture: GaussianMixture, labels: Tensor | list[int]):
        labels = torch.as_tensor(labels, device=mixture.means.device)
        if labels.shape != (mixture.k,) or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be an integer tensor of shape [K] = [{mixture.k}]; "
                f"got {tuple(labels.shape)} {labels.dtype}"
            )
        c = int(labels.max()) + 1
        missing = sorted(set(range(c)) - set(labels.tolist()))
        if int(labels.min()) < 0 or missing:
            raise ValueError(
                f"labels must cover 0..{c - 1} with no gaps; classes {missing} are empty"
            )
        self.mixture, self.labels, self.num_classes = mixture, labels, c
        self.dim = mixture.dim
        self.classes: list[GaussianMixture] = []
        prior = []
        for y in range(c):
            idx = (labels == y).nonzero().flatten()
            w = mixture.weights[idx]
            prior.append(w.sum())
            self.classes.append(GaussianMixture(mixture.means[idx], mixture.covs[idx], w / w.sum()))
        self.prior = torch.stack(prior)  # p(y), [C]

    def _label(self, y: int) -> int:
        return check_int("y (the class label)", y, least=0, most=self.num_classes - 1)

    @property
    def uncond(self) -> GaussianMixture:
        """The exact unconditional denoiser / mixture ``p(x)``."""
        return self.mixture

    def cond(self, y: int) -> GaussianMixture:
        """The exact conditional mixture ``p(x | y)`` (class ``y``'s components, renormalised)."""
        return self.classes[self._label(y)]

    def log_classifier(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``log p(y | x, sigma)`` for every class, ``[B, C]``, differentiable in ``x``."""
        log_px = self.mixture.log_prob(x, sigma)
        cols = [
            self.prior[y].log().to(x.dtype) + g.log_prob(x, sigma) - log_px
            for y, g in enumerate(self.classes)
        ]
        return torch.stack(cols, dim=1)

    def classifier(self, y: int):
        """The function ``(x [B, ...], sigma [B]) -> log p(y | x, sigma) [B]`` for one class."""
        y = self._label(y)

        def log_p(x: Tensor, sigma: Tensor | float) -> Tensor:
            log_px = self.mixture.log_prob(x, sigma)
            return self.prior[y].log().to(x.dtype) + self.classes[y].log_prob(x, sigma) - log_px

        return log_p

    def tilted_sample(
        self, y: int, scale: float, n: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` exact samples ``[n, d]`` of ``p_s(x) ∝ p(x | y)^scale p(x)^(1 - scale)`` at sigma = 0.

        Accept-reject as in the module docstring (exact for every ``scale >= 0``); the proposal is
        drawn in batches until ``n`` are accepted. Raises if the acceptance rate is below 1e-4.
        """
        y = self._label(y)
        s = check_number("scale", scale, low=0)
        n = check_int("n", n, least=1)
        proposal, power = (self.classes[y], s - 1) if s >= 1 else (self.mixture, s)
        kept, total, tries = [], 0, 0
        while total < n:
            batch = max(2 * (n - total), 256)
            x = proposal.sample(batch, generator=generator)
            tries += batch
            log_acc = power * self.classifier(y)(x, 0.0)
            u = torch.rand(batch, generator=generator, dtype=x.dtype, device=x.device)
            ok = u.log() < log_acc
            kept.append(x[ok])
            total += int(ok.sum())
            if tries > 1000 * n and total < 1e-4 * tries:
                raise ValueError(
                    f"tilted_sample: acceptance rate {total / tries:.2g} is too low for scale={s}"
                )
        return torch.cat(kept)[:n]


def _ring(g: torch.Generator) -> ClassMixture:
    # 6 overlapping Gaussians (std 0.5) on a circle of radius 1.5, classes k mod 3: the classifier
    # p(y | x) varies smoothly between neighbours, so guidance visibly reshapes each class.
    ang = torch.arange(6, dtype=torch.float64) * (2 * math.pi / 6)
    means = 1.5 * torch.stack([ang.cos(), ang.sin()], 1)
    gm = GaussianMixture(means, torch.full((6, 2), 0.25, dtype=torch.float64))
    return ClassMixture(gm, torch.arange(6) % 3)


def _gmm16(g: torch.Generator) -> ClassMixture:
    # 8 components in 16-D with random means (norm about 2.3) and diagonal variances in [0.3, 1],
    # unequal weights, classes k mod 4.
    k, d = 8, 16
    means = 0.6 * torch.randn(k, d, generator=g, dtype=torch.float64)
    var = 0.3 + 0.7 * torch.rand(k, d, generator=g, dtype=torch.float64)
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return ClassMixture(GaussianMixture(means, var, w / w.sum()), torch.arange(k) % 4)


def _pair(g: torch.Generator) -> ClassMixture:
    # Two overlapping 1-D Gaussians N(-0.6, 0.5^2) (class 0) and N(0.6, 0.5^2) (class 1): the
    # smallest target where CFG's bias against the tilted target is large and easy to measure.
    means = torch.tensor([[-0.6], [0.6]], dtype=torch.float64)
    gm = GaussianMixture(means, torch.full((2, 1), 0.25, dtype=torch.float64))
    return ClassMixture(gm, [0, 1])


#: Built-in class-conditional targets: name -> builder from a seeded generator.
CLASS_TARGETS = {"pair1d": _pair, "ring6": _ring, "gmm16": _gmm16}


def class_target(name: str, *, seed: int = 0) -> ClassMixture:
    """A built-in class-conditional target: ``pair1d`` (1-D, 2 classes), ``ring6`` (2-D, 3 classes),
    ``gmm16`` (16-D, 4 classes)."""
    if name not in CLASS_TARGETS:
        raise ValueError(f"unknown class target {name!r}; allowed: {sorted(CLASS_TARGETS)}")
    return CLASS_TARGETS[name](torch.Generator().manual_seed(seed))
