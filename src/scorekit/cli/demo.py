"""``scorekit demo``: the main job. Train on a 2-D shape and on digits, sample fast, write a report.

On a 2-core CPU machine the default run takes about 6 minutes (5 with --skip-extras):

1. ``ring`` (8 Gaussians; the exact distribution is known): a small MLP denoiser, then 10,000
   samples at NFE 10; sliced W2 to exact samples next to the floor (two exact sample sets).
2. ``digits`` (scikit-learn's 8x8 digits, 80% for training): a small U-Net for a few minutes, then
   as many samples as training images at NFE 10; FD-digits against the held-out 20% next to its
   floor (training vs held-out), and a classifier's confidence on the samples. The U-Net is
   class-conditional (label dropout 0.1), so the same run is then
3. guided: one grid of digits 0-9 per guidance rule at its default scale, with a pixel
   classifier's accuracy and FD/MMD to held-out digits (``scorekit.bench.guidance_digits``);
4. used as a prior for inverse problems: inpainting, 2x super-resolution, blur and heavy denoising
   of held-out digits, 8 posterior samples each, and the classifier's accuracy on them
   (``scorekit.bench.inverse.demo_section``; solver ``--inverse-solver``).

The report folder holds ``report.md`` (the figures, in words), ``report.json``, sample pictures,
real-vs-generated panels, loss curves, and the two training runs (usable with ``scorekit sample``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

#: The inverse-problem panels' solver: cheap enough for a 5-minute demo (no backward passes through
#: the network), exact data consistency on the four linear tasks; scorekit restore's default is TDS.
DEMO_SOLVER = "ddnm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--out", default="scorekit_demo", help="report folder (default ./scorekit_demo)")
    a("--quick", action="store_true", help="a much shorter run (about 1 minute): lower quality")
    a("--digits-minutes", type=float, help="digits training time (default 3, quick 0.5)")
    a("--digits-steps", type=int, help="stop digits training after this many steps as well")
    a("--ring-steps", type=int, help="ring training steps (default 2000, quick 400)")
    a("--digits-net", type=json.loads, help=argparse.SUPPRESS)  # tests: a smaller U-Net
    a("--nfe", type=int, default=10, help="denoiser calls per sample (default 10)")
    a(
        "--sampler",
        default="dpmpp_2m",
        help="sampler (default dpmpp_2m, bounded on every trained network of the robustness suite)",
    )
    a("--overwrite", action="store_true",
      help="the report folder holds an earlier report: delete it (report, pictures, runs) and start afresh")  # fmt: skip
    a("--threads", default="auto", help="torch CPU threads: auto (default: all cores, dropping to "
      "half while another process competes for them; see scorekit.threads) or a whole number")  # fmt: skip
    a("--inverse-solver", default=DEMO_SOLVER,
      help=f"posterior sampler for the inverse-problem panels (default {DEMO_SOLVER}; see scorekit.inverse.REGISTRY)")  # fmt: skip
    a(
        "--skip-extras",
        action="store_true",
        help="skip the guidance grids and inverse-problem panels",
    )
    a("--no-progress", action="store_true")
    a("--debug", action="store_true", help="show tracebacks")


def run(args: argparse.Namespace) -> int:
    from scorekit._util import atomic_write, atomic_write_json
    from scorekit.bench.train import digits, ring
    from scorekit.cli import check_sampling
    from scorekit.threads import parse_threads, start_threads

    threads = parse_threads(args.threads)  # a bad value fails before any work
    check_sampling(args.sampler, args.nfe)  # like every name and number: before any training
    _check_solver(args.inverse_solver)
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

    parts = 2 if args.skip_extras else 4
    print(f"[1/{parts}] ring of 8 Gaussians: training {ring_steps} steps ...", flush=True)
    r = ring(out, steps=ring_steps, nfe=args.nfe, sampler=args.sampler, progress=progress,
             overwrite=args.overwrite, threads=threads)  # fmt: skip
    shutil.copyfile(out / "ring_run" / "loss.png", out / "ring_loss.png")
    print(
        f"      sliced W2 to exact samples {r['sw2']:.4f} (floor {r['sw2_floor']:.4f}, "
        f"ratio {r['ratio']:.2f}) with {args.sampler} at NFE {args.nfe}",
        flush=True,
    )

    print(
        f"[2/{parts}] digits: training a class-conditional U-Net for {minutes:g} min ...",
        flush=True,
    )
    d = digits(
        out, minutes=minutes, steps=args.digits_steps, nfe=args.nfe, sampler=args.sampler,
        net=args.digits_net, progress=progress, overwrite=args.overwrite, threads=threads, cond=True,
    )  # fmt: skip
    shutil.copyfile(out / "digits_run" / "loss.png", out / "digits_loss.png")
    print(
        f"      FD-digits {d['fd']:.2f} (floor {d['fd_floor']:.2f}, ratio {d['fd_ratio']:.2f}); "
        f"classifier confidence {d['confidence']:.3f} (real digits {d['confidence_real']:.3f})",
        flush=True,
    )

    extras, extra_md = {}, []
    if not args.skip_extras:
        extras, extra_md = _extras(out, args)
    total = time.perf_counter() - t0
    report = {"ring": r, "digits": d, **extras, "total_seconds": total, "quick": args.quick}
    atomic_write_json(out / "report.json", report)
    atomic_write(out / "report.md", (_markdown(report, args) + "".join(extra_md)).encode())
    print(f"done in {total:.0f} s. Report: {out / 'report.md'} (pictures and figures in {out}/)")
    return 0


def _check_solver(name: str) -> None:
    from scorekit.inverse import REGISTRY

    if name not in REGISTRY:
        raise ValueError(
            f"--inverse-solver must be one of {', '.join(sorted(REGISTRY))}; got {name!r}"
        )


def _extras(out: Path, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Guidance grids and inverse-problem panels drawn from the demo's conditional digits run."""
    from scorekit.bench import guidance_digits, inverse

    run_dir = out / "digits_run"
    print("[3/4] digits: guidance grids, one per rule ...", flush=True)
    t = time.perf_counter()
    g, g_md, _ = guidance_digits.demo_section(run_dir, out, quick=args.quick)
    best = max(g, key=lambda k: g[k]["accuracy"])
    print(f"      {len(g)} rules in {time.perf_counter() - t:.0f} s; highest class accuracy: {best} "
          f"{g[best]['accuracy']:.2f} (unguided conditional {g['cond']['accuracy']:.2f})", flush=True)  # fmt: skip
    print(f"[4/4] digits: inverse problems with {args.inverse_solver} ...", flush=True)
    t = time.perf_counter()
    v, v_md, _ = inverse.demo_section(run_dir, out, quick=args.quick, solver=args.inverse_solver)
    accs = ", ".join(f"{k.split(':')[0]} {r['accuracy_samples']:.2f}" for k, r in v.items())
    print(f"      4 tasks in {time.perf_counter() - t:.0f} s; classifier accuracy on posterior "
          f"samples: {accs}", flush=True)  # fmt: skip
    return {"guidance": g, "inverse": v}, ["\n" + g_md.strip() + "\n", "\n" + v_md.strip() + "\n"]


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
#: ... and the guidance grids and inverse-problem panels (one per rule / task).
REPORT_PATTERNS = ("guidance_*.png", "inverse_*.png")
_RUNS = ("ring_run", "digits_run")


def _fresh_report_folder(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier report (its figures would mix with the new ones), or with
    ``overwrite`` delete the report's files; the run folders are replaced by ``train(overwrite=True)``."""
    extras = (
        sorted(f.name for pat in REPORT_PATTERNS for f in out.glob(pat)) if out.is_dir() else []
    )
    old = [name for name in (*REPORT_FILES, *_RUNS) if (out / name).exists()] + extras
    if not old:
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds a demo report ({', '.join(old[:3])}{' ...' if len(old) > 3 else ''}); "
            "use --overwrite to replace it, or another --out"
        )
    for name in (*REPORT_FILES, *extras):
        (out / name).unlink(missing_ok=True)
    gone = [name for name in old if name in REPORT_FILES or name in extras]
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
- FD-digits (class-conditional samples in the training split's class mix vs held-out, classifier features): **{d["fd"]:.2f}**;
  floor (training vs held-out): {d["fd_floor"]:.2f}; ratio **{d["fd_ratio"]:.2f}** (3 or less is good)
- classifier confidence on generated digits: **{d["confidence"]:.3f}** (held-out real digits:
  {d["confidence_real"]:.3f}; classifier accuracy on held-out {d["accuracy_heldout"]:.3f})
- predicted classes of generated digits: {d["class_histogram"]}
- pictures: `digits_samples.png`, `digits_real_vs_generated.png`, `digits_loss.png`

More samples: `scorekit sample --run {Path(args.out) / "digits_run"} --n 64 --nfe 10 --out more.png`
"""
