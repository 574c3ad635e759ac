"""The training loop: AdamW with warm-up, gradient clipping, EMA, checkpoints, exact resume, DDP.

One step on a global batch of ``B`` examples::

    idx            = next B indices of the epoch's permutation        (data order: seed, epoch)
    sigma, n, u    = draws from a generator seeded by (seed, step)     (same on every rank)
    rank r takes rows [r B/N, (r+1) B/N) and minimises mean denoising_loss over them
    grads averaged over ranks (DDP), clipped to norm <= grad_clip, AdamW step at lr * min(1, step/warmup)
    ema <- beta ema + (1 - beta) theta

Every random draw of a step is a function of ``(seed, step)`` and the data order is a function of
``(seed, epoch)``, so a run resumed from the checkpoint at step ``k`` replays exactly the steps an
uninterrupted run makes after ``k`` (bitwise on CPU), and N processes see the same examples, sigmas
and noise as one process with the same global batch. The global torch RNG (used only by dropout) is
seeded at start and saved in each checkpoint.

Files in ``RUN_DIR``: ``config.json`` (written at start), ``log.jsonl`` (step, loss, lr, it/s, time),
``checkpoints/step_*/`` (see ``scorekit.train.checkpoint``), ``samples/step_*.png`` (sample grids or
2-D scatter plots, every ``sample_every`` steps, drawn from the EMA weights) and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from scorekit._util import atomic_write, atomic_write_json, mix_seed
from scorekit.denoiser import build_denoiser
from scorekit.process import get_process
from scorekit.train import checkpoint as ckpt
from scorekit.train.distributed import setup, shard
from scorekit.train.ema import EMA, ema_beta
from scorekit.train.loss import WEIGHTINGS, default_weighting, denoising_loss, drop_labels
from scorekit.train.preview import save_preview

__all__ = ["DataOrder", "TrainConfig", "TrainResult", "train"]


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as JSON in the run folder and each checkpoint).

    Run length: ``steps`` and/or ``minutes`` (wall-clock training time summed over resumes); the
    run stops at whichever comes first. ``ema``: a decay per step if < 1, else a half-life in
    training examples (EDM), capped at ``ema_rampup`` times the examples seen so far (so short runs
    average over their last ~5%); ``0`` keeps the EMA equal to the weights. ``weighting`` defaults to the
    one matching ``param`` (see ``scorekit.train.loss.WEIGHTINGS``). ``net`` overrides keys of
    ``scorekit.nets.default_config`` for the data set. ``holdout`` keeps that fraction of the data out of
    training (for held-out metrics).
    """

    data: str = "moons"
    out: str = "run"
    steps: int | None = None
    minutes: float | None = None
    batch: int = 256
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    process: str = "edm"
    param: str = "edm"
    weighting: str | None = None
    cond: bool = False
    label_dropout: float = 0.1
    ema: float = 500_000.0
    ema_rampup: float | None = 0.05
    holdout: float = 0.0
    ckpt_every: int = 500
    keep: int = 2
    sample_every: int = 0
    sample_n: int = 64
    sample_nfe: int = 20
    sample_sampler: str = "ipndm"
    log_every: int = 50
    seed: int = 0
    device: str = "cpu"
    net: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("give a run length: steps (--steps N) and/or minutes (--minutes M)")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        for name in ("batch", "ckpt_every", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.grad_clip < 0 or self.sample_every < 0:
            raise ValueError("warmup, grad_clip and sample_every must be >= 0")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must lie in [0, 1), got {self.holdout}")
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; allowed: {sorted(WEIGHTINGS)}")
        ema_beta(self.ema, batch=1, nimg=1)  # raises for a negative value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What ``train`` returns: final step, losses logged, steps per second, the run folder."""

    step: int
    run_dir: Path
    log: list[dict[str, float]]
    steps_per_second: float
    denoiser: nn.Module  # the EMA denoiser (eval mode)
    model: nn.Module  # the raw network with the trained (not averaged) weights
    cpu_steps_per_second: float = 0.0  # steps per second of this process's CPU time (all threads)


class DataOrder:
    """Epoch-wise shuffling whose state is two integers: ``epoch`` and position ``pos`` in it.

    Epoch ``e`` visits the examples in the order ``randperm(n)`` of a generator seeded by
    ``(seed, e)``; a batch that crosses the end of an epoch continues in the next one.
    """

    def __init__(self, n: int, seed: int, *, epoch: int = 0, pos: int = 0):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xDA7A))
        return torch.randperm(self.n, generator=g)

    def take(self, b: int) -> Tensor:
        """The next ``b`` example indices, ``[b]`` long."""
        out = []
        while b > 0:
            chunk = self._perm[self.pos : self.pos + b]
            out.append(chunk)
            b -= len(chunk)
            self.pos += len(chunk)
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(out)

    def state(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}


def _dataset_info(ds, sigma_data: float) -> dict[str, Any]:
    return {
        "name": ds.name,
        "kind": ds.kind,
        "shape": list(ds.shape),
        "num_classes": int(ds.num_classes),
        "normalization": ds.normalization.to_dict(),
        "sigma_data": sigma_data,
    }


def _load_data(cfg: TrainConfig):
    from scorekit import data

    ds = data.load(cfg.data, seed=cfg.seed)
    if cfg.holdout > 0:
        ds, _ = data.split(ds, holdout=cfg.holdout, seed=cfg.seed)
    return ds


def _rng_state(device: torch.device) -> dict[str, Any]:
    out = {"torch": ckpt.rng_to_json(torch.get_rng_state())}
    if device.type == "cuda":
        out["cuda"] = ckpt.rng_to_json(torch.cuda.get_rng_state(device))
    return out


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(ckpt.rng_from_json(state["torch"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(ckpt.rng_from_json(state["cuda"]), device)


def train(
    cfg: TrainConfig, *, resume: bool = False, dataset=None, progress: bool = True
) -> TrainResult:
    """Train a denoiser as ``cfg`` says, writing everything to ``cfg.out``; see the module docstring.

    Args:
        cfg: the run's configuration. With ``resume=True`` and a complete checkpoint in ``cfg.out``,
            the saved configuration is used, except for the run length (``steps``, ``minutes``),
            ``device``, ``ckpt_every``, ``sample_every`` and ``log_every`` which ``cfg`` may change.
        resume: continue from the newest complete checkpoint in ``cfg.out`` (start afresh if none).
        dataset: a ``scorekit.data.Dataset`` to use instead of ``scorekit.data.load(cfg.data)``.
        progress: show a tqdm progress bar (rank 0 only).

    Under ``torchrun`` the process group is joined here; rank 0 writes all files.
    """
    run_dir = Path(cfg.out)
    folder = ckpt.latest(run_dir) if resume else None
    tensors, state = ckpt.load(folder) if folder is not None else ({}, None)
    if state is not None:
        saved = TrainConfig.from_dict(state["config"])
        for key in ("steps", "minutes", "device", "ckpt_every", "sample_every", "log_every", "out"):
            setattr(saved, key, getattr(cfg, key))
        cfg = saved
    cfg.validate()
    dist = setup(cfg.device)
    device = dist.device
    if dataset is None:
        dataset = _load_data(cfg)
    x_all = torch.as_tensor(np.asarray(dataset.x), dtype=torch.float32).to(device)
    labels_all = None
    if cfg.cond:
        if not dataset.num_classes or dataset.labels is None:
            raise ValueError(f"--cond needs a labelled data set; {dataset.name!r} has no labels")
        labels_all = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long).to(device)
    sigma_data = float(x_all.std()) if state is None else state["data"]["sigma_data"]
    info = _dataset_info(dataset, sigma_data) if state is None else state["data"]
    if state is not None and list(dataset.shape) != info["shape"]:
        raise ValueError(f"data shape {list(dataset.shape)} differs from the run's {info['shape']}")

    from scorekit import nets

    net_cfg = (
        state["net"]
        if state is not None
        else {**nets.default_config(dataset.kind, dataset.shape, dataset.num_classes), **cfg.net}
    )
    if state is None and not cfg.cond:
        net_cfg["num_classes"] = 0
    torch.manual_seed(mix_seed(cfg.seed, 0x1417))  # same initial weights on every rank
    net = nets.build(net_cfg).to(device)
    denoiser = build_denoiser(net, process=cfg.process, param=cfg.param, sigma_data=sigma_data)
    process = get_process(cfg.process)
    weighting = cfg.weighting or default_weighting(cfg.param)
    opt = torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    ema = EMA(net)
    order = DataOrder(len(x_all), cfg.seed)
    step, elapsed = 0, 0.0
    torch.manual_seed(mix_seed(cfg.seed, dist.rank, 0xD209))
    if state is not None:
        net.load_state_dict(tensors["model"])
        ema.module.load_state_dict(tensors["ema"])
        ckpt.optimizer_from_tensors(opt, tensors["optim"], state["optim_groups"])
        o = state["data_order"]
        if o["n"] != len(x_all):
            raise ValueError(f"the data set has {len(x_all)} examples, the run had {o['n']}")
        order = DataOrder(o["n"], o["seed"], epoch=o["epoch"], pos=o["pos"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        if dist.main:
            _set_rng_state(state["rng"], device)
        else:
            torch.manual_seed(mix_seed(cfg.seed, dist.rank, step, 0xD209))
    model = denoiser
    if dist.active:
        model = nn.parallel.DistributedDataParallel(
            denoiser, device_ids=[device.index] if device.type == "cuda" else None
        )
    rows = shard(cfg.batch, dist.rank, dist.world)

    log_path = run_dir / "log.jsonl"
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            run_dir / "config.json", {"config": cfg.to_dict(), "net": net_cfg, "data": info}
        )
        _truncate_log(log_path, step)
    dist.barrier()

    def save_checkpoint() -> None:
        if not torch.isfinite(loss_sum):  # never checkpoint weights that a NaN/inf loss has reached
            raise FloatingPointError(f"training loss is not finite before step {step}; lower --lr?")
        if dist.main:
            otensors, groups = ckpt.optimizer_to_tensors(opt)
            run_state = {
                "step": step,
                "elapsed": elapsed,
                "config": cfg.to_dict(),
                "net": net_cfg,
                "data": info,
                "data_order": order.state(),
                "rng": _rng_state(device),
                "optim_groups": groups,
                "scorekit_version": _version(),
            }
            groups_t = {
                "model": net.state_dict(),
                "ema": ema.module.state_dict(),
                "optim": otensors,
            }
            ckpt.save(run_dir, step, groups_t, run_state, keep=cfg.keep)
        dist.barrier()

    def out_of_time() -> bool:
        return cfg.minutes is not None and elapsed >= 60 * cfg.minutes

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not (progress and dist.main),
        unit="step",
        dynamic_ncols=True,
    )
    log: list[dict[str, float]] = []
    loss_sum = torch.zeros((), device=device)
    window_steps, window_t0 = 0, time.perf_counter()
    total_steps_run, run_t0, cpu_t0 = 0, time.perf_counter(), time.process_time()
    last_saved = step
    params = list(net.parameters())
    shape = tuple(x_all.shape[1:])
    t_prev = time.perf_counter()
    stop = out_of_time() if not dist.active else dist.any(out_of_time())
    while not stop and (cfg.steps is None or step < cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in opt.param_groups:
            group["lr"] = lr
        # Every draw of this step comes from (seed, step): identical on every rank and after resume.
        idx = order.take(cfg.batch).to(device)
        g = torch.Generator(device).manual_seed(mix_seed(cfg.seed, step))
        sigma = process.training_sigma(cfg.batch, generator=g, device=device)
        noise = torch.randn((cfg.batch, *shape), generator=g, device=device)
        cond = {}
        if labels_all is not None:
            u = torch.rand(cfg.batch, generator=g, device=device)
            cond["class_labels"] = drop_labels(labels_all[idx], cfg.label_dropout, u)[rows]
        with autocast:
            loss = denoising_loss(
                model,
                x_all[idx][rows],
                sigma[rows],
                noise[rows],
                weighting=weighting,
                sigma_data=sigma_data,
                **cond,
            ).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        ema.update(
            net, ema_beta(cfg.ema, batch=cfg.batch, nimg=step * cfg.batch, rampup=cfg.ema_rampup)
        )
        loss_sum += loss.detach()
        window_steps += 1
        total_steps_run += 1
        now = time.perf_counter()
        elapsed += now - t_prev
        t_prev = now
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            mean_loss = float(dist.all_mean(loss_sum)) / window_steps
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training loss is {mean_loss} at step {step}; lower --lr?"
                )
            rate = window_steps / max(now - window_t0, 1e-9)
            row = {"step": step, "loss": mean_loss, "lr": lr, "it_s": rate, "time": elapsed}
            log.append(row)
            if dist.main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{mean_loss:.4f}", it_s=f"{rate:.1f}")
            loss_sum.zero_()
            window_steps, window_t0 = 0, time.perf_counter()
        if cfg.minutes is not None:
            # Ranks must agree on the last step: every 10 steps they stop together if any is out of time.
            stop = out_of_time() if not dist.active else step % 10 == 0 and dist.any(out_of_time())
        if step % cfg.ckpt_every == 0:
            save_checkpoint()
            last_saved = step
            t_prev = time.perf_counter()  # checkpoint time is not training time
        if cfg.sample_every and step % cfg.sample_every == 0 and dist.main:
            save_preview(
                ema.module, info, run_dir / "samples" / f"step_{step:09d}.png",
                process=cfg.process, param=cfg.param, n=cfg.sample_n, nfe=cfg.sample_nfe,
                sampler=cfg.sample_sampler, device=device,
            )  # fmt: skip
            t_prev = time.perf_counter()
    bar.close()
    rate = total_steps_run / max(time.perf_counter() - run_t0, 1e-9)
    cpu_rate = total_steps_run / max(time.process_time() - cpu_t0, 1e-9)
    if step != last_saved:
        save_checkpoint()
    if dist.main:
        _plot_losses(log_path, run_dir / "loss.png")
    ema_denoiser = build_denoiser(
        ema.module, process=cfg.process, param=cfg.param, sigma_data=sigma_data
    )
    return TrainResult(step, run_dir, log, rate, ema_denoiser.eval(), net, cpu_rate)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows after ``step`` (left by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for ln in rows:
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line
    atomic_write(path, "".join(k + "\n" for k in keep).encode())


def _plot_losses(log_path: Path, png: Path) -> None:
    from scorekit.train.plots import save_loss_curve

    if not log_path.exists():
        return
    rows = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
    if rows:
        save_loss_curve(
            png, [r["step"] for r in rows], [r["loss"] for r in rows], title="training loss"
        )


def _version() -> str:
    from scorekit import __version__

    return __version__
