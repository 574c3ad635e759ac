"""The training loop in one process: every process x parameterisation pair and class-conditional
training learn a Gaussian mixture's denoiser to within a stated margin of the exact one (written out
here in numpy, not taken from scorekit.analytic); it resumes bitwise, writes its files, stops on its
time limit, and refuses to checkpoint a diverged run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

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


# A 2-D mixture of three isotropic Gaussians (std 0.35) in model units; components 1 and 2 form class 1,
# so class 1 is itself bimodal. Its posterior mean is far from linear at sigma ~ 0.3-1.
MEANS = np.array([[-1.2, 0.0], [1.2, 0.6], [1.2, -0.6]])
VAR, WEIGHTS, CLASS = 0.35**2, np.array([0.5, 0.25, 0.25]), np.array([0, 1, 1])
NET = {"hidden": 64, "depth": 2, "emb_dim": 32}


def _mixture_sample(n, seed):
    rng = np.random.default_rng(seed)
    k = rng.choice(3, size=n, p=WEIGHTS)
    return MEANS[k] + np.sqrt(VAR) * rng.standard_normal((n, 2)), k


def _exact_denoiser(x, sigma, comps=(0, 1, 2)):
    """E[x0 | x] of the mixture restricted to ``comps`` (renormalised), for x = x0 + sigma n:
    responsibilities r_k ~ w_k N(x; m_k, (v + sigma^2) I), E[x0 | x, k] = m_k + v / (v + sigma^2) (x - m_k)."""
    m, w = MEANS[list(comps)], WEIGHTS[list(comps)] / WEIGHTS[list(comps)].sum()
    v = VAR + sigma**2
    log_r = np.log(w)[None] - ((x[:, None, :] - m[None]) ** 2).sum(-1) / (2 * v)
    r = np.exp(log_r - log_r.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return (r[..., None] * (m[None] + VAR / v * (x[:, None, :] - m[None]))).sum(1)


def _linear_denoiser(x, sigma):
    """The best linear denoiser (the Gaussian with the mixture's mean and covariance)."""
    mu = WEIGHTS @ MEANS
    cov = VAR * np.eye(2) + sum(
        w * np.outer(m - mu, m - mu) for w, m in zip(WEIGHTS, MEANS, strict=True)
    )
    return mu + (x - mu) @ np.linalg.solve(cov + sigma**2 * np.eye(2), cov).T


def _mixture_dataset(labelled):
    from scorekit.data import Dataset, Normalization

    x, k = _mixture_sample(4096, seed=0)
    labels = torch.as_tensor(CLASS[k]) if labelled else None
    return Dataset(torch.tensor(x, dtype=torch.float32), labels, 2 if labelled else 0, "vector",
                   (2,), "mixture3", Normalization((0.0, 0.0), (1.0, 1.0), "vector"))  # fmt: skip


def _mse(denoiser, x0, sigma, seed, **cond):
    """(trained, exact, linear) MSE |D(x) - x0|^2 on held-out x = x0 + sigma n."""
    x = x0 + sigma * np.random.default_rng(seed).standard_normal(x0.shape)
    with torch.no_grad():
        d = denoiser(torch.tensor(x, dtype=torch.float32), torch.full((len(x),), sigma), **cond)
    err = lambda d: float(((d - x0) ** 2).sum(1).mean())  # noqa: E731
    return err(d.double().numpy()), err(_exact_denoiser(x, sigma)), err(_linear_denoiser(x, sigma))


def _fit(tmp_path, dataset, steps, **kw):
    cfg = TrainConfig(data="mixture3", out=str(tmp_path / "run"), steps=steps, batch=256, lr=3e-3,
                      warmup=50, ema=0.98, ckpt_every=10**6, log_every=10**6, net=NET, **kw)  # fmt: skip
    return train(cfg, dataset=dataset, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "process,param,steps",
    [
        ("edm", "edm", 300),
        ("vp", "eps", 300),
        ("vp", "v", 300),
        ("vp_cosine", "x0", 300),
        ("flow", "flow", 300),
        ("ve", "edm", 300),
        ("vp", "score", 300),
        ("ddpm", "eps", 600),  # most of DDPM's 1000 training levels are far above the data's scale
    ],
)
def test_every_process_and_parameterization_learns_the_mixture_denoiser(
    tmp_path, process, param, steps
):
    # Margin: at sigma = 0.3 and 1 the best linear denoiser's MSE is 33% and 13% above the exact
    # (Bayes) MSE; a short fit must close at least half of that gap at both levels.
    res = _fit(tmp_path, _mixture_dataset(False), steps, process=process, param=param)
    x0, _ = _mixture_sample(4000, seed=1)
    for sigma in (0.3, 1.0):
        got, exact, linear = _mse(res.denoiser, x0, sigma, seed=2)
        assert linear > 1.1 * exact  # the check means something: the denoiser is non-linear here
        assert got <= exact + 0.5 * (linear - exact), (process, param, sigma, got, exact, linear)
    denoiser, info = load_run(tmp_path / "run")  # the saved EMA weights are the returned ones
    assert info["process"] == process and info["param"] == param
    torch.testing.assert_close(denoiser(torch.zeros(3, 2), torch.ones(3)),
                               res.denoiser(torch.zeros(3, 2), torch.ones(3)))  # fmt: skip


@pytest.mark.slow
def test_conditional_training_learns_the_class_conditional_denoisers(tmp_path):
    # The exact class-conditional denoiser is the mixture restricted to the class's components. At
    # sigma = 1 and 3 it beats the exact unconditional one at least 2x on that class's points; the
    # trained conditional denoiser must come within 15% of it, and the dropped-label branch (-1)
    # within 15% of the exact unconditional MSE.
    res = _fit(tmp_path, _mixture_dataset(True), 300, cond=True, label_dropout=0.2)
    x0, k = _mixture_sample(8000, seed=1)
    for y in (0, 1):
        comps, xy = np.nonzero(CLASS == y)[0], x0[CLASS[k] == y]
        for sigma in (1.0, 3.0):
            x = xy + sigma * np.random.default_rng(2).standard_normal(xy.shape)
            labels = torch.full((len(x),), y)
            with torch.no_grad():
                d = res.denoiser(torch.tensor(x, dtype=torch.float32), torch.full((len(x),), sigma),
                                 class_labels=labels).double().numpy()  # fmt: skip
            got = ((d - xy) ** 2).sum(1).mean()
            cond = ((_exact_denoiser(x, sigma, comps) - xy) ** 2).sum(1).mean()
            uncond = ((_exact_denoiser(x, sigma) - xy) ** 2).sum(1).mean()
            assert uncond > 2 * cond and got < 1.15 * cond, (y, sigma, got, cond, uncond)
    got, exact, _ = _mse(res.denoiser, x0, 1.0, seed=3, class_labels=torch.full((len(x0),), -1))
    assert got < 1.15 * exact, (got, exact)


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
    # The run stops at the first step whose summed training time reaches the limit: the log (one row
    # per step) shows the time before the last step under it and at the last step at or past it.
    cfg = _cfg(tmp_path, gauss_npy, minutes=0.01, ckpt_every=10**6, log_every=1)  # 0.6 s
    res = train(cfg, progress=False)
    times = [r["time"] for r in res.log]
    assert res.step == len(times) > 1 and times[-2] < 0.6 <= times[-1]
    _, state = ckpt.load(ckpt.latest(cfg.out))
    assert state["elapsed"] == times[-1]
    cfg.minutes = 0.02  # 1.2 s in all: the resumed run adds time to the saved total
    res2 = train(cfg, resume=True, progress=False)
    times2 = [r["time"] for r in res2.log]
    assert res2.step == res.step + len(times2) and times2[0] > times[-1]
    both = times + times2
    assert both[-2] < 1.2 <= both[-1]


def test_diverging_loss_is_a_clear_error_and_not_checkpointed(tmp_path, gauss_npy):
    cfg = _cfg(tmp_path, gauss_npy, steps=20, lr=1e30, warmup=0, log_every=10, ckpt_every=3)
    with pytest.raises(FloatingPointError, match=r"not finite|training loss is"):
        train(cfg, progress=False)
    folder = ckpt.latest(cfg.out)
    if folder is not None:  # whatever was saved holds finite weights only
        for t in ckpt.load(folder)[0]["model"].values():
            assert torch.isfinite(t).all()
