"""Minority guidance with a trained minority classifier (Um et al., "Don't Play Favorites"): the
minority score against its closed form for a Gaussian with the exact denoiser, its ranking on a
mixture with a rare component, the quantile levels, training on the levels and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scorekit.analytic import GaussianMixture, gaussian
from scorekit.cli import main
from scorekit.guidance import minority_levels, minority_score

TINY = json.dumps({"hidden": 16, "depth": 1, "emb_dim": 16})


def _expected_gaussian(x0, m, v, s):
    """E_z |D(x0 + s z) - x0|^2 for N(m, v I) with D(x) = m + v / (v + s^2) (x - m), written out:
    D - x0 = -s^2 / (v + s^2) (x0 - m) + v s / (v + s^2) z."""
    d = x0.shape[1]
    a = s * s / (v + s * s)
    return a * a * (x0 - m).square().sum(1) + d * (v * s / (v + s * s)) ** 2


def test_minority_score_is_the_gaussian_closed_form():
    d, v, s = 3, 0.7, 1.3
    m = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    p = gaussian(m, v * torch.eye(d, dtype=torch.float64))
    x0 = p.sample(6, torch.Generator().manual_seed(0))
    x0[0] = m + 3.0  # a point far out in the tail
    got = minority_score(p, x0, sigma=s, draws=4000, seed=1)
    exact = _expected_gaussian(x0, m, v, s)
    # 4000 draws: the Monte Carlo relative error of the mean is ~ 1.5% here
    torch.testing.assert_close(got, exact, rtol=0.06, atol=0.0)
    assert int(got.argmax()) == 0  # the tail point scores highest
    # The average over x0 ~ N(m, v I) is d v s^2 / (v + s^2).
    many = minority_score(p, p.sample(4000, torch.Generator().manual_seed(2)), sigma=s, draws=1)
    assert abs(float(many.mean()) / (d * v * s * s / (v + s * s)) - 1) < 0.05


def test_minority_score_rows_do_not_depend_on_the_batch():
    p = gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    x0 = p.sample(7, torch.Generator().manual_seed(0))
    a = minority_score(p, x0, sigma=0.5, draws=3, seed=5, batch=512)
    b = minority_score(p, x0, sigma=0.5, draws=3, seed=5, batch=2)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    c = minority_score(p, x0[3:], sigma=0.5, draws=3, seed=5)
    assert not torch.allclose(
        a[3:], c
    )  # row i's noise is tied to (seed, i): a new index, new noise


def test_rare_component_scores_higher_and_fills_the_top_level():
    # 90% / 10% mixture, well separated: the exact denoiser pulls rare points to the common mode.
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    covs = 0.25 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
    p = GaussianMixture(means, covs, torch.tensor([0.9, 0.1], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    common = means[0] + 0.5 * torch.randn(900, 2, generator=g, dtype=torch.float64)
    rare = means[1] + 0.5 * torch.randn(100, 2, generator=g, dtype=torch.float64)
    x0 = torch.cat([common, rare])
    scores = minority_score(p, x0, sigma=2.0, draws=5)
    assert float(scores[900:].mean()) > 2 * float(scores[:900].mean())
    labels, edges = minority_levels(scores, 5)
    top = labels == 4
    assert int(top.sum()) == 200 and edges.shape == (4,)
    # the top fifth holds most of the rare points (10% of the data, 50% of the top level)
    assert float(top[900:].float().mean()) > 0.8


def test_minority_levels_are_quantile_bins():
    n, L = 1000, 8
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels, _ = minority_levels(scores, L)
    rank = torch.argsort(torch.argsort(scores))  # 0 = the smallest score
    torch.testing.assert_close(labels, rank * L // n)  # 125 points per level, in score order
    assert torch.bincount(labels, minlength=L).tolist() == [n // L] * L
    # all ties: every score equals every edge, so all sit in level 0
    assert minority_levels(torch.ones(10), 3)[0].tolist() == [0] * 10


def test_minority_errors_are_one_line():
    p = gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    cases = [
        (lambda: minority_score(p, x0, sigma=0.0), "sigma"),
        (lambda: minority_score(p, x0, sigma=1.0, draws=0), "draws"),
        (
            lambda: minority_score(p, torch.zeros(4), sigma=1.0),
            "x0 must be a float tensor [N, ...]",
        ),
        (lambda: minority_score(p, x0 * float("nan"), sigma=1.0), "x0 must be finite"),
        (lambda: minority_levels(torch.rand(10), 1), "levels"),
        (lambda: minority_levels(torch.rand(3), 5), "3 points cannot fill levels=5"),
        (lambda: minority_levels(torch.tensor([1.0, float("inf")]), 2), "scores must be finite"),
        (lambda: minority_levels(torch.arange(5), 2), "scores must be a 1-D float tensor"),
    ]
    for call, text in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert text in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_train_classifier_on_given_labels_keeps_the_datas_holdout(tmp_path):
    from scorekit.data import holdout_mask, load
    from scorekit.train.classifier import load_classifier, train_classifier

    ds = load("moons")
    labels = (ds.x[:, 0] > float(ds.x[:, 0].median())).long()  # left / right half, not the moons
    rec = train_classifier("moons", tmp_path / "c", steps=150, hidden=32, depth=1, labels=labels,
                           label_info={"kind": "minority", "levels": 2})  # fmt: skip
    assert rec["labels"] == {"kind": "minority", "levels": 2}
    test = holdout_mask(ds, holdout=0.2, seed=0)  # the moons' own stratified split
    net = load_classifier(tmp_path / "c")
    with torch.no_grad():
        pred = net(ds.x[test], torch.full((int(test.sum()),), 0.05)).argmax(1)
    assert float((pred == labels[test]).float().mean()) > 0.9  # chance: 0.5
    with pytest.raises(ValueError, match=r"^labels must be int64 \[N\] = \[20000\]"):
        train_classifier("moons", tmp_path / "d", steps=1, labels=labels[:5])


def test_cli_minority_classifier_steers_a_conditional_runs_uncond_branch(tmp_path, capsys):
    run, clf = tmp_path / "run", tmp_path / "clf"
    assert main(["train", "--data", "moons", "--out", str(run), "--steps", "20", "--batch", "64",
                 "--cond", "--net", TINY, "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    assert main(["train-classifier", "--minority-of", str(run), "--levels", "4", "--out", str(clf),
                 "--steps", "20", "--hidden", "16", "--depth", "1", "--minority-sigma", "1.0",
                 "--minority-draws", "2", "--threads", "1", "--no-progress"]) == 0  # fmt: skip
    record = json.loads((clf / "classifier.json").read_text())
    info = record["labels"]
    assert info["kind"] == "minority" and info["levels"] == 4 and info["sigma"] == 1.0
    assert record["config"]["num_classes"] == 4 and len(info["edges"]) == 3
    # the levels are the quantile bins of minority_score under the run's label-dropped branch
    from scorekit.data import load
    from scorekit.runs import load_run

    den, _ = load_run(run)
    ds = load("moons")
    u = lambda x, s: den(x, s, class_labels=torch.full((x.shape[0],), -1))  # noqa: E731
    scores = minority_score(u, ds.x, sigma=1.0, draws=2, seed=0)
    edges = torch.quantile(scores.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    np.testing.assert_allclose(info["edges"], edges.numpy(), rtol=1e-5)
    capsys.readouterr()
    out = tmp_path / "rare.npy"
    assert main(["sample", "--run", str(run), "--n", "4", "--nfe", "4", "--sampler", "euler",
                 "--guidance", "classifier", "--classifier", str(clf), "--label", "3", "--scale",
                 "2", "--no-progress", "--threads", "1", "--out", str(out)]) == 0  # fmt: skip
    assert "4.0 network + 4.0 classifier" in capsys.readouterr().err
    assert np.isfinite(np.load(out)).all()
    assert main(["sample", "--run", str(run), "--n", "4", "--nfe", "4", "--guidance", "classifier",
                 "--classifier", str(clf), "--label", "4", "--out", str(out)]) == 2  # fmt: skip
    assert "label" in capsys.readouterr().err
    assert main(["train-classifier", "--data", "moons", "--levels", "3", "--out", str(clf)]) == 2
    assert "--levels / --minority-sigma / --minority-draws need --minority-of" in (
        capsys.readouterr().err
    )
    assert main(["train-classifier", "--minority-of", str(run), "--levels", "1", "--out",
                 str(clf)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--levels" in err and len(err.strip().splitlines()) == 1, err


def test_trained_minority_classifier_lowers_the_exact_log_density(tmp_path):
    """End to end on an exact 90% / 10% mixture: scores with the exact denoiser, 4 levels, the
    classifier trained by train_classifier on them, classifier guidance to the top level."""
    from scorekit.data import load
    from scorekit.guidance import classifier_guidance
    from scorekit.samplers import REGISTRY
    from scorekit.train.classifier import load_classifier, train_classifier

    means = torch.tensor([[-1.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    covs = torch.stack([0.3 * torch.eye(2), 0.1 * torch.eye(2)]).double()
    weights = torch.tensor([0.9, 0.1], dtype=torch.float64)
    raw = GaussianMixture(means, covs, weights).sample(4000, torch.Generator().manual_seed(0))
    np.save(tmp_path / "mix.npy", raw.numpy())
    ds = load(tmp_path / "mix.npy")  # normalised per feature: x = (raw - shift) / scale
    norm = ds.normalization
    shift = torch.tensor(norm.shift, dtype=torch.float64)
    scale = torch.tensor(norm.scale, dtype=torch.float64)
    q = GaussianMixture((means - shift) / scale, covs / (scale[:, None] * scale[None, :]), weights)
    labels, _ = minority_levels(minority_score(q, ds.x.double(), sigma=1.0, draws=4), 4)
    train_classifier(str(tmp_path / "mix.npy"), tmp_path / "c", steps=300, hidden=32, depth=2,
                     labels=labels, label_info={"kind": "minority", "levels": 4})  # fmt: skip
    log_p = load_classifier(tmp_path / "c", label=3)
    sig = torch.cat([torch.logspace(1, -2, 24, dtype=torch.float64), torch.zeros(1)])
    x = 10.0 * torch.randn(512, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logp, rare = [], []
    for w in (0.0, 2.0):
        den = classifier_guidance(q, lambda x, s: log_p(x.float(), s.float()).double(), w)
        out = REGISTRY["heun"](den, x, sig)
        logp.append(float(q.log_prob(out).mean()))
        rare.append(float(q.responsibilities(out, 0.0)[:, 1].mean()))
    # unguided: the exact sampler's share of the rare component (0.1) and mean log-density
    assert abs(rare[0] - 0.1) < 0.05, rare
    # guided to the top level: lower exact log-density (measured: -2.3 -> -4.9 nats) and more of
    # the rare component (0.13 -> 0.22; the top level also holds the common component's tails)
    assert logp[1] < logp[0] - 1.0 and rare[1] > rare[0] + 0.05, (rare, logp)
