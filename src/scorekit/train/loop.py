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

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from scorekit import data, nets
from scorekit._util import atomic_write, atomic_write_json, check_int, check_number, mix_seed
from scorekit.denoiser import NetDenoiser, build_denoiser
from scorekit.process import Process, get_process
from scorekit.threads import start_policy
from scorekit.train import checkpoint as ckpt
from scorekit.train.distributed import Dist, setup, shard
from scorekit.train.ema import EMA, ema_beta
from scorekit.train.lock import run_lock
from scorekit.train.loss import (
    WEIGHTINGS,
    default_weighting,
    denoising_loss,
    drop_labels,
    guidance_free_loss,
)
from scorekit.train.plots import save_loss_curve
from scorekit.train.preview import save_preview
from scorekit.train.runfolder import RUN_FILES, fresh_folder, holds_run
from scorekit.train.warmstart import check_init, init_weights

__all__ = ["RUN_FILES", "DataOrder", "TrainConfig", "TrainResult", "holds_run", "train"]


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
    guidance_free: float = 0.0  # > 1: learn the CFG denoiser of this scale (guidance_free_loss)
    ema: float = 500_000.0
    ema_rampup: float | None = 0.05
    holdout: float = 0.0
    ckpt_every: int = 500
    keep: int = 2
    sample_every: int = 0
    sample_n: int = 64
    sample_nfe: int = 20
    sample_sampler: str = "dpmpp_2m"
    log_every: int = 50
    seed: int = 0
    device: str = "cpu"
    net: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # a run or checkpoint folder: its EMA weights start this one

    def validate(self) -> None:
        """Every number checked (finite, in range; ``steps`` >= 1: zero is not "the default"), each
        failure a one-line error naming the command-line option, the value and what is allowed."""
        if self.steps is None and self.minutes is None:
            raise ValueError("give a run length: steps (--steps N) and/or minutes (--minutes M)")
        if self.steps is not None:
            check_int("--steps", self.steps, least=1)
        if self.minutes is not None:
            check_number("--minutes", self.minutes, low=0, low_ok=False)
        for name in ("batch", "ckpt_every", "log_every", "keep", "sample_n", "sample_nfe"):
            check_int(_opt(name), getattr(self, name), least=1)
        for name in ("warmup", "sample_every", "seed"):
            check_int(_opt(name), getattr(self, name), least=0)
        check_number("--lr", self.lr, low=0, low_ok=False)
        for name in ("weight_decay", "grad_clip", "ema"):
            check_number(_opt(name), getattr(self, name), low=0)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1); got {self.betas!r}")
        for b in self.betas:
            check_number("betas", b, low=0, high=1, high_ok=False)
        if self.ema_rampup is not None:
            check_number("ema_rampup", self.ema_rampup, low=0, low_ok=False)
        check_number("--label-dropout", self.label_dropout, low=0, high=1)
        if self.guidance_free:  # the CFG scale to learn; needs the label-dropped branch
            check_number("--guidance-free", self.guidance_free, low=1)
            if not (self.cond and self.label_dropout > 0):
                raise ValueError("--guidance-free needs --cond and --label-dropout > 0")
        check_number("--holdout", self.holdout, low=0, high=1, high_ok=False)
        check_init(self.init)
        if self.weighting is not None and self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; allowed: {sorted(WEIGHTINGS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def _load_data(cfg: TrainConfig) -> data.Dataset:
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
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    dataset=None,
    progress: bool = True,
    threads=None,
) -> TrainResult:
    """Train a denoiser as ``cfg`` says, writing everything to ``cfg.out``; see the module docstring.

    Args:
        cfg: the run's configuration. With ``resume=True`` and a complete checkpoint in ``cfg.out``,
            the saved configuration is used, except for the run length (``steps``, ``minutes``),
            ``device``, ``ckpt_every``, ``sample_every`` and ``log_every`` which ``cfg`` may change.
        resume: continue from the newest complete checkpoint in ``cfg.out`` (start afresh if none).
        overwrite: delete the run files (``RUN_FILES``) of a previous run in ``cfg.out`` first, saying
            so on stderr. Without it (or ``resume``) a folder that holds a run is refused: a fresh run
            never mixes its log and checkpoints with another's.
        dataset: a ``scorekit.data.Dataset`` to use instead of ``scorekit.data.load(cfg.data)``.
        progress: show a tqdm progress bar (rank 0 only).
        threads: torch CPU threads: ``None`` keeps the current count, an integer pins it, ``"auto"``
            (or a ``scorekit.threads.ThreadPolicy``) adapts it to measured step times.

    Under ``torchrun`` the process group is joined here; rank 0 writes all files.

    The run folder is locked for the whole call (``scorekit.train.lock``): a second training into it
    fails at once naming this one's pid. The steps, in order: ``fresh_folder`` (refuse or clear a
    previous run), ``_saved_run`` (the checkpoint to resume and its configuration),
    ``_setup`` (data, network, optimiser, EMA, data order at step 0), ``_resume`` (their state at the
    checkpoint's step), ``_start`` (DDP wrapper, ``config.json``, the log cut back to that step), then
    ``_loop``: ``_train_step`` each step, ``_report`` every ``log_every``, ``_save_checkpoint`` every
    ``ckpt_every``, a preview picture every ``sample_every``.
    """
    cfg.validate()
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with run_lock(cfg.out) if main_rank else contextlib.nullcontext():
        fresh_folder(Path(cfg.out), resume=resume, overwrite=overwrite)
        cfg, tensors, state = _saved_run(cfg, resume)
        run = _setup(cfg, dataset, state)
        if state is not None:
            _resume(run, tensors, state)
        _start(run)
        return _loop(run, progress, threads)


@dataclass
class _Run:
    """What a training run holds between steps: built by ``_setup``, moved on by ``_train_step``."""

    cfg: TrainConfig
    dist: Dist
    x_all: Tensor  # [N, ...] the training data in model units, on the device
    labels_all: Tensor | None  # [N] class labels when cfg.cond
    info: dict[str, Any]  # the data's description (shape, normalisation, sigma_data), saved with it
    net_cfg: dict[str, Any]
    net: nn.Module  # the raw network being trained
    denoiser: NetDenoiser  # net wrapped by the parameterisation
    process: Process
    weighting: str
    opt: torch.optim.Optimizer
    ema: EMA
    order: DataOrder
    step: int = 0
    elapsed: float = 0.0  # training seconds over all sessions (checkpoints and pictures excluded)
    first_loss: float | None = None  # untrained loss (first steps, >= 64 rows): divergence scale
    first_losses: list[float] = field(default_factory=list)
    saved_step: int | None = None  # the newest checkpoint's step
    # The first step whose gradients were not finite (-1: none), a tensor on the device.
    bad_step: Tensor | None = None
    model: nn.Module | None = None  # what the loss calls: the denoiser (DDP-wrapped if distributed)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def sigma_data(self) -> float:
        return self.info["sigma_data"]


#: Settings that ``--resume`` may change (with a note): run length, cadence, device, previews.
#: Every other field fixes the model or the data, and a resumed run refuses a new value for it.
RESUME_MAY_CHANGE = ("steps", "minutes", "device", "ckpt_every", "sample_every", "log_every",
                     "keep", "sample_n", "sample_nfe", "sample_sampler", "out")  # fmt: skip


def _saved_run(cfg: TrainConfig, resume: bool) -> tuple[TrainConfig, dict, dict | None]:
    """``(cfg, tensors, state)``: with ``resume`` and a complete checkpoint, its tensors and state, and
    ``cfg`` checked against the saved configuration (``RESUME_MAY_CHANGE`` fields may differ, with a
    note; any other difference is refused); else ``(cfg, {}, None)``."""
    if resume and int(os.environ.get("RANK", "0")) == 0:
        for gone in ckpt.clean_partial(cfg.out):
            print(
                f"scorekit train: deleted {gone}, a checkpoint whose write was cut short",
                file=sys.stderr,
            )
    folder = ckpt.latest(cfg.out) if resume else None
    if folder is None:
        cfg.validate()
        return cfg, {}, None
    tensors, state = ckpt.load(folder)
    saved = TrainConfig.from_dict(state["config"])
    changed = [
        f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(saved, f.name)
    ]

    def said(names: list[str]) -> str:
        return ", ".join(
            f"--{k.replace('_', '-')} {_shown(getattr(cfg, k))} (the run's: {_shown(getattr(saved, k))})"
            for k in names
        )

    refused = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if refused:
        raise ValueError(
            f"--resume: {said(refused)} would change the model or data of the run in {cfg.out}; "
            "resume without them, or start a new run (another --out, or --overwrite)"
        )
    noted = [k for k in changed if k != "out"]
    if noted and int(os.environ.get("RANK", "0")) == 0:
        print(f"scorekit train: --resume with {said(noted)}", file=sys.stderr)
    cfg.validate()
    return cfg, tensors, state


def _shown(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _data_hash(dataset) -> str:
    """SHA-256 of the training examples (and labels) as loaded: detects a data file changed under a run."""
    h = hashlib.sha256(np.ascontiguousarray(np.asarray(dataset.x, dtype=np.float32)).tobytes())
    if dataset.labels is not None:
        h.update(np.ascontiguousarray(np.asarray(dataset.labels, dtype=np.int64)).tobytes())
    return h.hexdigest()


def _setup(cfg: TrainConfig, dataset, state: dict | None) -> _Run:
    """Join the process group; load the data; build the network (same initial weights on every
    rank), its denoiser, AdamW, the EMA and the data order at step 0; seed the global RNG per rank."""
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
    digest = _data_hash(dataset)
    if state is None:
        info = {**_dataset_info(dataset, float(x_all.std())), "sha256": digest}
        net_cfg = {
            **nets.default_config(
                dataset.kind, dataset.shape, dataset.num_classes, net_type=cfg.net.get("type")
            ),
            **cfg.net,
        }
        if not cfg.cond:
            net_cfg["num_classes"] = 0
        if cfg.init:
            net_cfg, init_w = init_weights(cfg, net_cfg, list(dataset.shape))
    else:
        info, net_cfg = state["data"], state["net"]
        if list(dataset.shape) != info["shape"]:
            raise ValueError(
                f"data shape {list(dataset.shape)} differs from the run's {info['shape']}"
            )
        if info.get("sha256", digest) != digest:
            raise ValueError(
                f"--data {cfg.data}: its content changed since the run started (SHA-256 {digest[:12]} "
                f"now, {info['sha256'][:12]} then); resume with the original data, or start a new run "
                "(another --out, or --overwrite)"
            )
    torch.manual_seed(mix_seed(cfg.seed, 0x1417))  # same initial weights on every rank
    net = nets.build(net_cfg).to(device)
    denoiser = build_denoiser(
        net, process=cfg.process, param=cfg.param, sigma_data=info["sigma_data"]
    )
    opt = torch.optim.AdamW(
        net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    run = _Run(
        cfg, dist, x_all, labels_all, info, net_cfg, net, denoiser, get_process(cfg.process),
        cfg.weighting or default_weighting(cfg.param), opt, EMA(net), DataOrder(len(x_all), cfg.seed),
    )  # fmt: skip
    if state is None and cfg.init:  # fine-tuning: weights and EMA from the other run's EMA
        net.load_state_dict(init_w)
        run.ema.module.load_state_dict(init_w)
    torch.manual_seed(mix_seed(cfg.seed, dist.rank, 0xD209))  # dropout's RNG, one stream per rank
    return run


def _resume(run: _Run, tensors: dict, state: dict) -> None:
    """Put the checkpoint's weights, EMA, optimiser, data order, step, time and RNG into ``run``."""
    run.net.load_state_dict(tensors["model"])
    run.ema.module.load_state_dict(tensors["ema"])
    ckpt.optimizer_from_tensors(run.opt, tensors["optim"], state["optim_groups"])
    o = state["data_order"]
    if o["n"] != len(run.x_all):
        raise ValueError(f"the data set has {len(run.x_all)} examples, the run had {o['n']}")
    run.order = DataOrder(o["n"], o["seed"], epoch=o["epoch"], pos=o["pos"])
    run.step, run.elapsed = int(state["step"]), float(state["elapsed"])
    run.saved_step, run.first_loss = run.step, state.get("first_loss")
    if run.dist.main:
        _set_rng_state(state["rng"], run.device)
    else:
        torch.manual_seed(mix_seed(run.cfg.seed, run.dist.rank, run.step, 0xD209))


def _start(run: _Run) -> None:
    """Wrap the denoiser for DDP; write ``config.json`` and cut the log back to the run's step."""
    run.model = run.denoiser
    run.bad_step = torch.full((), -1, dtype=torch.long, device=run.device)
    if run.dist.active:
        device = run.device
        run.model = nn.parallel.DistributedDataParallel(
            run.denoiser, device_ids=[device.index] if device.type == "cuda" else None
        )
    if run.dist.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            run.run_dir / "config.json",
            {"config": run.cfg.to_dict(), "net": run.net_cfg, "data": run.info},
        )
        _truncate_log(run.run_dir / "log.jsonl", run.step)
    run.dist.barrier()


@dataclass
class _LossWindow:
    """The losses summed since the last log row, and the rows logged in this session."""

    total: Tensor
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)
    rows: list[dict[str, float]] = field(default_factory=list)


def _loop(run: _Run, progress: bool, threads=None) -> TrainResult:
    """Step until ``cfg.steps`` or ``cfg.minutes``; log, checkpoint and picture on their schedules."""
    cfg, dist = run.cfg, run.dist
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not (progress and dist.main),
               unit="step", dynamic_ncols=True)  # fmt: skip
    window = _LossWindow(torch.zeros((), device=run.device))
    steps_run, run_t0, cpu_t0 = 0, time.perf_counter(), time.process_time()
    last_saved = run.step
    pace = start_policy(threads)  # the torch thread count; may change with measured step times
    t_prev = time.perf_counter()
    stop = _out_of_time(run) if not dist.active else dist.any(_out_of_time(run))
    while not stop and (cfg.steps is None or run.step < cfg.steps):
        loss, lr = _train_step(run)
        if run.first_loss is None:
            _first_loss(run, loss)
        window.total += loss
        window.steps += 1
        steps_run += 1
        now = time.perf_counter()
        pace.step(now - t_prev)
        run.elapsed += now - t_prev
        t_prev = now
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            _report(run, window, lr, now, bar)
        if cfg.minutes is not None:
            # Ranks must agree on the last step: every 10 steps they stop together if any is out of time.
            stop = _out_of_time(run) if not dist.active else (
                run.step % 10 == 0 and dist.any(_out_of_time(run))
            )  # fmt: skip
        if run.step % cfg.ckpt_every == 0:
            _save_checkpoint(run, window.total)
            last_saved = run.step
            t_prev = time.perf_counter()  # checkpoint time is not training time
        if cfg.sample_every and run.step % cfg.sample_every == 0 and dist.main:
            save_preview(
                run.ema.module, run.info, run.run_dir / "samples" / f"step_{run.step:09d}.png",
                process=cfg.process, param=cfg.param, n=cfg.sample_n, nfe=cfg.sample_nfe,
                sampler=cfg.sample_sampler, device=run.device,
            )  # fmt: skip
            t_prev = time.perf_counter()
    bar.close()
    rate = steps_run / max(time.perf_counter() - run_t0, 1e-9)
    cpu_rate = steps_run / max(time.process_time() - cpu_t0, 1e-9)
    if run.step != last_saved:
        _save_checkpoint(run, window.total)
    if dist.main:
        _plot_losses(run.run_dir / "log.jsonl", run.run_dir / "loss.png")
    ema_denoiser = build_denoiser(
        run.ema.module, process=cfg.process, param=cfg.param, sigma_data=run.sigma_data
    )
    return TrainResult(
        run.step, run.run_dir, window.rows, rate, ema_denoiser.eval(), run.net, cpu_rate
    )


def _out_of_time(run: _Run) -> bool:
    return run.cfg.minutes is not None and run.elapsed >= 60 * run.cfg.minutes


def _train_step(run: _Run) -> tuple[Tensor, float]:
    """One optimiser step on this rank's rows of the global batch; returns the (detached) mean loss
    and the learning rate used. Every random draw comes from ``(seed, step)``: identical on every rank
    and after a resume."""
    cfg, device = run.cfg, run.device
    lr = cfg.lr * min(1.0, (run.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    for group in run.opt.param_groups:
        group["lr"] = lr
    rows = shard(cfg.batch, run.dist.rank, run.dist.world)
    idx = run.order.take(cfg.batch).to(device)
    g = torch.Generator(device).manual_seed(mix_seed(cfg.seed, run.step))
    sigma = run.process.training_sigma(cfg.batch, generator=g, device=device)
    noise = torch.randn((cfg.batch, *run.x_all.shape[1:]), generator=g, device=device)
    cond = {}
    if run.labels_all is not None:
        u = torch.rand(cfg.batch, generator=g, device=device)
        cond["class_labels"] = drop_labels(run.labels_all[idx], cfg.label_dropout, u)[rows]
    loss_fn = denoising_loss  # guidance-free: the model's own stop-gradient CFG in the target
    if cfg.guidance_free:
        loss_fn = partial(guidance_free_loss, scale=cfg.guidance_free, reference=run.denoiser)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = loss_fn(
            run.model, run.x_all[idx][rows], sigma[rows], noise[rows], weighting=run.weighting,
            sigma_data=run.sigma_data, **cond,
        ).mean()  # fmt: skip
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    # Clipping at inf measures the norm and leaves the gradients as they are (times exactly 1).
    norm = nn.utils.clip_grad_norm_(list(run.net.parameters()), cfg.grad_clip or math.inf)
    run.opt.step()
    run.step += 1
    # The first step with a NaN/inf gradient, kept on the device (no sync per step): checked by
    # _check_finite before each log row and checkpoint, so those weights are never saved.
    run.bad_step = torch.where(~torch.isfinite(norm) & (run.bad_step < 0), run.step, run.bad_step)
    beta = ema_beta(cfg.ema, batch=cfg.batch, nimg=run.step * cfg.batch, rampup=cfg.ema_rampup)
    run.ema.update(run.net, beta)
    return loss.detach(), lr


def _report(run: _Run, window: _LossWindow, lr: float, now: float, bar) -> None:
    """Log the window's mean loss (over ranks), learning rate, steps/s and training time; reset it."""
    _check_finite(run)
    mean_loss = float(run.dist.all_mean(window.total)) / window.steps
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"training loss is {mean_loss} at step {run.step}; {_kept(run)}")
    first = run.first_loss
    if first is not None and first > 0 and mean_loss > DIVERGED * first:
        raise FloatingPointError(
            f"training diverged at step {run.step}: mean loss {mean_loss:.4g} over the last "
            f"{window.steps} steps, more than {DIVERGED:g}x the untrained loss {first:.4g}; {_kept(run)}"
        )
    rate = window.steps / max(now - window.t0, 1e-9)
    row = {"step": run.step, "loss": mean_loss, "lr": lr, "it_s": rate, "time": run.elapsed}
    window.rows.append(row)
    if run.dist.main:
        with open(run.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{mean_loss:.4f}", it_s=f"{rate:.1f}")
    window.total.zero_()
    window.steps, window.t0 = 0, time.perf_counter()


def _first_loss(run: _Run, loss: Tensor) -> None:
    """The untrained loss, the scale divergence is judged by: the mean over the first steps until they
    hold ``FIRST_EXAMPLES`` examples (one step at batch >= 64; a batch of 1 alone is too noisy)."""
    run.first_losses.append(float(loss))
    if len(run.first_losses) * run.cfg.batch >= FIRST_EXAMPLES:
        run.first_loss = sum(run.first_losses) / len(run.first_losses)


FIRST_EXAMPLES = 64
#: A logged loss above this multiple of the run's first-step loss stops training as diverged (every
#: parameterisation starts near its untrained loss and goes down; --lr 1..100 on moons went 17-400x up).
DIVERGED = 10.0


def _check_finite(run: _Run) -> None:
    """Stop, naming the step, if a step since the start had NaN/inf gradients."""
    bad = int(run.bad_step)
    if bad >= 0:
        raise FloatingPointError(
            f"training stopped: the gradients of step {bad} are not finite (NaN or inf); {_kept(run)}"
        )


def _kept(run: _Run, advice: bool = True) -> str:
    where = (f"the last good checkpoint, step {run.saved_step}, is kept in {run.run_dir / 'checkpoints'}"
             if run.saved_step is not None else "no checkpoint was saved")  # fmt: skip
    clip = "" if run.cfg.grad_clip else " or turn --grad-clip on"
    return f"{where}; lower --lr (now {run.cfg.lr:g}){clip}" if advice else where


def _save_checkpoint(run: _Run, loss_total: Tensor) -> None:
    """Save weights, EMA, optimiser and everything resume needs (rank 0), unless a gradient, the loss
    summed since the last log row or a weight is not finite: such weights are never saved."""
    _check_finite(run)
    if not torch.isfinite(loss_total):
        raise FloatingPointError(
            f"training loss is not finite before step {run.step}; {_kept(run)}"
        )
    if not all(bool(torch.isfinite(p).all()) for p in run.net.parameters()):
        raise FloatingPointError(
            f"training stopped: the weights at step {run.step} are not finite; {_kept(run)}"
        )
    if run.dist.main:
        otensors, groups = ckpt.optimizer_to_tensors(run.opt)
        state = {
            "step": run.step,
            "elapsed": run.elapsed,
            "config": run.cfg.to_dict(),
            "net": run.net_cfg,
            "data": run.info,
            "data_order": run.order.state(),
            "rng": _rng_state(run.device),
            "optim_groups": groups,
            "first_loss": run.first_loss,
            "scorekit_version": _version(),
        }
        tensors = {"model": run.net.state_dict(), "ema": run.ema.module.state_dict(),
                   "optim": otensors}  # fmt: skip
        try:
            ckpt.save(run.run_dir, run.step, tensors, state, keep=run.cfg.keep)
        except OSError as e:  # one line naming the checkpoint and what is kept
            raise OSError(
                e.errno, f"{e.strerror or e}; could not write checkpoint step {run.step}; "
                f"{_kept(run, advice=False)}; free space, then --resume", str(run.run_dir)
            ) from e  # fmt: skip
    run.saved_step = run.step
    run.dist.barrier()


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
