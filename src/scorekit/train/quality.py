"""Quality of generated digits: a small classifier, FD-digits and classifier confidence.

FD-digits is the Fréchet distance (as in FID, Heusel et al. 2017) between Gaussian fits of the
penultimate-layer features of a classifier trained on the real training digits:

    FD(a, b) = |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)

It is read against its floor, FD(training digits, held-out digits) at the same sample sizes: a
model that reproduced the data distribution would score about the floor (the plug-in estimate is
biased upward at finite sizes, equally for both). Confidence is the classifier's mean max-probability
on generated digits; noise-like or ambiguous samples get low confidence.

References:
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", NeurIPS 2017 (FID). Salimans et al., "Improved Techniques for Training GANs",
    NeurIPS 2016 (classifier-based scores of generated samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scorekit.metrics import frechet_distance

__all__ = ["DigitsClassifier", "fit_classifier", "image_quality"]


class DigitsClassifier(nn.Module):
    """MLP on flattened images: ``d -> 256 -> 64 (features) -> classes``, SiLU activations."""

    def __init__(self, d: int = 64, classes: int = 10, *, width: int = 256, feat: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(d, width), nn.SiLU(), nn.Linear(width, feat), nn.SiLU()
        )
        self.head = nn.Linear(feat, classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``[N, feat]`` of images ``[N, C, H, W]`` (model units)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def probs(self, x: Tensor) -> Tensor:
        return F.softmax(self(x), dim=1)


def fit_classifier(
    x: Tensor, labels: Tensor, *, epochs: int = 100, seed: int = 0, noise: float = 0.1
) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on real images ``x [N, C, H, W]`` with ``labels [N]``.

    Full-batch-ish AdamW (batches of 256) with a small Gaussian input jitter (``noise``, in model
    units) so the features are smooth around the data. Deterministic given ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clf = DigitsClassifier(x[0].numel(), int(labels.max()) + 1)
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-3)
    n = len(x)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 256):
            idx = perm[i : i + 256]
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g)
            loss = F.cross_entropy(clf(xb), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf.eval().requires_grad_(False)


@dataclass
class QualityReport:
    fd: float  # FD-digits(generated, held-out)
    fd_floor: float  # FD-digits(training, held-out)
    confidence: float  # mean max-probability on generated digits
    confidence_real: float  # the same on held-out real digits
    accuracy_heldout: float  # the classifier's accuracy on held-out real digits
    class_histogram: list[int]  # how many generated digits fall in each predicted class

    @property
    def fd_ratio(self) -> float:
        return self.fd / self.fd_floor

    def to_dict(self) -> dict:
        return {**self.__dict__, "fd_ratio": self.fd_ratio}


def image_quality(
    generated: Tensor,
    train_x: Tensor,
    test_x: Tensor,
    test_labels: Tensor,
    clf: DigitsClassifier,
) -> QualityReport:
    """FD-digits of ``generated`` against held-out ``test_x``, its floor from ``train_x``, confidence.

    For the floor and the score to be comparable, pass as many generated images as training images.
    """
    with torch.no_grad():
        f_gen, f_train, f_test = (clf.features(t.float()) for t in (generated, train_x, test_x))
        p_gen, p_test = clf.probs(generated.float()), clf.probs(test_x.float())
    pred = p_gen.argmax(1)
    return QualityReport(
        fd=frechet_distance(f_gen, f_test),
        fd_floor=frechet_distance(f_train, f_test),
        confidence=float(p_gen.max(1).values.mean()),
        confidence_real=float(p_test.max(1).values.mean()),
        accuracy_heldout=float((p_test.argmax(1) == test_labels).float().mean()),
        class_histogram=torch.bincount(pred, minlength=p_gen.shape[1]).tolist(),
    )
