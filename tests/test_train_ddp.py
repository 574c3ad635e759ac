"""Two CPU processes under torchrun (gloo): identical weights on both ranks, equal (to float tolerance) to
one process with the same global batch; sharded sampling gives the same samples as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from scorekit.runs import generate, load_run
from scorekit.train import TrainConfig, train
from scorekit.train import checkpoint as ckpt

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from scorekit.runs import generate, load_run
    from scorekit.train import TrainConfig, train
    from scorekit.train.distributed import setup, teardown

    cfg = TrainConfig(**json.loads(sys.argv[1]))
    res = train(cfg, progress=False)
    rank = int(os.environ["RANK"])
    weights = {k: v.detach().contiguous() for k, v in res.model.state_dict().items()}
    save_file(weights, os.path.join(cfg.out, f"rank{rank}.safetensors"))
    dist = setup("cpu")  # already joined by train(); returns this rank's place
    denoiser, info = load_run(cfg.out)
    x = generate(denoiser, info, 10, batch=3, dist=dist, progress=False, nfe=4, sampler="euler",
                 seed=5, device="cpu")
    if rank == 0:
        save_file({"x": x.contiguous()}, os.path.join(cfg.out, "samples.safetensors"))
    teardown()
    """
)


# Failures of the launch itself (not of scorekit): a port taken between choosing and binding it, or a
# rendezvous that timed out on a heavily loaded machine. Only these are retried, once.
_LAUNCH_ERRORS = ("Address already in use", "EADDRINUSE", "RendezvousTimeoutError",
                  "RendezvousConnectionError", "Connection refused", "timed out")  # fmt: skip


def _torchrun(script, arg: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a stray variable from elsewhere must not redirect the workers
    for attempt in range(2):
        with socket.socket() as sock:  # a free port for the rendezvous on localhost
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), arg]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode == 0 or not any(e in out.stderr for e in _LAUNCH_ERRORS) or attempt:
            return out
    return out


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    base = dict(data="moons", batch=64, steps=20, log_every=10, ckpt_every=10, ema=0.9,
                net={"hidden": 32, "depth": 1, "emb_dim": 16})  # fmt: skip
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cfg2 = {**base, "out": str(tmp_path / "ddp")}
    out = _torchrun(script, json.dumps(cfg2))
    assert out.returncode == 0, f"torchrun failed (rc={out.returncode}):\n{out.stderr[-8000:]}"

    r0 = load_file(tmp_path / "ddp" / "rank0.safetensors")
    r1 = load_file(tmp_path / "ddp" / "rank1.safetensors")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps the replicas identical

    single = train(TrainConfig(**{**base, "out": str(tmp_path / "one")}), progress=False)
    moved = 0.0
    # The weights at step 10 (--steps 0 is an error now): training moves them on to step 20.
    start = ckpt.load(tmp_path / "one" / "checkpoints" / "step_000000010")[0]["model"]
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-6)
        moved = max(moved, (v - start[k]).abs().max().item())
    assert moved > 1e-3  # the comparison is not between untrained networks

    denoiser, info = load_run(tmp_path / "one")
    x1 = generate(denoiser, info, 10, batch=4, progress=False, nfe=4, sampler="euler", seed=5)
    x2 = load_file(tmp_path / "ddp" / "samples.safetensors")["x"]
    torch.testing.assert_close(x2, x1, rtol=1e-4, atol=1e-5)
