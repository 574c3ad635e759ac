"""Checkpoints are files other people write: loading one reads only regular files inside its folder,
of the sizes its manifest gives (checked before reading), and builds only bounded networks.

Each case is a crafted checkpoint that made the loader before these checks read outside its folder,
block forever on a FIFO, read ``/dev/zero`` until memory ran out, or try a multi-terabyte allocation.
The ``guard`` fixture keeps such a regression from taking the machine with it: an alarm ends a read
that blocks, and an address-space limit ends one that does not stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import time

import pytest

from scorekit import nets
from scorekit.train import checkpoint as ckpt
from scorekit.train.checkpoint import CheckpointError

SECONDS = 20


@pytest.fixture
def guard():
    """An alarm after ``SECONDS`` and at most 1.5 GiB more address space for the test's duration."""

    def alarm(signum, frame):
        raise TimeoutError(f"no answer within {SECONDS} s")

    old_handler = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize:"))
    limit = vm + (3 << 29)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    t0 = time.monotonic()
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old_handler)
    assert time.monotonic() - t0 < 10, "a refusal should be immediate"


@pytest.fixture
def folder(tmp_path):
    """A valid checkpoint of a tiny MLP, as ``scorekit.train`` writes it."""
    cfg = {"type": "mlp", "dim": 2, "hidden": 4, "depth": 1, "emb_dim": 4}
    net = nets.build(cfg)
    state = {"step": 1, "net": cfg, "config": {}, "data": {}}
    return ckpt.save(tmp_path / "run", 1, {"model": net.state_dict()}, state)


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _list(folder, name, data: bytes | None = None, size: int | None = None):
    """Add ``name`` to the manifest (with ``data``'s size and hash), as a crafted checkpoint would."""
    m = _manifest(folder)
    data = b"" if data is None else data
    m["files"][name] = {"bytes": len(data) if size is None else size,
                        "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(m))


def test_a_valid_checkpoint_loads(folder):
    tensors, state = ckpt.load(folder)
    assert state["step"] == 1 and set(tensors) == {"model"}


def test_a_fifo_is_refused_not_waited_on(folder, guard):
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a FIFO"):
        ckpt.load(folder)


def test_a_link_to_a_device_is_refused_not_read(folder, guard):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        ckpt.load(folder)


def test_a_link_out_of_the_folder_is_refused_even_when_its_hash_matches(folder, guard):
    target = folder.parent / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(target)
    (folder / "model.safetensors").symlink_to(target)  # size and SHA-256 still match the manifest
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        ckpt.load(folder)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", ".hidden.safetensors",
                                  "sub/x.safetensors", "model.py"])  # fmt: skip
def test_manifest_names_are_plain_names_in_the_folder(folder, guard, name):
    path = name if name.startswith("/") else folder / name
    if name == "../outside.safetensors":  # a matching file outside the folder
        (folder.parent / "outside.safetensors").write_bytes(
            (folder / "model.safetensors").read_bytes()
        )
    data = open(path, "rb").read() if os.path.exists(path) else b""
    _list(folder, name, data)
    with pytest.raises(CheckpointError, match="names the file") as err:
        ckpt.load(folder)
    assert repr(name) in str(err.value) and "\n" not in str(err.value)


def test_sizes_are_checked_before_reading(folder, guard):
    # A sparse 17 GiB file (no disk used) that the manifest calls 3 bytes: refused by its size
    # from the file system, not by reading it (the guard allows 1.5 GiB more memory).
    big = folder / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(17 << 30)
    _list(folder, "big.safetensors", b"abc")
    with pytest.raises(CheckpointError, match=r"has 18253611008 bytes; expected 3"):
        ckpt.load(folder)
    _list(folder, "big.safetensors", b"", size=17 << 30)  # the manifest says so too: over the bound
    with pytest.raises(CheckpointError, match="allowed: 0 to"):
        ckpt.load(folder)


def test_a_corrupt_safetensors_file_that_matches_its_manifest_is_a_checkpoint_error(folder):
    junk = b"\xff" * 64
    (folder / "model.safetensors").write_bytes(junk)
    _list(folder, "model.safetensors", junk)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ckpt.load(folder)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"type": "mlp", "dim": 2, "hidden": 10**7}, r"config\['hidden'\] must be an integer in"),
        ({"type": "mlp", "dim": 2, "hidden": 16384, "depth": 256, "emb_dim": 16384},
         "275,440,091,138 parameters; at most 1,000,000,000"),
        ({"type": "unet", "in_channels": 3, "image_size": 65536}, r"config\['image_size'\]"),
        ({"type": "unet", "in_channels": 3, "image_size": 64, "base_channels": 4096,
          "channel_mults": [1, 2, 4]}, "parameters; at most"),
        ({"type": "unet", "in_channels": 1, "channel_mults": [1] * 40}, "at most 8 allowed"),
        ({"type": "mlp", "dim": 2, "num_classes": 10**9}, r"config\['num_classes'\]"),
    ],
)  # fmt: skip
def test_network_configs_are_bounded_before_anything_is_allocated(guard, cfg, match):
    with pytest.raises(ValueError, match=match):
        nets.build(cfg)


def test_parameter_count_is_computed_exactly_without_building():
    # The bound is only as good as the count: check it against the built networks.
    for cfg in (nets.default_config("vector", [3], 4), nets.default_config("image", [1, 8, 8], 10),
                {"type": "unet", "in_channels": 3, "image_size": [16, 8], "base_channels": 12,
                 "channel_mults": [1, 3, 2], "num_res_blocks": 1, "attn_resolutions": [4, 16],
                 "emb_dim": 20}):  # fmt: skip
        kwargs = {k: v for k, v in cfg.items() if k != "type"}
        assert nets._SIZES[cfg["type"]](**kwargs) == nets.num_parameters(nets.build(cfg))


def test_a_run_whose_state_asks_for_a_huge_network_is_refused(folder, guard):
    from scorekit.runs import load_run

    state = json.loads((folder / "state.json").read_text())
    state["net"]["hidden"] = 16384
    state["net"]["depth"] = 200
    data = json.dumps(state).encode()
    (folder / "state.json").write_bytes(data)
    _list(folder, "state.json", data)
    with pytest.raises(CheckpointError, match="parameters; at most"):
        load_run(folder.parent.parent, weights="model")


def test_weights_that_do_not_fit_the_config_are_one_line(folder):
    from scorekit.runs import load_run

    state = json.loads((folder / "state.json").read_text())
    state["net"]["hidden"] = 8
    data = json.dumps(state).encode()
    (folder / "state.json").write_bytes(data)
    _list(folder, "state.json", data)
    with pytest.raises(CheckpointError, match="do not fit its network config") as err:
        load_run(folder.parent.parent, weights="model")
    assert "\n" not in str(err.value)


def test_a_data_shape_that_is_not_the_networks_is_refused(folder, guard):
    # Sampling allocates [n, *shape]: a crafted shape would be a huge allocation at the first batch.
    from scorekit.runs import load_run

    state = json.loads((folder / "state.json").read_text())
    state["config"] = {"process": "edm", "param": "edm"}
    state["data"] = {"shape": [10**9], "sigma_data": 0.5}
    data = json.dumps(state).encode()
    (folder / "state.json").write_bytes(data)
    _list(folder, "state.json", data)
    with pytest.raises(
        CheckpointError, match=r"data shape \[1000000000\] is not its network's \[2\]"
    ):
        load_run(folder.parent.parent, weights="model")
    state["data"]["shape"] = [2]  # the same checkpoint with the network's shape loads
    data = json.dumps(state).encode()
    (folder / "state.json").write_bytes(data)
    _list(folder, "state.json", data)
    assert load_run(folder.parent.parent, weights="model")[1]["shape"] == [2]
