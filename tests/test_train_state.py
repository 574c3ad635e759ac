"""EMA, checkpoints (atomic, manifest-last, verified), optimiser and RNG round trips, data order."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scorekit.train import EMA, DataOrder, ema_beta
from scorekit.train import checkpoint as ckpt


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))


# -- EMA ---------------------------------------------------------------------------------------


def test_ema_halflife_halves_weight_after_halflife_examples():
    batch, halflife = 32, 3200.0
    beta = ema_beta(halflife, batch=batch, nimg=10**9, rampup=None)
    # After halflife / batch steps the old average keeps weight beta**100 = 1/2.
    assert beta ** (halflife / batch) == pytest.approx(0.5, rel=1e-12)
    # Ramp-up: early on the half-life is rampup * nimg.
    assert ema_beta(halflife, batch=batch, nimg=6400, rampup=0.05) == pytest.approx(
        0.5 ** (batch / 320.0)
    )
    assert ema_beta(0.99, batch=batch, nimg=1) == 0.99
    with pytest.raises(ValueError, match="ema"):
        ema_beta(-1.0, batch=1, nimg=1)


def test_ema_update_is_the_average():
    net = _net()
    ema = EMA(net)
    old = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, 0.9)
    for e, o, p in zip(ema.module.parameters(), old, net.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p)
        assert not e.requires_grad
    ema.update(net, 0.0)
    for e, p in zip(ema.module.parameters(), net.parameters(), strict=True):
        assert torch.equal(e, p)


# -- checkpoints -------------------------------------------------------------------------------


def _groups(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(4, 5, generator=g), "b": torch.arange(3)}}


def test_checkpoint_round_trip_and_latest(tmp_path):
    assert ckpt.latest(tmp_path) is None
    for step in (10, 20, 30):
        ckpt.save(tmp_path, step, _groups(step), {"step": step, "x": [1, 2]}, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_000000020", "step_000000030"]
    folder = ckpt.latest(tmp_path)
    assert folder.name == "step_000000030"
    tensors, state = ckpt.load(folder)
    assert state == {"step": 30, "x": [1, 2]}
    for k, v in _groups(30)["model"].items():
        assert torch.equal(tensors["model"][k], v)
    assert not list(tmp_path.rglob("*.tmp"))


def test_latest_skips_incomplete_and_corrupt(tmp_path):
    ckpt.save(tmp_path, 10, _groups(1), {"step": 10})
    # A write killed before its manifest: files present, no manifest.
    folder = ckpt.save(tmp_path, 20, _groups(2), {"step": 20})
    (folder / "manifest.json").unlink()
    assert ckpt.latest(tmp_path).name == "step_000000010"
    # A file that does not match its manifest (torn or tampered).
    folder = ckpt.save(tmp_path, 30, _groups(3), {"step": 30})
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.warns(ckpt.CheckpointWarning, match="step_000000030.*step_000000010"):
        assert ckpt.latest(tmp_path).name == "step_000000010"
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load(folder)
    with pytest.warns(ckpt.CheckpointWarning):
        manifest = json.loads((ckpt.latest(tmp_path) / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "state.json"}


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    ckpt.atomic_write_json(path, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError):
        ckpt.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_optimizer_state_round_trip_continues_identically():
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))

    def step(net, opt):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    a = _net(1)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        step(a, opt_a)
    tensors, groups = ckpt.optimizer_to_tensors(opt_a)
    json.dumps(groups)  # JSON-able
    b = _net(2)
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.AdamW(b.parameters(), lr=1.0)
    ckpt.optimizer_from_tensors(opt_b, {k: v.clone() for k, v in tensors.items()}, groups)
    assert opt_b.param_groups[0]["betas"] == (0.8, 0.95)
    for _ in range(3):
        step(a, opt_a)
        step(b, opt_b)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_rng_state_round_trip():
    torch.manual_seed(123)
    state = ckpt.rng_to_json(torch.get_rng_state())
    first = torch.rand(5)
    torch.manual_seed(999)
    torch.set_rng_state(ckpt.rng_from_json(json.loads(json.dumps(state))))
    assert torch.equal(torch.rand(5), first)


# -- data order --------------------------------------------------------------------------------


def test_data_order_epochs_and_resume():
    order = DataOrder(10, seed=3)
    got = torch.cat([order.take(4) for _ in range(5)])  # 20 indices = 2 epochs
    assert sorted(got[:10].tolist()) == list(range(10))
    assert sorted(got[10:].tolist()) == list(range(10))
    assert not torch.equal(got[:10], got[10:])  # reshuffled each epoch
    # Resume from a saved state: the same stream continues.
    a = DataOrder(10, seed=3)
    a.take(7)
    b = DataOrder(**a.state())
    assert torch.equal(a.take(13), b.take(13))
    assert DataOrder(10, seed=4).take(10).tolist() != DataOrder(10, seed=3).take(10).tolist()


def test_ema_beta_halflife_is_exact_for_any_batch():
    # Averaging weight of the initial value after N examples is 0.5 ** (N / halflife), whatever the batch.
    for batch in (1, 7, 64):
        beta = ema_beta(1000.0, batch=batch, nimg=10**9, rampup=None)
        assert math.log(beta) * 2000 / batch == pytest.approx(2 * math.log(0.5))
