"""`scorekit restore` end to end on a tiny digits run trained here (2 steps: the network is poor, so the
checks are the ones that hold for any prior: measured pixels kept, units and layout, errors)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from scorekit.cli import main
from scorekit.data import load

TINY_UNET = json.dumps({"base_channels": 8, "num_res_blocks": 1, "attn_resolutions": []})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("restore") / "digits"
    assert main(["train", "--data", "digits", "--out", str(path), "--steps", "2", "--batch", "16",
                 "--net", TINY_UNET, "--no-progress"]) == 0  # fmt: skip
    return str(path)


def _digits(n: int) -> np.ndarray:
    ds = load("digits")
    return np.asarray(
        ds.normalization.decode(ds.x[:n]), dtype=np.float64
    )  # [n, 8, 8], pixels 0..16


def _restore(run, tmp_path, *extra) -> int:
    return main(["restore", "--run", run, "--no-progress", "--n", "3", *extra])


def test_inpainting_keeps_the_observed_pixels_in_data_units(run, tmp_path):
    """A full image given as the measurement of inpaint-left, nearly noiseless: every sample's right
    half is the given right half (pixels 0..16, not the model's [-1, 1])."""
    truth = _digits(2)
    np.save(tmp_path / "y.npy", truth)
    out = tmp_path / "x.npy"
    assert _restore(run, tmp_path, "--operator", "inpaint-left", "--sigma-y", "0.001",
                    "--data", str(tmp_path / "y.npy"), "--solver", "ddnm", "--nfe", "8",
                    "--out", str(out)) == 0  # fmt: skip
    x = np.load(out)
    assert x.shape == (2, 3, 8, 8)
    assert np.abs(x[..., 4:] - truth[:, None, :, 4:]).max() < 0.1


def test_super_resolution_matches_the_low_resolution_image(run, tmp_path):
    """downsample-2 of 4x4 pixel averages: the 2x2 averages of every sample reproduce them (the
    normalisation's shift and scale are folded into the operator correctly)."""
    low = _digits(1).reshape(1, 4, 2, 4, 2).mean((2, 4))[0]  # one [4, 4] measurement
    np.save(tmp_path / "low.npy", low)
    out = tmp_path / "sr.npy"
    assert _restore(run, tmp_path, "--operator", "downsample-2", "--sigma-y", "0.001",
                    "--data", str(tmp_path / "low.npy"), "--solver", "ddnm", "--nfe", "8",
                    "--out", str(out)) == 0  # fmt: skip
    x = np.load(out)
    assert x.shape == (1, 3, 8, 8)
    pooled = x.reshape(1, 3, 4, 2, 4, 2).mean((3, 5))
    assert np.abs(pooled - low).max() < 0.1


def test_png_panel_and_the_default_solver_from_clean_examples(run, tmp_path):
    png = tmp_path / "p.png"
    assert _restore(run, tmp_path, "--operator", "blur-gauss:sigma=1", "--sigma-y", "0.5",
                    "--clean", "digits", "--limit", "2", "--nfe", "6", "--out", str(png)) == 0  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--operator", "inpaint-left", "--sigma-y", "0.1", "--data", "Y4"],
         r"a measurement of shape \[2, 4, 4\] does not fit --operator inpaint-left .*allowed: \[\[32\], \[8, 8\]\]"),
        (["--operator", "downsample-2", "--sigma-y", "-1", "--data", "Y4"],
         r"--sigma-y must be a finite number >= 0; got -1.0"),
        (["--operator", "downsample-2", "--sigma-y", "nan", "--data", "Y4"], r"--sigma-y must be"),
        (["--operator", "downsample-2", "--sigma-y", "0.1", "--data", "Y4", "--solver", "dpss"],
         r"--solver: unknown posterior sampler 'dpss'; allowed: \["),
        (["--operator", "upsample-2", "--sigma-y", "0.1", "--data", "Y4"],
         r"unknown operator 'upsample-2'; allowed: \['denoise'"),
        (["--operator", "inpaint-box:top=7", "--sigma-y", "0.1", "--data", "Y4"], r"is not inside 8x8"),
        (["--operator", "downsample-2", "--sigma-y", "0.0", "--data", "Y4"], r"tds needs sigma_y > 0"),
        (["--operator", "blur-gauss:reflect=1", "--sigma-y", "0.1", "--data", "Y8", "--solver", "ddrm"],
         r"ddrm needs an operator with an SVD; got Blur"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(run, tmp_path, capsys, extra, message):
    np.save(tmp_path / "y4.npy", np.zeros((2, 4, 4)))
    np.save(tmp_path / "y8.npy", np.zeros((2, 8, 8)))
    files = {"Y4": str(tmp_path / "y4.npy"), "Y8": str(tmp_path / "y8.npy")}
    extra = [files.get(v, v) for v in extra]
    assert _restore(run, tmp_path, *extra, "--out", str(tmp_path / "o.npy")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


# bench.inverse.demo_section (panels, classifier accuracy on the true digits against a logistic
# regression fitted in the test) is checked end to end by test_cli_train.test_demo_quick_writes_report.
