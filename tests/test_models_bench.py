"""``scorekit bench models`` on a tiny random UNet folder (the digits UNet's layout): every candidate
makes exactly its NFE, both sides start from the same noise, and the 1-NN two-sample test is right
on sets whose answer is known."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers
from diffusers import UNet2DModel

from scorekit.bench import models as bench

pytestmark = pytest.mark.peer


def test_nn1_accuracy_on_known_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 4, generator=g)
    far = a + 100.0  # every point's nearest neighbour is in its own set
    assert bench.nn1_accuracy(a, far) == 1.0
    # x = {0, 0.2}, y = {1, 3}: nearest of 0 is 0.2 (x, right), of 0.2 is 0 (right), of 1 is 0.2
    # (x, wrong), of 3 is 1 (y, right)
    x = torch.tensor([[0.0], [0.2]])
    y = torch.tensor([[1.0], [3.0]])
    assert bench.nn1_accuracy(x, y) == pytest.approx(3 / 4)
    same = bench.nn1_accuracy(a, torch.randn(200, 4, generator=g))
    assert 0.35 < same < 0.65  # one distribution: about chance


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2,
                add_attention=False).save_pretrained(root / "unet")  # fmt: skip
    diffusers.DDPMScheduler().save_config(root / "scheduler")
    (root / "training.json").write_text("{}")
    return root


def test_both_sides_make_exactly_their_nfe_from_the_same_noise(folder):
    theirs, ours = bench._candidates(quick=True)
    z = bench._noise(4, 0)
    for nfe in (5, 10):
        for c in theirs:
            _, calls = bench.diffusers_sample(folder, c["cls"], c["cfg"], z, nfe)
            assert calls == nfe
        for c in ours:
            _, calls = bench.scorekit_sample(folder, c, z, nfe)
            assert calls == nfe
    # DDIM (trailing, no clip) and scorekit's Euler are one algorithm: from the same noise on the
    # same table sigmas they give the same samples, so the noise really is shared.
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    sched.set_timesteps(5)
    ac = sched.alphas_cumprod.double()
    sig = ((1 - ac[sched.timesteps]) / ac[sched.timesteps]).sqrt()
    theirs_x, _ = bench.diffusers_sample(
        folder, "DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}, z, 5
    )
    from scorekit.samplers import sample

    den = bench._scorekit_denoiser(folder, False)
    sigmas = torch.cat([sig, sig.new_zeros(1)])
    with torch.no_grad():
        # diffusers starts from x_T = z (unit variance); in the sigma frame that is sqrt(1 + s^2) z
        ours_x = sample(den, (4, 1, 8, 8), nfe=5, sampler="euler",
                        sigmas=sigmas, noise=z * (1 + sigmas[0] ** 2).sqrt() / sigmas[0])  # fmt: skip
    torch.testing.assert_close(ours_x, theirs_x, rtol=1e-4, atol=1e-4)


def test_quick_benchmark_writes_its_report(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DIFFUSERS", bench.DIFFUSERS[:2])  # --quick keeps the first
    monkeypatch.setattr(bench, "SCOREKIT", bench.SCOREKIT[:2])
    args = argparse.Namespace(model_dir=str(folder), minutes=1.0, n=24, tune_n=16, seed=1,
                              tune_seed=0, repeats=1, threads=1, quick=True,
                              out=str(tmp_path / "out"))  # fmt: skip
    assert bench.run(args) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["side"], r["nfe"]) for r in res["report"]} == {
        (s, n) for s in ("diffusers", "scorekit") for n in (5, 10, 20)
    }
    assert res["overhead"]["model_s"] > 0
    assert "Goal (scorekit at 10 NFE" in (tmp_path / "out" / "report.md").read_text()
