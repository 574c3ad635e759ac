"""``scorekit train --init RUN`` (fine-tuning): the new run starts from the other run's stored EMA
weights, counts its own steps, resumes bitwise like any run, and refuses a run it cannot start from
with a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scorekit.train import TrainConfig, train
from scorekit.train import checkpoint as ckpt

TINY = {"hidden": 32, "depth": 1, "emb_dim": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2-D and 3-D Gaussian data files, and a run trained 20 steps on the 2-D one."""
    root = tmp_path_factory.mktemp("ws")
    g = np.random.default_rng(0)
    np.save(root / "d2.npy", g.standard_normal((512, 2)).astype(np.float32))
    np.save(root / "d3.npy", g.standard_normal((512, 3)).astype(np.float32))
    cfg = TrainConfig(data=str(root / "d2.npy"), out=str(root / "base"), steps=20, batch=64,
                      ckpt_every=20, net=TINY)  # fmt: skip
    train(cfg, progress=False, threads=1)
    return root


def _cfg(root, name, **kw):
    base = dict(data=str(root / "d2.npy"), out=str(root / name), batch=64, ckpt_every=100,
                net=TINY, init=str(root / "base"))  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _tensors(run_dir):
    return ckpt.load(ckpt.latest(run_dir))[0]


def test_init_starts_from_the_other_runs_ema(data):
    # One step at a vanishing learning rate: the weights are the base run's stored EMA (not its raw
    # weights, which differ), and the new run counts its own steps from 0.
    train(_cfg(data, "ft", steps=1, lr=1e-12, warmup=0), progress=False, threads=1)
    base, ft = _tensors(data / "base"), _tensors(data / "ft")
    assert ckpt.load(ckpt.latest(data / "ft"))[1]["step"] == 1
    assert any((base["model"][k] - base["ema"][k]).abs().max() > 1e-4 for k in base["ema"])
    for k, w in base["ema"].items():
        torch.testing.assert_close(ft["model"][k], w, atol=1e-9, rtol=0)
        torch.testing.assert_close(ft["ema"][k], w, atol=1e-9, rtol=0)


def test_a_fine_tuned_run_resumes_bitwise(data):
    # 6 steps straight against 4 steps, then --resume to 6: resuming uses the run's own checkpoint,
    # not the --init weights again.
    train(_cfg(data, "straight", steps=6), progress=False, threads=1)
    train(_cfg(data, "split", steps=4, ckpt_every=4), progress=False, threads=1)
    train(_cfg(data, "split", steps=6, ckpt_every=4), resume=True, progress=False, threads=1)
    a, b = _tensors(data / "straight"), _tensors(data / "split")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"data": "d3"}, r"--init: .* data of shape \[2\], this run's data has shape \[3\]"),
        ({"net": {**TINY, "hidden": 48}}, r"--init: --net \{'hidden': 48\} differs"),
        ({"init": "missing"}, r"--init: '.*missing' is not a folder"),
        ({"init": "empty"}, r"--init: '.*empty' holds no complete checkpoint"),
        (
            {"process": "flow", "param": "flow"},
            r"--init: .* trained with --process edm, this run has --process flow",
        ),
        ({"param": "eps"}, r"--init: .* trained with --param edm, this run has --param eps"),
        (
            {"init": "base/checkpoints/step_000000099"},
            r"--init: .*step_000000099 is not a readable checkpoint",
        ),
    ],
)
def test_init_errors(data, kw, match):
    (data / "empty").mkdir(exist_ok=True)
    if "data" in kw:
        kw = {**kw, "data": str(data / f"{kw['data']}.npy")}
    if "init" in kw:
        kw = {**kw, "init": str(data / kw["init"])}
    with pytest.raises(ValueError, match=match):
        train(_cfg(data, "bad", steps=1, **kw), progress=False, threads=1)


def test_init_must_be_a_folder_name(data):
    with pytest.raises(ValueError, match=r"--init must name a run or checkpoint folder; got ''"):
        train(_cfg(data, "bad3", steps=1, init=""), progress=False, threads=1)


def test_init_refuses_a_conditional_mismatch(data):
    # moons is 2-D like the base run's data, but labelled: --cond needs a conditional run to start from
    with pytest.raises(ValueError, match=r"--init: .*num_classes=0, this run needs 2"):
        train(_cfg(data, "bad2", steps=1, cond=True, data="moons"), progress=False, threads=1)
