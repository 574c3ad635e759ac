"""The training loop in one process: it learns the exact denoiser of Gaussian data, resumes bitwise,
writes its files, trains every process x parameterisation, and trains class-conditionally."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from scorekit.analytic import GaussianMixture, gaussian_approximation
from scorekit.runs import load_run
from scorekit.train import TrainConfig, train
from scorekit.train import checkpoint as ckpt

TINY = {"hidden": 32, "depth": 1, "emb_dim": 16}


@pytest.fixture(scope="module")
def gauss_npy(tmp_path_factory):
    """2-D Gaussian data N(m, diag(s^2)) in its own units (the loader standardises it)."""
    g = np.random.default_rng(0)
    x = np.array([3.0, -1.0]) + np.array([2.0, 0.5]) * g.standard_normal((4096, 2))
    path = tmp_path_factory.mktemp("data") / "gauss.npy"
    np.save(path, x.astype(np.float32))
    return str(path)


def _cfg(tmp_path, data, **kw):
    base = dict(
        data=data, out=str(tmp_path / "run"), batch=64, log_every=5, ckpt_every=10, net=TINY
    )
    return TrainConfig(**{**base, **kw})


def _tensors(run_dir):
    return ckpt.load(ckpt.latest(run_dir))[0]


@pytest.fixture(scope="module")
def mixture_npy(tmp_path_factory):
    """2-D two-component Gaussian mixture, in its own units (the loader standardises it)."""
    g = np.random.default_rng(0)
    comp = g.integers(0, 2, 4096)
    x = MEANS[comp] + STDS * g.standard_normal((4096, 2))
    path = tmp_path_factory.mktemp("data") / "mixture.npy"
    np.save(path, x.astype(np.float32))
    return str(path)


MEANS, STDS = np.array([[1.5, 0.0], [-1.5, 0.0]]), np.array([0.5, 0.8])


@pytest.mark.slow
@pytest.mark.parametrize("process,param", [("edm", "edm"), ("flow", "flow"), ("vp", "eps")])
def test_learns_the_exact_mixture_denoiser(tmp_path, mixture_npy, process, param):
    # The exact E[x0 | x] of the mixture (scorekit.analytic, in the loader's standardised units) is the
    # reference; the best *linear* denoiser (Gaussian approximation) is far from it, so passing needs
    # a learned bimodal posterior mean, not just the right scale.
    cfg = _cfg(
        tmp_path,
        mixture_npy,
        steps=350,
        batch=256,
        process=process,
        param=param,
        ema=0.98,
        lr=3e-3,
        ckpt_every=1000,
        net={"hidden": 64, "depth": 2, "emb_dim": 32},
    )
    train(cfg, progress=False)
    denoiser, info = load_run(cfg.out)
    shift = torch.tensor(info["normalization"]["shift"], dtype=torch.float64)
    scale = torch.tensor(info["normalization"]["scale"], dtype=torch.float64)
    covs = (torch.tensor(STDS) ** 2).expand(2, 2) / scale**2
    exact = GaussianMixture((torch.tensor(MEANS) - shift) / scale, covs)
    linear = gaussian_approximation(exact.sample(100_000, torch.Generator().manual_seed(3)))
    x0 = exact.sample(2000, torch.Generator().manual_seed(1))
    for s in (0.3, 0.6, 1.0, 3.0):
        xs = x0 + s * torch.randn(
            x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
        )
        want = exact.denoise(xs, s)
        got = denoiser(xs.float(), torch.full((len(xs),), s)).double()
        err = (got - want).square().sum(1).mean().sqrt().item()
        err_linear = (linear.denoise(xs, s) - want).square().sum(1).mean().sqrt().item()
        # At sigma = 3 the posterior mean is nearly linear; below it is bimodal.
        assert err < 0.15 and (s > 2 or err < 0.5 * err_linear), (
            process,
            param,
            s,
            err,
            err_linear,
        )


def test_resume_after_lost_steps_is_bitwise(tmp_path, gauss_npy):
    straight = _cfg(tmp_path / "a", gauss_npy, steps=25, ckpt_every=10, ema=0.9)
    train(straight, progress=False)
    # A run that got to step 17 and "died": its last checkpoint is step 10; steps 11-17 are lost.
    broken = _cfg(tmp_path / "b", gauss_npy, steps=17, ckpt_every=10, ema=0.9)
    train(broken, progress=False)
    shutil.rmtree(ckpt.latest(broken.out))
    assert ckpt.latest(broken.out).name == "step_000000010"
    broken.steps = 25
    res = train(broken, resume=True, progress=False)
    assert res.step == 25
    a, b = _tensors(straight.out), _tensors(broken.out)
    for group in ("model", "ema", "optim"):
        assert a[group].keys() == b[group].keys()
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    # The log was cut back to step 10 and continued: one row per 5 steps, no duplicates.
    steps = [json.loads(ln)["step"] for ln in open(tmp_path / "b" / "run" / "log.jsonl")]
    assert steps == [5, 10, 15, 20, 25]


def test_run_folder_and_log(tmp_path, gauss_npy):
    cfg = _cfg(tmp_path, gauss_npy, steps=12, log_every=4, ckpt_every=5)
    res = train(cfg, progress=False)
    run = tmp_path / "run"
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert set(rows[0]) == {"step", "loss", "lr", "it_s", "time"}
    assert rows[0]["lr"] == pytest.approx(2e-3 * 4 / 100)  # linear warm-up over 100 steps
    assert (run / "loss.png").stat().st_size > 1000
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["steps"] == 12 and saved["data"]["shape"] == [2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000000010",
        "step_000000012",
    ]
    _, state = ckpt.load(ckpt.latest(run))
    assert state["step"] == 12 and state["data_order"]["pos"] == (12 * 64) % 4096
    assert {"torch"} <= set(state["rng"]) and state["data"]["normalization"]["layout"] == "vector"
    assert res.step == 12 and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize(
    "process,param",
    [
        ("edm", "edm"),
        ("vp", "eps"),
        ("vp", "v"),
        ("vp_cosine", "x0"),
        ("flow", "flow"),
        ("ve", "edm"),
        ("vp", "score"),
        ("ddpm", "eps"),
    ],
)
def test_every_process_and_parameterization_trains(tmp_path, gauss_npy, process, param):
    res = train(_cfg(tmp_path, gauss_npy, steps=6, process=process, param=param), progress=False)
    assert res.step == 6 and np.isfinite(res.log[-1]["loss"])
    denoiser, info = load_run(tmp_path / "run")
    assert info["process"] == process and info["sigma_min"] < info["sigma_max"]
    out = denoiser(torch.randn(5, 2), torch.full((5,), 0.5))
    assert out.shape == (5, 2) and torch.isfinite(out).all()


def test_conditional_training_with_label_dropout(tmp_path):
    cfg = TrainConfig(
        data="moons",
        out=str(tmp_path / "run"),
        steps=5,
        batch=32,
        cond=True,
        label_dropout=0.5,
        net=TINY,
    )
    train(cfg, progress=False)
    denoiser, info = load_run(cfg.out)
    assert info["num_classes"] == 2
    x, s = torch.randn(4, 2), torch.full((4,), 1.0)
    a = denoiser(x, s, class_labels=torch.tensor([0, 0, 1, 1]))
    b = denoiser(x, s, class_labels=torch.tensor([-1, -1, -1, -1]))
    assert a.shape == b.shape == (4, 2) and not torch.equal(a, b)


def test_errors(tmp_path, gauss_npy):
    with pytest.raises(ValueError, match="run length"):
        train(TrainConfig(data=gauss_npy, out=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="labelled"):
        train(_cfg(tmp_path, gauss_npy, steps=2, cond=True), progress=False)
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="lr"):
        train(_cfg(tmp_path, gauss_npy, steps=2, lr=-1.0), progress=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_run(tmp_path / "nothing")


def test_minutes_limit_counts_training_time_over_resumes(tmp_path, gauss_npy):
    cfg = _cfg(tmp_path, gauss_npy, minutes=0.01, ckpt_every=10**6)  # 0.6 s
    res = train(cfg, progress=False)
    _, state = ckpt.load(ckpt.latest(cfg.out))
    assert res.step > 0 and 0.6 <= state["elapsed"] < 5.0
    cfg.minutes = 0.02  # 1.2 s in all: about another 0.6 s
    res2 = train(cfg, resume=True, progress=False)
    _, state2 = ckpt.load(ckpt.latest(cfg.out))
    assert res2.step > res.step and 1.2 <= state2["elapsed"] < 6.0


def test_diverging_loss_is_a_clear_error_and_not_checkpointed(tmp_path, gauss_npy):
    cfg = _cfg(tmp_path, gauss_npy, steps=20, lr=1e30, warmup=0, log_every=10, ckpt_every=3)
    with pytest.raises(FloatingPointError, match=r"not finite|training loss is"):
        train(cfg, progress=False)
    folder = ckpt.latest(cfg.out)
    if folder is not None:  # whatever was saved holds finite weights only
        for t in ckpt.load(folder)[0]["model"].values():
            assert torch.isfinite(t).all()
