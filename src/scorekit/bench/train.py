"""``scorekit bench train``: training quality on ring8 and digits, and the loop's overhead.

Three parts (``--part``, default all):

* ``ring``: train on the built-in ``ring`` data (the same distribution as the exact target
  ``analytic.target("ring8")``) for ``--ring-steps`` steps (sized to take at most 60 s of CPU on
  one core), draw 10,000 samples at NFE 10 and report the sliced W2 to 10,000 exact samples next
  to the floor: SW2 between two independent exact sample sets of the same size. Goal: ratio <= 2.
* ``digits``: train a U-Net (``DIGITS_NET``) on 80% of ``digits`` for ``--digits-minutes`` (default 10) on
  the threads given, draw as many samples as training images at NFE 10 and report FD-digits
  (``scorekit.train.quality``) against the held-out 20% next to its floor FD(train, held-out), and
  the classifier's mean confidence. Goals: ratio <= 3, confidence >= 0.8. Writes a sample grid PNG.
* ``overhead``: steps/s of ``scorekit.train.train`` against a bare PyTorch loop (same network,
  data, batch, loss, AdamW), in this process, alternating the two ``--repeats`` times; the ratio
  of medians is reported. Goal: scorekit >= 0.9 x bare.

``--contention`` runs instead: steps/s of a digits training (``DIGITS_NET``, batch 64) for
``--contention-seconds`` each, for the default ``--threads auto`` (``scorekit.threads``) and 1 and 2
threads pinned, alone, next to a competing busy process (a 1-thread numpy matmul loop started
before the run) and with one joining half-way; written to ``bench_contention.json``. Goal: ``auto``
keeps >= 70% of its alone speed next to one busy process on a 2-core machine.

Results are printed and written to ``--out`` (``bench_train.json`` and pictures). The machine's
load average is recorded, since other work on a shared machine slows every timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

RING_NET = {"hidden": 128, "depth": 3, "emb_dim": 64}
# One residual block per level at batch 64: measured at equal CPU time on digits, FD-digits ratio 2.46
# (1200 steps) against 3.46 for the default two blocks at batch 128 (422 steps).
DIGITS_NET = {"num_res_blocks": 1}
DIGITS_BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--part", choices=("all", "ring", "digits", "overhead"), default="all")
    a("--out", default="bench_train", help="folder for the JSON results and pictures")
    a("--ring-steps", type=int, default=3000, help="training steps for ring (default 3000)")
    a("--digits-minutes", type=float, default=10.0, help="training minutes for digits (default 10)")
    a("--threads", type=int, default=1,
      help="torch threads (default 1: with more threads than free cores training slows many-fold)")  # fmt: skip
    a("--repeats", type=int, default=3, help="alternating timing repeats for the overhead part")
    a("--nfe", type=int, default=10)
    a("--sampler", default="dpmpp_2m", help="sampler for the quality parts (default dpmpp_2m)")
    a("--contention", action="store_true",
      help="instead: digits steps/s alone and next to a busy process, for --threads auto, 1 and 2")  # fmt: skip
    a("--contention-seconds", type=float, default=25.0,
      help="training seconds per contention cell (default 25; 9 cells)")  # fmt: skip


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def ring(
    out: Path, *, steps: int, nfe: int, sampler: str, n: int = 10_000, progress: bool = True,
    overwrite: bool = False, threads=None,
) -> dict:  # fmt: skip
    """Train on ``ring`` for ``steps`` steps; SW2 of 10,000 samples at ``nfe`` against the exact floor."""
    from scorekit.analytic import target
    from scorekit.metrics import sliced_wasserstein
    from scorekit.runs import decode, generate, load_run
    from scorekit.train import TrainConfig, train
    from scorekit.train.plots import save_panel, save_scatter

    cfg = TrainConfig(
        data="ring", out=str(out / "ring_run"), steps=steps, batch=512, lr=2e-3,
        net=RING_NET, ckpt_every=10**9, log_every=20,
    )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    res = train(cfg, progress=progress, overwrite=overwrite, threads=threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    denoiser, info = load_run(cfg.out)
    x = generate(denoiser, info, n, batch=10_000, progress=False, nfe=nfe,
                 sampler=sampler, seed=12345)  # fmt: skip
    gen = torch.as_tensor(decode(x, info), dtype=torch.float64)
    exact = target("ring8")
    ref = exact.sample(n, torch.Generator().manual_seed(1))
    ref2 = exact.sample(n, torch.Generator().manual_seed(2))
    sw, floor = sliced_wasserstein(gen, ref), sliced_wasserstein(ref2, ref)
    save_scatter(out / "ring_samples.png", gen[:4000].numpy(), reference=ref[:4000].numpy(),
                 title=f"ring8: generated ({sampler}, NFE {nfe}) over exact samples")  # fmt: skip
    save_panel(out / "ring_real_vs_generated.png", ref[:4000].numpy(), gen[:4000].numpy(),
               title=f"ring8: exact vs generated ({sampler}, NFE {nfe}); SW2 {sw:.4f}, floor {floor:.4f}")  # fmt: skip
    return {
        "steps": res.step, "train_wall_s": wall, "train_cpu_s": cpu, "nfe": nfe, "sampler": sampler,
        "sw2": sw, "sw2_floor": floor, "ratio": sw / floor, "goal_ratio": 2.0,
        "ok": sw / floor <= 2.0 and cpu <= 60.0,
    }  # fmt: skip


def digits(
    out: Path,
    *,
    minutes: float,
    nfe: int,
    sampler: str,
    steps: int | None = None,
    net: dict | None = None,
    batch: int = DIGITS_BATCH,
    progress: bool = True,
    overwrite: bool = False,
    threads=None,
    cond: bool = False,
) -> dict:
    """Train on 80% of digits for ``minutes`` (or ``steps``); FD-digits, floor and confidence at ``nfe``.

    With ``cond`` the network is class-conditional with label dropout (``scorekit train --cond``), so
    the run can also be guided and used as an inverse-problem prior. Its quality figures are then
    those of class-conditional samples with as many of each class as the training split holds (the
    data's own class mixture): the label-dropped branch sees only the dropout fraction of the
    training examples and is not what a conditional model is for (measured on the demo's run: FD
    ratio 13 unconditional against 1.6 per class, dpmpp_2m at NFE 10).
    """
    from scorekit import data
    from scorekit.runs import decode, generate, load_run, picture, pixel_range
    from scorekit.train import TrainConfig, train
    from scorekit.train.plots import save_panel
    from scorekit.train.quality import fit_classifier, image_quality

    full = data.load("digits")
    tr, te = data.split(full, holdout=0.2, seed=0)
    cfg = TrainConfig(
        data="digits", out=str(out / "digits_run"), minutes=minutes, steps=steps, batch=batch,
        lr=2e-3, holdout=0.2, ckpt_every=500, log_every=10, net=DIGITS_NET if net is None else net,
        cond=cond,
    )  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    res = train(cfg, progress=progress, dataset=tr, overwrite=overwrite, threads=threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    denoiser, info = load_run(cfg.out)
    if cond:
        x = _per_class(denoiser, info, np.asarray(tr.labels), nfe=nfe, sampler=sampler)
    else:
        x = generate(denoiser, info, len(tr.x), batch=500, progress=False, nfe=nfe,
                     sampler=sampler, seed=12345).clamp(-1, 1)  # fmt: skip
    clf = fit_classifier(tr.x, tr.labels)
    q = image_quality(x, tr.x, te.x, te.labels, clf)
    picture(
        out / "digits_samples.png",
        x[:100],
        info,
        title=f"digits: {sampler}, NFE {nfe}, {res.step} steps",
    )
    lo, hi = pixel_range(info)
    save_panel(out / "digits_real_vs_generated.png", decode(te.x[:64], info), decode(x[:64], info), vmin=lo, vmax=hi,
               title=f"held-out real vs generated; FD {q.fd:.2f} (floor {q.fd_floor:.2f})")  # fmt: skip
    return {
        "steps": res.step, "train_wall_s": wall, "train_cpu_s": cpu, "threads": torch.get_num_threads(),
        "nfe": nfe, "sampler": sampler, **q.to_dict(), "goal_ratio": 3.0, "goal_confidence": 0.8,
        "ok": q.fd_ratio <= 3.0 and q.confidence >= 0.8,
    }  # fmt: skip


def _per_class(denoiser, info: dict, labels: np.ndarray, *, nfe: int, sampler: str) -> Tensor:
    """As many samples of each class as ``labels`` holds (class ``c`` from seed ``12345 + c``), in a
    fixed shuffled order so that the first rows show every class."""
    from scorekit.runs import generate

    xs = [generate(denoiser, info, int((labels == c).sum()), batch=500, progress=False, nfe=nfe,
                   sampler=sampler, seed=12345 + int(c), label=int(c))
          for c in np.unique(labels)]  # fmt: skip
    x = torch.cat(xs).clamp(-1, 1)
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]


def _bare_steps_per_second(ds, net_cfg: dict, *, steps: int, batch: int) -> tuple[float, float]:
    """A plain PyTorch EDM training loop: sample a batch, noise it, weighted MSE, AdamW step.

    Returns steps per second of wall-clock time and of this process's CPU time, over all steps
    (the first included, as for ``train``).
    """
    from scorekit import nets
    from scorekit._util import append_dims
    from scorekit.denoiser import EDMPrecond, NetDenoiser

    torch.manual_seed(0)
    net = nets.build(net_cfg)
    sd = float(ds.x.std())
    denoiser = NetDenoiser(net, EDMPrecond(sd))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x_all = ds.x
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x0 = x_all[torch.randint(len(x_all), (batch,))]
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch))
        noise = torch.randn_like(x0)
        w = (sigma**2 + sd**2) / (sigma * sd) ** 2
        d = denoiser(x0 + append_dims(sigma, x0.ndim) * noise, sigma)
        loss = (w * (d - x0).square().flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def overhead(out: Path, *, repeats: int, progress: bool = True) -> dict:
    """scorekit's loop vs a bare loop on ring (MLP, batch 512) and digits (U-Net, batch 128)."""
    from scorekit import data, nets
    from scorekit.train import TrainConfig, train

    results = {}
    for name, batch, steps, override in (("ring", 512, 500, RING_NET), ("digits", 128, 40, {})):
        ds = data.load(name)
        net_cfg = {**nets.default_config(ds.kind, ds.shape), **override}
        bare, ours, bare_cpu, ours_cpu = [], [], [], []
        for _ in range(repeats):
            wall, cpu = _bare_steps_per_second(ds, net_cfg, steps=steps, batch=batch)
            bare.append(wall)
            bare_cpu.append(cpu)
            cfg = TrainConfig(data=name, out=str(out / f"overhead_{name}"), steps=steps, batch=batch,
                              net=override, ckpt_every=10**9, log_every=50)  # fmt: skip
            res = train(cfg, dataset=ds, progress=progress, overwrite=True)  # its own scratch run
            ours.append(res.steps_per_second)
            ours_cpu.append(res.cpu_steps_per_second)
        ratio = statistics.median(ours) / statistics.median(bare)
        ratio_cpu = statistics.median(ours_cpu) / statistics.median(bare_cpu)
        results[name] = {
            "batch": batch, "steps": steps, "bare_steps_s": bare, "scorekit_steps_s": ours,
            "bare_cpu_steps_s": bare_cpu, "scorekit_cpu_steps_s": ours_cpu,
            "ratio_of_medians": ratio, "ratio_of_medians_cpu": ratio_cpu, "goal": 0.9,
            "ok": ratio >= 0.9,
        }  # fmt: skip
    return results


def run(args: argparse.Namespace) -> int:
    if args.contention:
        return _run_contention(Path(args.out), args.contention_seconds)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"load_before": _load(), "threads": torch.get_num_threads()}
    parts = ("ring", "digits", "overhead") if args.part == "all" else (args.part,)
    if "ring" in parts:
        report["ring"] = r = ring(out, steps=args.ring_steps, nfe=args.nfe, sampler=args.sampler,
                                      overwrite=True)  # fmt: skip
        print(f"ring8: {r['steps']} steps, {r['train_cpu_s']:.1f} s CPU ({r['train_wall_s']:.1f} s wall); "
              f"SW2 at NFE {r['nfe']} = {r['sw2']:.4f}, floor {r['sw2_floor']:.4f}, "
              f"ratio {r['ratio']:.2f} (goal <= 2)")  # fmt: skip
    if "digits" in parts:
        report["digits"] = d = digits(
            out, minutes=args.digits_minutes, nfe=args.nfe, sampler=args.sampler, overwrite=True
        )
        print(f"digits: {d['steps']} steps in {d['train_wall_s']:.0f} s wall on {d['threads']} threads; "
              f"FD-digits {d['fd']:.2f} vs floor {d['fd_floor']:.2f} (ratio {d['fd_ratio']:.2f}, goal <= 3); "
              f"confidence {d['confidence']:.3f} (real {d['confidence_real']:.3f}; goal >= 0.8)")  # fmt: skip
    if "overhead" in parts:
        report["overhead"] = oh = overhead(out, repeats=args.repeats)
        for name, o in oh.items():
            print(f"overhead {name} (batch {o['batch']}): bare loop "
                  f"{', '.join(f'{v:.1f}' for v in o['bare_steps_s'])} steps/s; scorekit "
                  f"{', '.join(f'{v:.1f}' for v in o['scorekit_steps_s'])} steps/s; "
                  f"ratio of medians {o['ratio_of_medians']:.3f} (goal >= 0.9); per CPU-second: "
                  f"bare {statistics.median(o['bare_cpu_steps_s']):.1f}, scorekit "
                  f"{statistics.median(o['scorekit_cpu_steps_s']):.1f}, ratio {o['ratio_of_medians_cpu']:.3f}")  # fmt: skip
    report["load_after"] = _load()
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    from scorekit._util import atomic_write_json

    atomic_write_json(out / "bench_train.json", report)
    print(f"results: {out / 'bench_train.json'}")
    return 0


# -- contention: steps/s next to a competing busy process -------------------------------------------

#: A CPU-bound competitor: a 1-thread numpy matmul loop, as another user's job would be.
_SPIN = "import numpy as np\na = np.random.rand(256, 256)\nwhile True:\n    a = a @ a\n    a /= a.max()\n"
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _competitor():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _SPIN], env={**os.environ, **_ONE_THREAD},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def contention(out: Path, *, seconds: float, progress: bool = False) -> dict:
    """Steps/s of a digits training (``DIGITS_NET``, batch ``DIGITS_BATCH``) for ``seconds`` of
    training time, per thread policy (the default ``auto``, 1 and 2 pinned) and condition: ``alone``,
    ``busy`` (a competitor started 2 s before the run) and ``joins`` (a competitor started half-way).
    Each condition runs its policies back to back so that slow drifts of the machine's load hit
    every policy alike; the competitor is killed after each run."""
    import tempfile
    import threading

    from scorekit import data
    from scorekit.threads import ThreadPolicy
    from scorekit.train import TrainConfig, train

    tr, _ = data.split(data.load("digits"), holdout=0.2, seed=0)
    rows: dict = {}
    for cond in ("alone", "busy", "joins"):
        for spec in ("auto", 1, 2):
            policy = ThreadPolicy(spec)
            scratch = tempfile.TemporaryDirectory(prefix="contention_", dir=out)
            cfg = TrainConfig(data="digits", out=scratch.name, minutes=seconds / 60,
                              batch=DIGITS_BATCH, holdout=0.2, ckpt_every=10**9, log_every=10**9,
                              net=DIGITS_NET)  # fmt: skip
            procs: list = []
            timer = None
            if cond == "busy":
                procs.append(_competitor())
                time.sleep(2.0)
            elif cond == "joins":
                timer = threading.Timer(
                    seconds / 2, lambda procs=procs: procs.append(_competitor())
                )
                timer.start()
            load = os.getloadavg()[0]
            try:
                res = train(cfg, dataset=tr, progress=progress, threads=policy)
            finally:
                scratch.cleanup()
                if timer is not None:
                    timer.cancel()
                for p in procs:
                    p.kill()
                    p.wait()
            rows.setdefault(str(spec), {})[cond] = {
                "steps_s": res.steps_per_second, "steps": res.step, "load1_at_start": load,
                "start_threads": policy.initial,
                "end_threads": policy.threads, "switches": policy.switches,
            }  # fmt: skip
            print(f"  {cond:5s} threads={spec!s:4s}: {res.steps_per_second:.2f} steps/s "
                  f"({res.step} steps; 1-min load {load:.2f}; threads {policy.initial} at start, "
                  f"{policy.threads} at end, {len(policy.switches)} switches)",
                  flush=True)  # fmt: skip
    for r in rows.values():
        r["busy_over_alone"] = r["busy"]["steps_s"] / r["alone"]["steps_s"]
    auto = rows["auto"]["busy_over_alone"]
    return {"seconds": seconds, "policies": rows, "goal_busy_over_alone": 0.7, "ok": auto >= 0.7}


def _print_contention(c: dict) -> None:
    print(f"contention: digits training, {c['seconds']:g} s per cell, steps/s")
    print(f"{'threads':>8s} {'alone':>7s} {'busy':>7s} {'busy/alone':>10s} {'joins':>7s}")
    for spec, r in c["policies"].items():
        print(f"{spec:>8s} {r['alone']['steps_s']:7.2f} {r['busy']['steps_s']:7.2f} "
              f"{r['busy_over_alone']:10.2f} {r['joins']['steps_s']:7.2f}")  # fmt: skip
    print(f"goal: auto keeps >= 70% of its alone speed next to one busy process: "
          f"{'met' if c['ok'] else 'NOT met'}")  # fmt: skip


def _run_contention(out: Path, seconds: float) -> int:
    from scorekit._util import atomic_write_json

    if not seconds > 0:
        raise ValueError(f"--contention-seconds must be > 0, got {seconds}")
    out.mkdir(parents=True, exist_ok=True)
    report = {"load_before": _load(), "cores": os.cpu_count()}
    report["idle_before"] = idle = os.getloadavg()[0] < 0.5
    if not idle:
        print(f"note: 1-minute load {report['load_before'].split()[0]} before the run: the machine "
              "is not idle, so 'alone' is not alone; re-run on a quiet machine for the goal")  # fmt: skip
    report["contention"] = c = contention(out, seconds=seconds)
    report["load_after"] = _load()
    _print_contention(c)
    print(f"load average before {report['load_before']}, after {report['load_after']} "
          "(other work on the machine slows every cell)")  # fmt: skip
    atomic_write_json(out / "bench_contention.json", report)
    print(f"results: {out / 'bench_contention.json'}")
    return 0
