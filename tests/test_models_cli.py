"""``scorekit sample --diffusers`` and ``scorekit likelihood --diffusers`` on a tiny saved model.

The samples are checked against diffusers' own ``EulerDiscreteScheduler`` loop run here on the same
sigmas and the same starting noise: diffusers maps each sigma to a fractional timestep by
interpolating its table in log sigma, as scorekit does, so the two agree to float32 round-off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffusers
from diffusers import UNet2DModel

import scorekit
from scorekit.cli import main
from scorekit.likelihood import log_likelihood
from scorekit.models import from_diffusers
from scorekit.schedules import karras
from test_models_diffusers import UNET  # the same tiny UNet config

pytestmark = pytest.mark.peer


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A pipeline-shaped folder: unet/ (class-conditional, 3 classes) and scheduler/."""
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    UNet2DModel(**UNET, num_class_embeds=3).save_pretrained(root / "unet")
    diffusers.DDPMScheduler(clip_sample=False).save_config(root / "scheduler")
    return root


def test_sample_diffusers_is_diffusers_euler_on_the_same_sigmas(pipeline, tmp_path):
    out = tmp_path / "x.npy"
    argv = ["sample", "--diffusers", str(pipeline), "--subfolder", "unet", "--n", "3", "--nfe", "5",
            "--sampler", "euler", "--label", "1", "--seed", "4", "--out", str(out),
            "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    ours = np.load(out)
    assert ours.shape == (3, 1, 4, 4)

    den = from_diffusers(pipeline, subfolder="unet")
    lo, hi = den.sigma_min, 10.0  # the command's range: table minimum, 20 sigma_data (0.5) at most
    starts = []

    def record(x, sigma):  # the command's starting state: row i's noise from (seed, i) times hi
        starts.append(x.clone())
        return x

    scorekit.sample(
        record, (3, 1, 4, 4), nfe=2, sampler="euler", sigma_min=lo, sigma_max=hi, seed=4
    )
    sched = diffusers.EulerDiscreteScheduler()
    sched.set_timesteps(sigmas=karras(5, lo, hi).tolist())  # its last entry is the final sigma, 0
    sample, labels = starts[0], torch.full((3,), 1)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = den.model(sched.scale_model_input(sample, t), t, class_labels=labels).sample
            sample = sched.step(eps, t, sample).prev_sample
    theirs = (sample * 127.5 + 127.5).numpy()  # [-1, 1] -> pixels
    np.testing.assert_allclose(ours, theirs, rtol=3e-5, atol=1e-3)  # float32 round-off


def test_guidance_on_a_diffusers_model_needs_its_null_label(pipeline, tmp_path, capsys):
    base = ["sample", "--diffusers", str(pipeline), "--n", "2", "--nfe", "2", "--sampler", "euler",
            "--label", "0", "--guidance", "2", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a.npy")]) == 2
    err = capsys.readouterr().err
    assert "--null-label" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--null-label", "2", "--out", str(tmp_path / "b.npy")]) == 0
    assert np.isfinite(np.load(tmp_path / "b.npy")).all()


def test_likelihood_diffusers_is_the_ode_likelihood_of_the_loaded_model(pipeline, tmp_path):
    unet_only = tmp_path / "unet"  # a save_pretrained model folder with its scheduler config inside
    torch.manual_seed(1)
    UNet2DModel(**UNET).save_pretrained(unet_only)
    diffusers.DDPMScheduler(clip_sample=False).save_config(unet_only)
    # black and white pixels: exact through the command's float32 data path (load, normalise, decode)
    pixels = 255 * np.random.default_rng(0).integers(0, 2, size=(2, 1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "data.npy", pixels)
    out = tmp_path / "ll.csv"
    argv = ["likelihood", "--diffusers", str(unet_only), "--data", str(tmp_path / "data.npy"),
            "--out", str(out), "--divergence", "hutchinson", "--probes", "1", "--sigma-min", "0.5",
            "--sigma-max", "10", "--rtol", "1e-2", "--atol", "1e-2"]  # fmt: skip
    assert main(argv) == 0
    rows = np.loadtxt(out, delimiter=",", skiprows=1)
    den = from_diffusers(unet_only)
    # pixels -> [-1, 1], the model's units (diffusers' convention), written out here
    x = torch.from_numpy(((pixels.astype(np.float64) - 127.5) / 127.5).astype(np.float32))
    lp = log_likelihood(den, x, sigma_min=0.5, sigma_max=10.0, divergence="hutchinson", n_probes=1,
                        rtol=1e-2, atol=1e-2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    # the CSV holds each example's model-unit log-density under the loaded model
    np.testing.assert_allclose(rows[:, 1], lp.double().numpy(), rtol=1e-6)


def test_run_and_diffusers_are_exclusive(pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--run", "r", "--diffusers", str(pipeline), "--n", "1", "--out", "x.npy"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
