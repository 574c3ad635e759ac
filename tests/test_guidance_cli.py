"""``scorekit sample --guidance RULE``: every rule on a tiny conditional run trained here, checked
against the formulas written out in the test and against identities of the rules; the one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from scorekit.cli import main
from scorekit.data import Normalization
from scorekit.runs import load_run
from scorekit.samplers import sample

TINY = json.dumps({"hidden": 16, "depth": 1, "emb_dim": 16})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guide")
    cond = root / "cond"
    assert main(["train", "--data", "moons", "--out", str(cond), "--steps", "40", "--batch", "64",
                 "--cond", "--net", TINY, "--ckpt-every", "20", "--log-every", "20",
                 "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    pts = np.random.default_rng(0).standard_normal((64, 3))
    np.savetxt(root / "p3.csv", pts, delimiter=",", header="a,b,c", comments="")
    other = root / "other"
    assert main(["train", "--data", str(root / "p3.csv"), "--out", str(other), "--steps", "2",
                 "--batch", "16", "--net", TINY, "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    return {"cond": cond, "other": other, "root": root}


def _draw(run, tmp_path, name, *extra, n=6, capsys=None):
    out = tmp_path / f"{name}.npy"
    rc = main(["sample", "--run", str(run), "--n", str(n), "--nfe", "6", "--sampler", "euler",
               "--seed", "4", "--no-progress", "--threads", "1", "--out", str(out), *extra])  # fmt: skip
    assert rc == 0
    return np.load(out)


def _by_hand(run, d_of, n=6):
    """Samples of ``d_of(den)`` (a denoiser written here) with the CLI's sampler, seed and range."""
    den, info = load_run(run)
    smax = min(80.0, 20 * info["sigma_data"])
    with torch.no_grad():
        x = sample(d_of(den), (n, 2), nfe=6, sampler="euler", sigma_max=smax, seed=4)
    return Normalization.from_dict(info["normalization"]).decode(x).numpy()


def _lab(den, y):
    return lambda x, s: den(x, s, class_labels=torch.full((x.shape[0],), y))


def test_cfg_by_name_is_the_formula_and_a_number_is_cfg(runs, tmp_path, capsys):
    run = runs["cond"]
    got = _draw(run, tmp_path, "cfg3", "--label", "1", "--guidance", "cfg", "--scale", "3")
    assert "evaluations per sample: 12.0 network" in capsys.readouterr().err  # 6 calls x 2 models

    def cfg3(den):
        c, u = _lab(den, 1), _lab(den, -1)
        return lambda x, s: u(x, s) + 3.0 * (c(x, s) - u(x, s))  # Ho & Salimans, denoiser form

    np.testing.assert_allclose(got, _by_hand(run, cfg3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_draw(run, tmp_path, "num3", "--label", "1", "--guidance", "3"), got)
    one = _draw(run, tmp_path, "cfg1", "--label", "1", "--guidance", "cfg", "--scale", "1")
    np.testing.assert_allclose(
        one, _draw(run, tmp_path, "c1", "--label", "1"), rtol=1e-5, atol=1e-5
    )


def test_apg_without_its_changes_is_cfg_and_state_is_per_pass(runs, tmp_path):
    run = runs["cond"]
    cfg4 = _draw(run, tmp_path, "cfg4", "--label", "0", "--guidance", "cfg", "--scale", "4")
    plain = json.dumps({"eta": 1.0, "momentum": 0.0})
    apg_cfg = _draw(run, tmp_path, "apgc", "--label", "0", "--guidance", "apg", "--scale", "4",
                    "--guidance-options", plain)  # fmt: skip
    np.testing.assert_allclose(apg_cfg, cfg4, rtol=1e-5, atol=1e-5)
    apg = _draw(run, tmp_path, "apg", "--label", "0", "--guidance", "apg", "--scale", "4")
    assert np.abs(apg - cfg4).max() > 1e-3
    # Momentum lives per row and per pass: chunks of 2 give the same samples as one batch of 6.
    chunked = _draw(run, tmp_path, "apg2", "--label", "0", "--guidance", "apg", "--scale", "4",
                    "--batch", "2")  # fmt: skip
    np.testing.assert_allclose(chunked, apg, rtol=1e-5, atol=1e-5)


def test_autoguidance_weak_step_and_weak_run(runs, tmp_path):
    run = runs["cond"]
    base = ["--label", "1", "--guidance", "autoguidance", "--scale", "4"]
    cond = _draw(run, tmp_path, "c", "--label", "1")
    # The newest checkpoint as the weak model is the model itself: D_w + 4 (D_c - D_w) = D_c.
    same = _draw(run, tmp_path, "same", *base, "--weak-step", "40")
    np.testing.assert_allclose(same, cond, rtol=1e-5, atol=1e-5)
    # Step 20 as the weak model, against the formula with that checkpoint loaded by load_run from a
    # copy of the run that holds only step 20.
    early = runs["root"] / "early"
    shutil.copytree(run, early)
    shutil.rmtree(early / "checkpoints" / "step_000000040")
    got = _draw(run, tmp_path, "w20", *base, "--weak-step", "20")
    np.testing.assert_allclose(_draw(run, tmp_path, "wr", *base, "--weak-run", str(early)), got)
    weak, _ = load_run(early)

    def auto(den):
        c, w = _lab(den, 1), _lab(weak, 1)
        return lambda x, s: w(x, s) + 4.0 * (c(x, s) - w(x, s))  # Karras et al. 2024, eq. 2

    np.testing.assert_allclose(got, _by_hand(run, auto), rtol=1e-5, atol=1e-5)
    assert np.abs(got - cond).max() > 1e-3


def test_other_rules_run_and_count_their_evaluations(runs, tmp_path, capsys):
    from scorekit.schedules import karras

    run = runs["cond"]
    _, info = load_run(run)
    sig = karras(7, 0.002, min(80.0, 20 * info["sigma_data"]))[:6]  # sample()'s default grid
    inside = int(((sig > 0.3) & (sig <= 1.0)).sum())  # cfg's uncond runs only there
    for rule, extra, nfe in [
        ("tcfg", [], "12.0 network"),
        ("density", ["--scale", "0.1"], "6.0 network"),
        (
            "minority",
            ["--scale", "0.1", "--guidance-options", '{"sigma_probe": 0.5}'],
            "12.0 network",
        ),
        ("cads", ["--scale", "2"], "12.0 network"),
        (
            "cfg",
            ["--scale", "2", "--guidance-options", '{"interval": [0.3, 1.0]}'],
            f"{6 + inside}.0 network",
        ),
    ]:
        x = _draw(run, tmp_path, rule, "--label", "1", "--guidance", rule, *extra)
        assert np.isfinite(x).all() and x.shape == (6, 2)
        assert f"evaluations per sample: {nfe}" in capsys.readouterr().err, rule
    _draw(run, tmp_path, "ad", "--label", "1", "--guidance", "adaptive", "--scale", "3", n=32)
    used = float(capsys.readouterr().err.split("per sample: ")[1].split()[0])
    assert 6 < used <= 12  # 6 conditional calls, and the unconditional ones it did not skip


def test_cads_hook_at_zero_noise_is_the_conditional_net(runs):
    from scorekit.guidance import cads

    den, _ = load_run(runs["cond"])
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(5, 2, generator=g), torch.tensor([0.1, 0.5, 1.0, 3.0, 20.0])
    lab = torch.full((5,), 1)
    emb = den.net.class_emb.embed(lab)
    with torch.no_grad():
        plain = den(x, s, class_labels=lab)
        torch.testing.assert_close(den(x, s, class_embedding=emb), plain)
        annealed = cads(den, emb[:1], sigma_lo=0.5, sigma_hi=5.0, noise_scale=0.0, psi=1.0,
                        key="class_embedding")(x, s)  # fmt: skip
        torch.testing.assert_close(annealed, plain, rtol=1e-5, atol=1e-6)
        noisy = cads(den, emb[:1], sigma_lo=0.5, sigma_hi=5.0, noise_scale=1.0,
                     key="class_embedding", generator=g)(x, s)  # fmt: skip
    assert torch.allclose(noisy[:2], plain[:2]) and not torch.allclose(noisy[3:], plain[3:])
    with pytest.raises(ValueError, match="class_labels or class_embedding, not both"):
        den(x, s, class_labels=lab, class_embedding=emb)
    with pytest.raises(
        ValueError, match=r"class_embedding must be a float tensor of shape \[B, emb_dim\]"
    ):
        den(x, s, class_embedding=emb[:, :3])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "5"], "--label must be in 0..1 for this run (2 classes); got 5"),
        (["--label", "-1"], "--label must be in 0..1"),
        (["--label", "1", "--guidance", "cfg", "--scale", "-1"], "--scale must be a finite number >= 0"),
        (["--label", "1", "--guidance", "apg", "--scale", "nan"], "--scale must be a finite number >= 0"),
        (["--label", "1", "--guidance", "inf"], "--guidance must be a finite number >= 0"),
        (["--label", "1", "--guidance", "magic"], "--guidance must be a number or one of cfg, apg"),
        (["--guidance", "apg"], "--guidance apg needs --label"),
        (["--label", "1", "--guidance", "apg", "--guidance-options", '{"momentun": 0}'],
         "--guidance-options: apg takes eta, norm_threshold, momentum; got momentun"),
        (["--label", "1", "--guidance", "autoguidance"], "needs the weak model: --weak-run"),
        (["--label", "1", "--guidance", "autoguidance", "--weak-step", "7"],
         "--weak-step 7: .* has no checkpoint at that step; it has steps \\[20, 40\\]"),
        (["--label", "1", "--weak-step", "20"], "--weak-run / --weak-step need --guidance autoguidance"),
        (["--label", "1", "--guidance", "classifier", "--scale", "2"], "--guidance classifier and --classifier"),
    ],
)  # fmt: skip
def test_one_line_errors(runs, tmp_path, capsys, extra, message):
    import re

    rc = main(["sample", "--run", str(runs["cond"]), "--n", "2", "--nfe", "4", "--out",
               str(tmp_path / "x.npy"), "--no-progress", *extra])  # fmt: skip
    err = capsys.readouterr().err.strip()
    found = message in err or re.search(message, err)  # literal text, or a pattern
    assert rc == 2 and len(err.splitlines()) == 1 and found, err


def test_errors_that_need_other_runs(runs, tmp_path, capsys):
    common = ["sample", "--n", "2", "--nfe", "4", "--out", str(tmp_path / "x.npy"), "--no-progress"]
    assert main([*common, "--run", str(runs["other"]), "--label", "0"]) == 2
    assert "this run is unconditional (trained without --cond)" in capsys.readouterr().err
    assert main([*common, "--run", str(runs["cond"]), "--label", "0", "--guidance", "autoguidance",
                 "--weak-run", str(runs["other"])]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert (
        "the weak model's shape is [3]; the run's is [2]" in err
        and len(err.strip().splitlines()) == 1
    )


def test_train_classifier_and_classifier_guidance(runs, tmp_path, capsys):
    from scorekit.train.classifier import load_classifier

    clf = tmp_path / "clf"
    assert main(["train-classifier", "--data", "moons", "--out", str(clf), "--steps", "150",
                 "--hidden", "32", "--depth", "1", "--threads", "1", "--no-progress"]) == 0  # fmt: skip
    assert "held-out accuracy by sigma" in capsys.readouterr().out
    # Accuracy measured here on the held-out moons at a small noise level, from the loaded module.
    from scorekit.data import load, split

    _, test = split(load("moons"), holdout=0.2, seed=0)
    net = load_classifier(clf)
    with torch.no_grad():
        pred = net(test.x.float(), torch.full((len(test.x),), 0.05)).argmax(1)
    assert float((pred == torch.as_tensor(test.labels)).float().mean()) > 0.8  # chance: 0.5
    run = runs["cond"]
    got = _draw(run, tmp_path, "cg", "--label", "1", "--guidance", "classifier", "--scale", "2",
                "--classifier", str(clf))  # fmt: skip
    assert "6.0 network + 6.0 classifier" in capsys.readouterr().err
    log_p = load_classifier(clf, label=1)

    def by_hand(den):  # D_u + w sigma^2 grad log p(y | x, sigma), Dhariwal & Nichol (sigma frame)
        def d(x, s):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(log_p(xg, s).sum(), xg)
            return _lab(den, -1)(x, s) + 2.0 * s[:, None] ** 2 * grad

        return d

    np.testing.assert_allclose(got, _by_hand(run, by_hand), rtol=1e-4, atol=1e-4)
    # A classifier of other data (digits: shape [1, 8, 8], 10 classes) is refused in one line.
    dig = tmp_path / "dclf"
    assert main(["train-classifier", "--data", "digits", "--out", str(dig), "--steps", "1",
                 "--hidden", "8", "--depth", "1", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--n", "2", "--nfe", "4", "--label", "1", "--guidance",
                 "classifier", "--classifier", str(dig), "--out", str(tmp_path / "x.npy")]) == 2  # fmt: skip
    assert "its shape is [1, 8, 8]; the run's is [2]" in capsys.readouterr().err


def test_guidance_free_training_option(tmp_path, capsys):
    run = tmp_path / "gf"
    base = ["train", "--data", "moons", "--steps", "6", "--batch", "32", "--net", TINY, "--no-progress",
            "--threads", "1"]  # fmt: skip
    assert main([*base, "--out", str(run), "--cond", "--guidance-free", "3"]) == 0
    assert load_run(run)[1]["config"]["guidance_free"] == 3
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "a"), "--cond", "--guidance-free", "0.5"]) == 2
    assert "--guidance-free must be a finite number >= 1; got 0.5" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--guidance-free", "2"]) == 2
    assert "--guidance-free needs --cond and --label-dropout > 0" in capsys.readouterr().err
