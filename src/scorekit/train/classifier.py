"""A noise-conditional classifier ``p(y | x, sigma)`` for classifier guidance, with the DLSM correction.

    from scorekit.train.classifier import train_classifier, load_classifier
    train_classifier("digits", "runs/digits-clf", steps=2000, holdout=0.2)
    log_p = load_classifier("runs/digits-clf", label=3)    # (x [B, ...], sigma [B]) -> [B]
    # scorekit.guidance.classifier_guidance(uncond, log_p, scale)

The network (``NoisyClassifier``) is a small residual MLP on the flattened input scaled by
``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``, with a Fourier embedding of ``log sigma`` added to every
block; it returns logits ``[B, C]``. It is trained on ``x = x0 + sigma n`` with ``log sigma`` uniform
on ``[sigma_lo, sigma_hi]`` by cross-entropy (Dhariwal & Nichol 2021), optionally plus the DLSM loss.

DLSM (Chao et al. 2022): a classifier trained by cross-entropy alone has a poor *gradient*
``grad_x log p(y | x, sigma)``, which is all guidance uses. With the unconditional score
``s = (D_u - x) / sigma^2`` of a trained denoiser, the conditional score is ``s + grad log p(y|x)``
and denoising score matching of it is

    L_DLSM = E || grad_x log p(y | x, sigma) + (D_u(x) - x0) / sigma^2 ||^2 lambda(sigma)
           = E w(sigma) || (D_u(x) + sigma^2 grad_x log p(y | x, sigma)) - x0 ||^2

(``lambda = sigma^4 w``, ``w`` the EDM weighting): the denoising loss of the conditional denoiser the
classifier implies, ``D_c = D_u + sigma^2 grad log p(y|x)`` (``classifier_guidance`` at scale 1). For
a fixed exact ``D_u`` its minimiser is the exact noisy classifier's gradient. The paper trains
``L_CE + lambda_DLSM L_DLSM`` (its "DLSM'" objective); ``dlsm_weight`` is that lambda.

Files (written atomically; loading runs no code): ``classifier.safetensors`` (weights) and
``classifier.json`` (network config, data name, shape, normalisation, noise range, measured
held-out accuracy per noise level).

References:
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021, Sec. 4.
    Chao et al., "Denoising Likelihood Score Matching for Conditional Score-based Data Generation",
    ICLR 2022, eqs. 8-10.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from scorekit import data as sdata
from scorekit._util import append_dims, atomic_write, atomic_write_json, check_int, check_number
from scorekit.train.loss import get_weighting

__all__ = ["NoisyClassifier", "classifier_loss", "dlsm_loss", "load_classifier", "train_classifier"]

_LIMITS = {"dim": 1 << 16, "num_classes": 1000, "hidden": 4096, "depth": 16}


class NoisyClassifier(nn.Module):
    """Logits ``[B, C]`` of ``p(y | x, sigma)`` for ``x [B, ...]`` (flattened to ``dim``), ``sigma [B]``."""

    def __init__(self, dim: int, num_classes: int, *, hidden: int = 256, depth: int = 3,
                 sigma_data: float = 0.5):  # fmt: skip
        super().__init__()
        for k, v in {
            "dim": dim,
            "num_classes": num_classes,
            "hidden": hidden,
            "depth": depth,
        }.items():
            check_int(k, v, least=1 if k != "num_classes" else 2, most=_LIMITS[k])
        self.config = {"dim": dim, "num_classes": num_classes, "hidden": hidden, "depth": depth,
                       "sigma_data": check_number("sigma_data", sigma_data, low=0, low_ok=False)}  # fmt: skip
        self.register_buffer("freqs", torch.arange(1, 9, dtype=torch.float32) * math.pi / 4)
        self.inp = nn.Linear(dim, hidden)
        self.emb = nn.Linear(16, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            for _ in range(depth)
        )
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sd = self.config["sigma_data"]
        flat = x.flatten(1) / (sigma.square() + sd * sd).sqrt()[:, None]
        ang = sigma.log()[:, None].float() * self.freqs
        e = self.emb(torch.cat([ang.sin(), ang.cos()], 1)).to(flat.dtype)
        h = self.inp(flat.to(self.inp.weight.dtype)).to(flat.dtype)
        for block in self.blocks:
            h = h + block(h + e)
        return self.out(F.silu(h))


def classifier_loss(
    clf: Callable, x0: Tensor, labels: Tensor, sigma: Tensor, noise: Tensor
) -> Tensor:
    """Cross-entropy of ``clf(x0 + sigma n, sigma)`` against ``labels``, per example ``[B]``."""
    return F.cross_entropy(
        clf(x0 + append_dims(sigma, x0.ndim) * noise, sigma), labels, reduction="none"
    )


def dlsm_loss(
    log_probs: Callable[[Tensor, Tensor], Tensor],
    uncond: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    labels: Tensor,
    sigma: Tensor,
    noise: Tensor,
    *,
    sigma_data: float = 0.5,
) -> Tensor:
    """DLSM per example ``[B]``: ``w(sigma) mean (D_u(x) + sigma^2 grad_x log p(y | x, sigma) - x0)^2``.

    ``log_probs(x, sigma) -> [B, C]`` (log-softmax of a classifier, or exact); ``uncond`` the fixed
    unconditional denoiser (not differentiated); ``w`` the EDM weighting. Differentiable in
    ``log_probs``'s parameters (the gradient in ``x`` is taken with ``create_graph``).
    """
    x = (x0 + append_dims(sigma, x0.ndim) * noise).detach().requires_grad_(True)
    lp = log_probs(x, sigma).gather(1, labels[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
    with torch.no_grad():
        d_u = uncond(x.detach(), sigma)
    implied = d_u + append_dims(sigma.square(), x0.ndim) * grad
    w = get_weighting("edm")(sigma, sigma_data)
    return w * (implied - x0).square().flatten(1).mean(1)


def _sigmas(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, generator=g))


def _accuracy(clf: NoisyClassifier, x: Tensor, y: Tensor, levels, g: torch.Generator) -> dict:
    out = {}
    with torch.no_grad():
        for s in levels:
            sig = torch.full((len(x),), float(s))
            pred = clf(x + s * torch.randn(x.shape, generator=g), sig).argmax(1)
            out[f"{s:g}"] = float((pred == y).float().mean())
    return out


def _labelled_split(
    data: str, ds: sdata.Dataset, labels: Tensor | None, holdout: float, seed: int
) -> tuple[sdata.Dataset, sdata.Dataset, sdata.Dataset | None]:
    """``(data set with its labels, train part, test part)``; ``labels`` replace the data's own.

    The held-out rows are always the ones the data's own labels give (``scorekit train --holdout``'s
    split with the same seed), so a classifier of minority levels never trains on a run's test rows.
    """
    own = ds
    if labels is not None:
        if (
            not isinstance(labels, Tensor)
            or labels.dtype != torch.long
            or labels.shape != (len(ds),)
        ):
            got = (
                f"{labels.dtype} {tuple(labels.shape)}"
                if isinstance(labels, Tensor)
                else type(labels).__name__
            )
            raise ValueError(f"labels must be int64 [N] = [{len(ds)}] (one per row of {data}); got {got}")  # fmt: skip
        if len(labels) and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0; got {int(labels.min())}")
        k = int(labels.max()) + 1 if len(labels) else 0
        ds = dataclasses.replace(ds, labels=labels, num_classes=k, class_names=())
    if not ds.num_classes or ds.labels is None:
        raise ValueError(f"--data {data}: has no labels; a classifier needs a labelled data set")
    if not holdout:
        return ds, ds, None
    is_test = sdata.holdout_mask(own, holdout=holdout, seed=seed)
    return ds, ds._subset((~is_test).nonzero().flatten()), ds._subset(is_test.nonzero().flatten())


def train_classifier(
    data: str,
    out: str | os.PathLike,
    *,
    steps: int = 2000,
    minutes: float | None = None,
    holdout: float = 0.2,
    batch: int = 256,
    lr: float = 2e-3,
    hidden: int = 256,
    depth: int = 3,
    sigma_range: tuple[float, float] | None = None,
    uncond: Callable[[Tensor, Tensor], Tensor] | None = None,
    dlsm_weight: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    labels: Tensor | None = None,
    label_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a ``NoisyClassifier`` on ``data``'s training split; write it to ``out``; return its record.

    Args:
        data: a labelled data set (``scorekit.data.load``). out: the folder to write.
        steps / minutes: stop at whichever comes first. holdout: fraction held out (same stratified
            split as ``scorekit train --holdout`` with the same seed), where accuracy is measured.
        sigma_range: ``(lo, hi)`` of the log-uniform training noise (default ``(0.01, 20 sigma_data)``).
        uncond: the unconditional denoiser for the DLSM term (``None``: cross-entropy only).
        dlsm_weight: lambda of ``L_CE + lambda L_DLSM``.
        labels: int64 ``[N]``, one per row of ``data`` in load order, replacing its own labels (e.g.
            minority levels, ``scorekit.guidance.minority_levels``; ``max + 1`` classes); the
            held-out rows stay the data's own split. label_info: what they are (a JSON-able dict
            stored as ``classifier.json``'s ``"labels"``; ``{"kind": "minority", ...}`` marks a
            minority classifier, whose classes are levels, not a run's classes).
    """
    steps = check_int("steps", steps)
    ds, train_ds, test_ds = _labelled_split(
        data, sdata.load(data, seed=seed), labels, holdout, seed
    )
    x_all, y_all = train_ds.x.float(), torch.as_tensor(train_ds.labels)
    sd = float(x_all.std())
    lo, hi = sigma_range or (0.01, 20 * sd)
    clf = NoisyClassifier(
        x_all[0].numel(), ds.num_classes, hidden=hidden, depth=depth, sigma_data=sd
    )
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        sig, noise = _sigmas(batch, lo, hi, g), torch.randn(x0.shape, generator=g)
        loss = classifier_loss(clf, x0, y, sig, noise).mean()
        if uncond is not None and dlsm_weight > 0:
            lp = lambda x, s: F.log_softmax(clf(x, s), dim=1)  # noqa: E731
            loss = (
                loss + dlsm_weight * dlsm_loss(lp, uncond, x0, y, sig, noise, sigma_data=sd).mean()
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress and step % 200 == 0:
            print(f"step {step} loss {sum(losses[-200:]) / len(losses[-200:]):.4f}", flush=True)
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            break
    clf.eval()
    levels = [0.05, 0.2, 0.5, 1.0, 2.0]
    record = {
        "config": clf.config,
        "data": {"name": ds.name, "shape": list(x_all.shape[1:]), "num_classes": ds.num_classes,
                 "normalization": ds.normalization.to_dict()},
        "train": {"steps": step + 1, "batch": batch, "lr": lr, "holdout": holdout, "seed": seed,
                  "sigma_range": [lo, hi], "dlsm_weight": dlsm_weight if uncond is not None else 0.0,
                  "seconds": time.perf_counter() - start, "last_loss": sum(losses[-50:]) / len(losses[-50:])},
        "labels": {"kind": "data"} if labels is None else dict(label_info or {"kind": "given"}),
        "heldout_accuracy": None if test_ds is None else _accuracy(
            clf, test_ds.x.float(), torch.as_tensor(test_ds.labels), levels, g),
    }  # fmt: skip
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(
        folder / "classifier.safetensors",
        st_save({k: v.contiguous() for k, v in clf.state_dict().items()}),
    )
    atomic_write_json(folder / "classifier.json", record)
    return record


def load_classifier(
    folder: str | os.PathLike,
    info: dict | None = None,
    *,
    label: int | None = None,
    device: str | torch.device = "cpu",
):
    """The classifier in ``folder``: the module (``label=None``) or ``log p(label | x, sigma)`` ``[B]``.

    With a run's ``info`` (``scorekit.runs.load_run``) the classifier's data shape, classes and
    normalisation must be the run's (a one-line error otherwise; an unconditional run, with no
    classes of its own, takes a classifier of any number of classes, and so does any run for a
    minority classifier, whose classes are minority levels).
    """
    folder = Path(folder)
    try:
        record = json.loads((folder / "classifier.json").read_text())
        weights = st_load((folder / "classifier.safetensors").read_bytes())
        clf = NoisyClassifier(**record["config"])
        clf.load_state_dict(weights)
    except FileNotFoundError:
        raise ValueError(f"--classifier {folder}: no classifier.json / classifier.safetensors there "
                         "(write one with scorekit train-classifier)") from None  # fmt: skip
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"--classifier {folder}: {str(e).splitlines()[0][:200]}") from None
    if info is not None:
        for key in ("shape", "num_classes", "normalization"):
            if key == "num_classes" and (
                not info.get(key) or record.get("labels", {}).get("kind") == "minority"
            ):
                continue  # an unconditional run, or minority levels: the classifier brings the classes
            if record["data"].get(key) != info.get(key):
                raise ValueError(f"--classifier {folder}: its {key} is {record['data'].get(key)!r}; the "
                                 f"run's is {info.get(key)!r}")  # fmt: skip
    clf = clf.to(device).eval().requires_grad_(False)
    if label is None:
        return clf
    label = check_int("label", label, least=0, most=record["data"]["num_classes"] - 1)

    def log_p(x: Tensor, sigma: Tensor) -> Tensor:
        return F.log_softmax(clf(x, sigma), dim=1)[:, label].to(x.dtype)

    return log_p
