"""The robustness benchmark's pieces: the diffusers-recipe digits UNet and the perturbed exact denoisers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from scorekit.bench import digits_unet


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    out = tmp_path_factory.mktemp("unet") / "ddpm-unet"
    return digits_unet.train_ddpm_unet(out, minutes=0.01, seed=0, threads=1, progress=False)


@pytest.mark.peer
def test_unet_adapter_matches_diffusers_ddpm_formula(tiny_unet):
    """At a table step i, D(x, sigma_i) is DDPM's x0 = (x_t - sqrt(1 - abar) eps(x_t, i)) / sqrt(abar)."""
    import diffusers

    den = digits_unet.load_ddpm_unet(tiny_unet)
    unet = diffusers.UNet2DModel.from_pretrained(tiny_unet / "unet", low_cpu_mem_usage=False).eval()
    sched = diffusers.DDPMScheduler.from_pretrained(tiny_unet / "scheduler")
    g = torch.Generator().manual_seed(1)
    for i in (0, 250, 999):
        abar = sched.alphas_cumprod[i].double()
        x_t = torch.randn(3, 1, 8, 8, generator=g)
        with torch.no_grad():
            eps = unet(x_t, torch.full((3,), i)).sample
        x0 = (x_t.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()
        sigma = ((1 - abar) / abar).sqrt()
        with torch.no_grad():
            got = den(x_t / abar.sqrt().float(), torch.full((3,), float(sigma)))
        torch.testing.assert_close(got.double(), x0, rtol=1e-3, atol=1e-3 * float(sigma + 1))


def test_unet_folder_is_reused_and_split_is_disjoint(tiny_unet):
    info = json.loads((tiny_unet / "training.json").read_text())
    assert info["steps"] >= 1 and info["holdout"] == digits_unet.HOLDOUT
    stamp = (tiny_unet / "training.json").stat().st_mtime_ns
    assert (
        digits_unet.train_ddpm_unet(tiny_unet, minutes=5.0) == tiny_unet
    )  # cached: returns at once
    assert (tiny_unet / "training.json").stat().st_mtime_ns == stamp
    train, test = digits_unet.training_digits(), digits_unet.heldout_digits()
    assert len(train) + len(test) == 1797
    rows = {tuple(r.flatten().tolist()) for r in train}
    # a few digits are exact duplicates in scikit-learn's set; all but those stay apart
    assert sum(tuple(r.flatten().tolist()) in rows for r in test) <= 5
    assert not list(tiny_unet.parent.glob(".*tmp"))  # no temporary folder left behind


def test_unet_refuses_incomplete_folder(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete"):
        digits_unet.train_ddpm_unet(tmp_path / "half", minutes=0.01)
    with pytest.raises(ValueError, match="not a folder written by train_ddpm_unet"):
        digits_unet.load_ddpm_unet(tmp_path / "half")
