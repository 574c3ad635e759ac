"""The robustness benchmark's pieces: the diffusers-recipe digits UNet and the perturbed exact denoisers."""

from __future__ import annotations

import json
import math

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


# --------------------------------------------------------------------------------------------------
# The robustness suite's pieces (scorekit.bench.samplers.robust).


def test_perturbed_adds_c_out_times_a_unit_rms_smooth_error():
    from scorekit.analytic import target
    from scorekit.bench.samplers.robust import PARAMS, Perturbed

    gm = target("ring8")
    z = 3 * torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, make in PARAMS.items():
        param = make()
        zero = Perturbed(gm.denoise, param, 2, 0.0)
        den = Perturbed(gm.denoise, param, 2, 0.2)
        for s in (0.01, 1.0, 50.0):
            x = z * math.sqrt(1 + s**2)  # the network's input c_in x is then ~3 z (phases spread)
            sigma = torch.full((len(x),), s, dtype=torch.float64)
            torch.testing.assert_close(zero(x, sigma), gm.denoise(x, sigma))
            _, c_out, _, _ = param.scalings(sigma)
            diff = den(x, sigma) - gm.denoise(x, sigma)
            # the D error is the raw error times c_out, |c_out| capped at sigma (x0 only)
            scale = torch.minimum(c_out.abs(), sigma) * (0.1 + 1 / (1 + s**2))  # cap, profile
            rms = float((diff / scale[:, None]).square().mean().sqrt())
            assert 0.15 < rms < 0.25, (name, s, rms)  # level 0.2, unit-RMS field
            assert float(diff.abs().max()) <= 0.2 * 4 * 1.1 * s + 1e-12  # below ~4 level sigma


def test_nn_accuracy_against_a_brute_force_count():
    from scorekit.bench.samplers.robust import nn_accuracy

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 3, generator=g), torch.randn(30, 3, generator=g) + 0.7
    pool, lab = torch.cat([a, b]), [0] * 30 + [1] * 30
    hits = 0
    for i in range(60):
        best = min((float((pool[i] - pool[j]).norm()), j) for j in range(60) if j != i)[1]
        hits += lab[best] == lab[i]
    assert nn_accuracy(a, b) == pytest.approx(hits / 60)
    assert nn_accuracy(a, a.clone()) == 0.0  # each point's neighbour is its twin in the other set
    assert nn_accuracy(a, a + 100.0) == 1.0
    with pytest.raises(ValueError, match="equal sizes"):
        nn_accuracy(a, b[:10])


def test_divergence_is_judged_against_euler_on_the_same_model_and_nfe():
    from scorekit.bench.samplers.robust import diverged, divergences

    def row(sampler, nfe, distance, bounded=True, model="m"):
        return {"model": model, "sampler": sampler, "target_nfe": nfe, "distance": distance,
                "floor": 1.0, "bounded": bounded}  # fmt: skip

    rows = [row("euler", 5, 3.0), row("a", 5, 11.0), row("b", 5, 2.0, bounded=False),
            row("euler", 10, 20.0), row("a", 10, 30.0), row("c", 5, math.inf)]  # fmt: skip
    assert [diverged(r) for r in rows] == [False, True, True, True, True, True]
    assert divergences(rows) == ["m a 5", "m b 5", "m c 5"]  # at NFE 10 euler diverges too


def test_defaults_verdict_per_draw_and_on_the_means():
    from scorekit.bench.samplers.robust import defaults_verdict

    def row(seed, who, k, nn, fd):
        return {
            "model": f"m seed {seed}",
            "sampler": who,
            "target_nfe": k,
            "nn": nn,
            "distance": fd,
        }

    rows = [
        row(0, "scorekit default", 5, 0.70, 50.0), row(0, "diffusers x", 10, 0.68, 60.0),
        row(1, "scorekit default", 5, 0.60, 50.0), row(1, "diffusers x", 10, 0.66, 60.0),
    ]  # fmt: skip
    lines = defaults_verdict(rows)
    assert lines[0].endswith(": no") and lines[1].endswith(": yes")  # 0.70 > 0.68; 0.60 <= 0.66
    assert lines[2] == "mean of 2 draws: scorekit@5 0.650 / 50.0 vs diffusers@10 0.670 / 60.0: yes"
