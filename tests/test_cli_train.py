"""`scorekit train`, `scorekit sample` and `scorekit demo` end to end (tiny networks, few steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scorekit.cli import main
from scorekit.data import Normalization
from scorekit.runs import load_run
from scorekit.samplers import sample

TINY = json.dumps({"hidden": 16, "depth": 1, "emb_dim": 16})
TINY_UNET = json.dumps({"base_channels": 8, "num_res_blocks": 1, "attn_resolutions": []})


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    g = np.random.default_rng(0)
    path = root / "points.csv"
    pts = np.array([10.0, -5.0]) + np.array([3.0, 0.5]) * g.standard_normal((500, 2))
    np.savetxt(path, pts, delimiter=",", header="a,b", comments="")
    run = root / "run"
    rc = main(["train", "--data", str(path), "--out", str(run), "--steps", "8", "--batch", "32",
               "--net", TINY, "--sample-every", "4", "--log-every", "4", "--no-progress"])  # fmt: skip
    assert rc == 0
    return run


def test_train_writes_run_and_periodic_pictures(vector_run):
    assert (vector_run / "samples" / "step_000000004.png").stat().st_size > 1000
    assert (vector_run / "samples" / "step_000000008.png").exists()
    assert (vector_run / "loss.png").exists()
    rows = [json.loads(ln) for ln in (vector_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]


def test_sample_npy_is_decoded_and_per_sample_seeded(vector_run, tmp_path):
    out7, out3 = tmp_path / "a.npy", tmp_path / "b.npy"
    common = [
        "--run",
        str(vector_run),
        "--nfe",
        "4",
        "--sampler",
        "euler",
        "--seed",
        "3",
        "--no-progress",
    ]
    assert main(["sample", *common, "--n", "7", "--batch", "2", "--out", str(out7)]) == 0
    assert main(["sample", *common, "--n", "3", "--out", str(out3)]) == 0
    a, b = np.load(out7), np.load(out3)
    assert a.shape == (7, 2) and a.dtype == np.float32
    np.testing.assert_allclose(a[:3], b, rtol=1e-5, atol=1e-5)  # sample i depends on (seed, i) only
    # Independently: the same samples from the sampler entry point, decoded by the data's map.
    denoiser, info = load_run(vector_run)
    smax = min(80.0, 20 * info["sigma_data"])  # where draw() starts (see scorekit.runs.draw)
    with torch.no_grad():  # and it ends on sample()'s default grid (sigma_min not given)
        x = sample(denoiser, (7, 2), nfe=4, sampler="euler", sigma_max=smax, seed=3)
    expected = Normalization.from_dict(info["normalization"]).decode(x).numpy()
    np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-4)
    assert abs(a[:, 0].mean() - 10) < 8  # data units (the data has mean (10, -5)), not normalised


def test_sample_png_and_errors(vector_run, tmp_path, capsys):
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(vector_run), "--n", "50", "--nfe", "4", "--sampler",
                 "euler", "--out", str(png), "--no-progress"]) == 0  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    base = ["sample", "--run", str(vector_run), "--n", "2", "--nfe", "4"]
    assert main([*base, "--out", str(tmp_path / "x.txt")]) == 2
    assert "must end in .npy or .png" in capsys.readouterr().err
    assert main([*base, "--label", "1", "--out", str(tmp_path / "x.npy")]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path), "--n", "2", "--out", str(png)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "2"]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_image_run_samples_in_the_datas_own_layout(tmp_path):
    run = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--out", str(run), "--steps", "2", "--batch", "16",
                 "--net", TINY_UNET, "--no-progress"]) == 0  # fmt: skip
    npy, png = tmp_path / "d.npy", tmp_path / "d.png"
    common = ["sample", "--run", str(run), "--n", "4", "--nfe", "3", "--sampler", "euler",
              "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(npy)]) == 0
    assert main([*common, "--out", str(png)]) == 0
    # scikit-learn's digits are 8x8 images without a channel axis: the .npy keeps that layout.
    assert np.load(npy).shape == (4, 8, 8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def moons_cond_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cond") / "run"
    net = json.dumps({"hidden": 64, "depth": 2, "emb_dim": 32})
    assert main(["train", "--data", "moons", "--out", str(run), "--steps", "300", "--batch", "256",
                 "--cond", "--label-dropout", "0.2", "--lr", "3e-3", "--warmup", "50", "--ema", "0.98",
                 "--net", net, "--ckpt-every", "1000", "--no-progress"]) == 0  # fmt: skip
    return run


@pytest.mark.slow
def test_guided_sampling_lands_in_the_labelled_class(moons_cond_run, tmp_path):
    from scorekit.data import load

    def draw(name, *extra):
        out = tmp_path / f"{name}.npy"
        assert main(["sample", "--run", str(moons_cond_run), "--n", "400", "--nfe", "10",
                     "--seed", "5", "--no-progress", "--out", str(out), *extra]) == 0  # fmt: skip
        return np.load(out)

    # Guidance scale 1 is the conditional denoiser: the same samples as --label alone, same seed.
    np.testing.assert_allclose(draw("g1", "--label", "1", "--guidance", "1"), draw("c1", "--label", "1"),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    # The class of a sample is the class of its nearest data point (the two moons, in data units).
    moons = load("moons")
    some = np.random.default_rng(0).permutation(len(moons.x))[:4000]
    pts = moons.normalization.decode(moons.x).numpy()[some]
    labels = moons.labels.numpy()[some]

    def share_of_class(x, y):
        nearest = ((x[:, None, :] - pts[None, :, :]) ** 2).sum(-1).argmin(1)
        return float((labels[nearest] == y).mean())

    unlabelled = draw("u")
    assert 0.3 < share_of_class(unlabelled, 1) < 0.7  # both moons, about evenly
    for y in (0, 1):
        assert share_of_class(draw(f"c{y}", "--label", str(y)), y) > 0.9
        assert share_of_class(draw(f"g{y}", "--label", str(y), "--guidance", "3"), y) > 0.9
    assert main(["sample", "--run", str(moons_cond_run), "--n", "2", "--label", "2",
                 "--out", str(tmp_path / "x.npy")]) == 2  # fmt: skip


@pytest.mark.slow
def test_demo_quick_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--out", str(out), "--ring-steps", "30", "--digits-steps", "3",
               "--digits-net", TINY_UNET, "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"Report: {out / 'report.md'}" in printed
    rep = json.loads((out / "report.json").read_text())
    r, d = rep["ring"], rep["digits"]
    # The ring figures against an independent sliced W2: the 2-D directions integrated by a
    # 720-angle midpoint rule (not scorekit.metrics' 256 random ones), on the run's 10,000 samples
    # (seed 12345, NFE 10, dpmpp_2m: sample i depends only on the seed) and the exact samples (seeds 1, 2).
    from scorekit.analytic import target
    from scorekit.runs import decode, generate, load_run

    def sw2(a, b):
        ang = np.pi * (np.arange(720) + 0.5) / 720
        dirs = np.stack([np.cos(ang), np.sin(ang)])
        pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
        return float(np.sqrt(((pa - pb) ** 2).mean()))

    den, info = load_run(out / "ring_run")
    x = generate(
        den, info, 10_000, batch=10_000, progress=False, nfe=10, sampler="dpmpp_2m", seed=12345
    )
    gen = decode(x, info).astype(np.float64)
    ring8 = target("ring8")
    ref, ref2 = (ring8.sample(10_000, torch.Generator().manual_seed(k)).numpy() for k in (1, 2))
    sw, floor = sw2(gen, ref), sw2(ref2, ref)
    assert r["sw2"] == pytest.approx(sw, rel=0.1) and r["sw2_floor"] == pytest.approx(
        floor, rel=0.15
    )
    assert r["ratio"] == pytest.approx(sw / floor, rel=0.25) and r["steps"] == 30
    # Digits: the steps asked for, and one predicted class per generated digit, as many generated
    # digits as training images (80% of scikit-learn's 1797).
    assert d["steps"] == 3 and sum(d["class_histogram"]) == 1797 - round(0.2 * 1797)
    assert d["fd_floor"] > 0 and 0.1 <= d["confidence"] <= 1
    for name in ("ring_samples", "ring_real_vs_generated", "ring_loss", "digits_samples",
                 "digits_real_vs_generated", "digits_loss"):  # fmt: skip
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert "FD-digits" in (out / "report.md").read_text()
    # The extras drawn from the (conditional) digits run: a grid per guidance rule and a panel per
    # inverse task, each named in report.md; the classifier's accuracy on the true digits of each
    # task is that of a logistic regression fitted here on the same real training pixels.
    md = (out / "report.md").read_text()
    for rule in rep["guidance"]:
        assert (out / f"guidance_{rule}.png").stat().st_size > 1000, rule
    assert {"cond", "cfg", "apg"} <= set(rep["guidance"])
    from sklearn.linear_model import LogisticRegression

    from scorekit import data as sdata

    tr, te = sdata.split(sdata.load("digits"), holdout=0.2, seed=0)
    pix = lambda ds: ds.normalization.decode(ds.x).reshape(len(ds.x), -1).double().numpy()  # noqa: E731
    judge = LogisticRegression(max_iter=3000).fit(pix(tr), tr.labels)
    truth_acc = float((judge.predict(pix(te)[:4]) == np.asarray(te.labels[:4])).mean())
    for spec, row in rep["inverse"].items():
        name = f"inverse_{spec.split(':')[0]}.png"
        assert (out / name).stat().st_size > 1000 and name in md, spec
        assert row["solver"] == "ddnm" and row["accuracy_truth"] == pytest.approx(truth_acc)


def test_every_option_survives_torchrun_or_has_a_spelling_that_does():
    # torchrun parses the whole command line with abbreviations allowed, so an option of ours that is
    # a prefix of one of its own (--run of --run-path, --n of --nnodes ...) is taken or rejected by it.
    # Every option must have a spelling that reaches scorekit intact, and the README's forms must.
    from torch.distributed.run import get_args_parser

    from scorekit.cli import build_parser

    theirs = [s for a in get_args_parser()._actions for s in a.option_strings]
    (sub,) = [a for a in build_parser()._actions if isinstance(getattr(a, "choices", None), dict)]
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest == "help" or not action.option_strings:  # positionals pass through
                continue
            safe = [s for s in action.option_strings if not any(t.startswith(s) for t in theirs)]
            assert safe, f"scorekit {name} {action.option_strings}: every spelling is torchrun's"
    for cmd in (
        ["train", "--data", "digits", "--out", "runs/ddp", "--steps", "2000"],
        ["sample", "--run-dir", "runs/ddp", "--num-samples", "1000", "--out", "s.npy"],
    ):
        parsed = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "scorekit", *cmd])
        assert parsed.module and parsed.training_script == "scorekit"
        assert parsed.training_script_args == cmd
    args = build_parser().parse_args(cmd)
    assert (args.run, args.n) == ("runs/ddp", 1000)
