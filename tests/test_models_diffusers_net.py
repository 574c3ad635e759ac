"""A diffusers ``UNet2DModel`` trained inside scorekit (``--net '{"type": "diffusers-unet2d"}'``) and
exported as a diffusers pipeline folder: the folder, read by ``from_diffusers`` and by diffusers' own
classes and EDM preconditioning, gives the run's denoiser."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline, EDMEulerScheduler, UNet2DModel

from scorekit import nets
from scorekit.cli import main
from scorekit.models import from_diffusers
from scorekit.models.diffusers_export import check_pipeline
from scorekit.runs import load_run

pytestmark = pytest.mark.peer

NET = {"type": "diffusers-unet2d", "block_out_channels": [16, 32], "norm_num_groups": 8}
SIGMAS = [0.002, 0.05, 0.5, 2.0, 80.0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("dnet")
    run, out = base / "run", base / "exported"
    argv = ["train", "--data", "digits", "--cond", "--out", str(run), "--batch", "16",
            "--net", json.dumps(NET), "--steps", "3", "--log-every", "1", "--lr", "1e-2",
            "--warmup", "1", "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    return run, out / "diffusers"


def _inputs(n: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def test_the_run_network_is_a_diffusers_unet_with_a_null_class_row(exported):
    run, _ = exported
    denoiser, info = load_run(run)
    unet = denoiser.net.unet
    assert isinstance(unet, UNet2DModel) and info["num_classes"] == 10
    assert unet.config.num_class_embeds == 11  # row 10 is scorekit's label -1
    assert list(unet.config.block_out_channels) == [16, 32]


def test_from_diffusers_on_the_pipeline_folder_is_the_run_denoiser(exported):
    run, folder = exported
    original, info = load_run(run)
    x, labels = _inputs()
    for path in (folder, folder / "unet"):  # the pipeline, or its unet/ (scheduler/ found beside)
        d = from_diffusers(path)
        assert d.scheduler_config["sigma_data"] == pytest.approx(info["sigma_data"], rel=1e-12)
        for s in SIGMAS:
            sigma = torch.full((x.shape[0],), s)
            with torch.no_grad():
                want = original(x * max(s, 1.0), sigma, class_labels=labels)
                got = d(x * max(s, 1.0), sigma, class_labels=labels)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(s, 1.0))
    # scorekit's "no class" (-1) is the UNet's extra row 10
    dn, _ = from_diffusers(folder).as_run(null_label=10)
    none = torch.full((x.shape[0],), -1)
    with torch.no_grad():
        torch.testing.assert_close(
            dn(x, torch.full((10,), 0.7), class_labels=none),
            original(x, torch.full((10,), 0.7), class_labels=none), rtol=1e-5, atol=1e-5,
        )  # fmt: skip


def test_diffusers_own_classes_load_the_folder_and_its_preconditioning_gives_the_run(exported):
    run, folder = exported
    original, _ = load_run(run)
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, EDMEulerScheduler)
    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    sched = EDMEulerScheduler.from_pretrained(folder, subfolder="scheduler")
    x, labels = _inputs()
    for s in SIGMAS:
        sigma = torch.tensor(s)
        xs = x * max(s, 1.0)
        with torch.no_grad():
            raw = unet(sched.precondition_inputs(xs, sigma), sched.precondition_noise(sigma),
                       class_labels=labels).sample  # fmt: skip
            want = sched.precondition_outputs(xs, raw, sigma)
            got = original(xs, torch.full((10,), s), class_labels=labels)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(s, 1.0))


def test_bad_pipeline_requests_are_one_line_errors():
    with pytest.raises(ValueError, match=r"network is a diffusers class.*'unet'"):
        check_pipeline({"type": "unet", "in_channels": 1}, "edm", "edm")
    with pytest.raises(ValueError, match=r"EDM runs.*--process ddpm --param eps"):
        check_pipeline(NET, "ddpm", "eps")
    with pytest.raises(ValueError, match="multiples of norm_num_groups"):
        nets.build({**NET, "in_channels": 1, "block_out_channels": [12, 32]})
    with pytest.raises(ValueError, match=r"config\['layers_per_block'\]"):
        nets.build({**NET, "in_channels": 1, "layers_per_block": 10_000})


def test_the_parameter_bound_counts_the_built_unet_exactly():
    for cfg in (nets.default_config("image", [1, 8, 8], 10, net_type="diffusers-unet2d"),
                {**NET, "in_channels": 3, "image_size": 16, "attention": True}):  # fmt: skip
        kwargs = {k: v for k, v in cfg.items() if k != "type"}
        assert nets._SIZES["diffusers-unet2d"](**kwargs) == nets.num_parameters(nets.build(cfg))
