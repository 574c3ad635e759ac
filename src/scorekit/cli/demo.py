"""``scorekit demo``: the main job. Train on a 2-D shape and on digits, sample fast, write a report.

On a 2-core CPU machine the default run takes about 4-5 minutes:

1. ``ring`` (8 Gaussians; the exact distribution is known): a small MLP denoiser, then 10,000
   samples at NFE 10; sliced W2 to exact samples next to the floor (two exact sample sets).
2. ``digits`` (scikit-learn's 8x8 digits, 80% for training): a small U-Net for a few minutes, then
   as many samples as training images at NFE 10; FD-digits against the held-out 20% next to its
   floor (training vs held-out), and a classifier's confidence on the samples.

The report folder holds ``report.md`` (the figures, in words), ``report.json``, sample pictures,
real-vs-generated panels, loss curves, and the two training runs (usable with ``scorekit sample``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="scorekit_demo", help="report folder (default ./scorekit_demo)")
    a("--quick", action="store_true", help="a much shorter run (about 1 minute): lower quality")
    a("--digits-minutes", type=float, help="digits training time (default 3, quick 0.5)")
    a("--digits-steps", type=int, help="stop digits training after this many steps as well")
    a("--ring-steps", type=int, help="ring training steps (default 2000, quick 400)")
    a("--digits-net", type=json.loads, help=argparse.SUPPRESS)  # tests: a smaller U-Net
    a("--nfe", type=int, default=10, help="denoiser calls per sample (default 10)")
    a("--sampler", default="ipndm", help="sampler (default ipndm, a 4th-order multistep method)")
    a("--overwrite", action="store_true",
      help="the report folder holds an earlier report: delete it (report, pictures, runs) and start afresh")  # fmt: skip
    a("--threads", default="auto", help="torch CPU threads: auto (default: all cores, dropping to "
      "half while another process competes for them; see scorekit.threads) or a whole number")  # fmt: skip
    a("--no-progress", action="store_true")
    a("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from scorekit._util import atomic_write, atomic_write_json
    from scorekit.bench.train import digits, ring
    from scorekit.cli import check_sampling
    from scorekit.threads import parse_threads, start_threads

    threads = parse_threads(args.threads)  # a bad value fails before any work
    check_sampling(args.sampler, args.nfe)  # like every name and number: before any training
    t0 = time.perf_counter()
    out = Path(args.out)
    ring_steps, minutes = _lengths(args)  # zero is an error, not "the default"
    _fresh_report_folder(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    # Threads: two threads per process made training 4-15x slower than one on a 2-core machine as
    # soon as another process wanted a core, and faster when none did; ``auto`` (scorekit.threads)
    # starts by the load and adapts each training to its measured step times.
    n = start_threads(threads)
    print(f"scorekit demo: report folder {out}/ ({n} CPU thread{'s' if n > 1 else ''} at start, "
          f"--threads {threads})")  # fmt: skip

    print(f"[1/2] ring of 8 Gaussians: training {ring_steps} steps ...", flush=True)
    r = ring(out, steps=ring_steps, nfe=args.nfe, sampler=args.sampler, progress=progress,
             overwrite=args.overwrite, threads=threads)  # fmt: skip
    shutil.copyfile(out / "ring_run" / "loss.png", out / "ring_loss.png")
    print(
        f"      sliced W2 to exact samples {r['sw2']:.4f} (floor {r['sw2_floor']:.4f}, "
        f"ratio {r['ratio']:.2f}) with {args.sampler} at NFE {args.nfe}",
        flush=True,
    )

    print(f"[2/2] digits: training a U-Net for {minutes:g} min ...", flush=True)
    d = digits(
        out, minutes=minutes, steps=args.digits_steps, nfe=args.nfe, sampler=args.sampler,
        net=args.digits_net, progress=progress, overwrite=args.overwrite, threads=threads,
    )  # fmt: skip
    shutil.copyfile(out / "digits_run" / "loss.png", out / "digits_loss.png")
    print(
        f"      FD-digits {d['fd']:.2f} (floor {d['fd_floor']:.2f}, ratio {d['fd_ratio']:.2f}); "
        f"classifier confidence {d['confidence']:.3f} (real digits {d['confidence_real']:.3f})",
        flush=True,
    )

    total = time.perf_counter() - t0
    report = {"ring": r, "digits": d, "total_seconds": total, "quick": args.quick}
    atomic_write_json(out / "report.json", report)
    atomic_write(out / "report.md", _markdown(report, args).encode())
    print(f"done in {total:.0f} s. Report: {out / 'report.md'} (pictures and figures in {out}/)")
    return 0


def _lengths(args: argparse.Namespace) -> tuple[int, float]:
    """``(ring steps, digits minutes)``: as given (checked), else the defaults of the run's size."""
    from scorekit._util import check_int, check_number

    if args.digits_steps is not None:
        check_int("--digits-steps", args.digits_steps, least=1)
    ring_steps = 400 if args.quick else 2000
    if args.ring_steps is not None:
        ring_steps = check_int("--ring-steps", args.ring_steps, least=1)
    minutes = 0.5 if args.quick else 3.0
    if args.digits_minutes is not None:
        minutes = check_number("--digits-minutes", args.digits_minutes, low=0, low_ok=False)
    return ring_steps, minutes


#: What ``demo`` writes in its report folder (besides the two run folders).
REPORT_FILES = ("report.json", "report.md", "ring_samples.png", "ring_real_vs_generated.png",
                "ring_loss.png", "digits_samples.png", "digits_real_vs_generated.png", "digits_loss.png")  # fmt: skip
_RUNS = ("ring_run", "digits_run")


def _fresh_report_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier report (its figures would mix with the new ones), or with
    ``overwrite`` delete the report's files; the run folders are replaced by ``train(overwrite=True)``."""
    old = [name for name in (*REPORT_FILES, *_RUNS) if (out / name).exists()]
    if not old:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds a demo report ({', '.join(old[:3])}{' ...' if len(old) > 3 else ''}); "
            "use --overwrite to replace it, or another --out"
        )
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    gone = [name for name in old if name in REPORT_FILES]
    print(f"scorekit demo: --overwrite: deleted the earlier report in {out}/ ({', '.join(gone) or 'nothing'}); "
          "its runs are replaced as they are trained")  # fmt: skip


def _markdown(rep: dict, args: argparse.Namespace) -> str:
    r, d = rep["ring"], rep["digits"]
    return f"""# scorekit demo report

Total time {rep["total_seconds"]:.0f} s{" (--quick)" if rep["quick"] else ""}. Sampler {args.sampler}, NFE {args.nfe}.

## Ring of 8 Gaussians (exact target known)

- training: {r["steps"]} steps, {r["train_wall_s"]:.0f} s
- sliced W2 (10,000 generated vs 10,000 exact samples): **{r["sw2"]:.4f}**;
  floor (two exact sample sets): {r["sw2_floor"]:.4f}; ratio **{r["ratio"]:.2f}** (2 or less is good)
- pictures: `ring_samples.png`, `ring_real_vs_generated.png`, `ring_loss.png`

## Digits (8x8, 80% train / 20% held out)

- training: {d["steps"]} steps, {d["train_wall_s"]:.0f} s on {d["threads"]} threads
- FD-digits (generated vs held-out, classifier features): **{d["fd"]:.2f}**;
  floor (training vs held-out): {d["fd_floor"]:.2f}; ratio **{d["fd_ratio"]:.2f}** (3 or less is good)
- classifier confidence on generated digits: **{d["confidence"]:.3f}** (held-out real digits:
  {d["confidence_real"]:.3f}; classifier accuracy on held-out {d["accuracy_heldout"]:.3f})
- predicted classes of generated digits: {d["class_histogram"]}
- pictures: `digits_samples.png`, `digits_real_vs_generated.png`, `digits_loss.png`

More samples: `scorekit sample --run {Path(args.out) / "digits_run"} --n 64 --nfe 10 --out more.png`
"""
