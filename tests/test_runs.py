"""Inference on a trained run (scorekit.runs): class binding and classifier-free guidance against the
exact class-conditional mixture, the sampling range, decoding and reading data files in a run's
units, and the names that moved out of scorekit.train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scorekit.train
from scorekit import data
from scorekit.guidance import class_target
from scorekit.runs import decode, draw, generate, load_levels, sigma_range
from scorekit.samplers import sample

TARGET = class_target("ring6")  # 2-D, 6 components, 3 classes (exact denoisers per class)


def labelled(x, sigma, class_labels=None):
    """A network-like denoiser of the exact mixture: class_labels = y (all rows) or -1 (no label)."""
    y = int(class_labels[0]) if class_labels is not None else -1
    assert class_labels is None or bool((class_labels == y).all())
    gm = TARGET.uncond if y == -1 else TARGET.cond(y)
    return gm.denoise(x.double(), sigma.double()).to(x.dtype)


# The EDM process trains on [0.002, 80]; with sigma_data = 1 sampling starts at min(80, 20 * 1) = 20
# and ends on sample()'s default grid to 0.002 (its last point dropped).
INFO = {"shape": [2], "process": "edm", "sigma_data": 1.0, "num_classes": 3}
RANGE = dict(sigma_max=20.0, schedule="karras")


def _exact(denoiser, n=64, nfe=8, seed=3):
    with torch.no_grad():
        return sample(denoiser, (n, 2), nfe=nfe, sampler="euler", seed=seed, **RANGE)


def test_label_binds_the_exact_class_conditional_denoiser():
    got = draw(labelled, INFO, 64, nfe=8, sampler="euler", seed=3, label=2)
    want = _exact(lambda x, s: TARGET.cond(2).denoise(x.double(), s.double()).float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    unlabelled = draw(labelled, INFO, 64, nfe=8, sampler="euler", seed=3)
    want_u = _exact(lambda x, s: TARGET.uncond.denoise(x.double(), s.double()).float())
    torch.testing.assert_close(unlabelled, want_u, rtol=1e-5, atol=1e-5)


def test_guidance_is_cfg_written_out_and_scale_one_is_the_conditional():
    w = 2.5

    def by_hand(x, s):  # Ho & Salimans eq. 6 in denoiser form: D_u + w (D_c - D_u)
        d_c = TARGET.cond(1).denoise(x.double(), s.double())
        d_u = TARGET.uncond.denoise(x.double(), s.double())
        return (d_u + w * (d_c - d_u)).float()

    got = draw(labelled, INFO, 64, nfe=8, sampler="euler", seed=3, label=1, guidance=w)
    torch.testing.assert_close(got, _exact(by_hand), rtol=1e-4, atol=1e-4)
    one = draw(labelled, INFO, 64, nfe=8, sampler="euler", seed=3, label=1, guidance=1.0)
    cond = draw(labelled, INFO, 64, nfe=8, sampler="euler", seed=3, label=1)
    torch.testing.assert_close(one, cond, rtol=1e-5, atol=1e-5)


def test_binding_errors():
    with pytest.raises(ValueError, match="--guidance needs --label"):
        draw(labelled, INFO, 2, nfe=2, guidance=2.0)
    with pytest.raises(ValueError, match=r"label must be in 0\.\.2, got 3"):
        draw(labelled, INFO, 2, nfe=2, label=3)
    with pytest.raises(ValueError, match="unconditional"):
        draw(labelled, {**INFO, "num_classes": 0}, 2, nfe=2, label=0)


def test_generate_chunks_give_the_same_samples():
    a = generate(labelled, INFO, 7, batch=3, progress=False, nfe=4, sampler="euler", seed=1)
    b = draw(labelled, INFO, 7, nfe=4, sampler="euler", seed=1)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_sigma_range_is_the_processes_range():
    # EDM (Karras et al. 2022, Table 1): sigma in [0.002, 80]; VE (Song et al. 2021): [0.01, 50].
    assert sigma_range("edm") == pytest.approx((0.002, 80.0))
    assert sigma_range("ve") == pytest.approx((0.01, 50.0))


def test_load_levels_and_decode_are_the_data_in_its_own_units():
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    info = {"normalization": ds.normalization.to_dict(), "shape": list(ds.shape),
            "config": {"holdout": 0.25, "seed": 0}}  # fmt: skip
    raw = load_levels("digits", info)
    images = load_digits().images  # scikit-learn's 0..16 pixel levels, [1797, 8, 8]
    np.testing.assert_allclose(raw.reshape(len(raw), -1).numpy(), images.reshape(len(images), -1),
                               atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(decode(ds.x[:5], info).reshape(5, -1), images[:5].reshape(5, -1),
                               atol=1e-4)  # fmt: skip
    test = load_levels("digits", info, split="test")
    train = load_levels("digits", info, split="train")
    assert len(test) + len(train) == len(images) and abs(len(test) - 0.25 * len(images)) <= 1
    with pytest.raises(ValueError, match="was trained on shape"):
        load_levels("digits", {**info, "shape": [1, 4, 4]})
    with pytest.raises(ValueError, match="needs a holdout fraction"):
        load_levels("digits", {**info, "config": {}}, split="test")


def test_moved_names_say_where_they_went():
    for name in ("load_run", "generate", "draw", "decode", "sigma_range"):
        with pytest.raises(
            AttributeError, match=f"scorekit.train.{name} moved to scorekit.runs.{name}"
        ):
            getattr(scorekit.train, name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        scorekit.train.nothing  # noqa: B018
