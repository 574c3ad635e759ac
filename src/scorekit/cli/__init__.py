"""The ``scorekit`` command.

Each subcommand lives in its own module of this package, which defines ``add_arguments(parser)`` and
``run(args) -> int``. The table below is the one place that lists them; a module is imported only
when its subcommand runs (or when ``--help`` lists it), so ``scorekit --help`` stays fast.

A failure the user can cause (an option, a file, the disk, the device) ends the command with one
line on stderr naming the option or file, what was found and what to do, and exit code 2; ``--debug``
(before or after the subcommand) shows the traceback instead. Subcommands check their outputs with
``check_output`` and their sampler options with ``check_sampling`` before any work starts.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import tempfile
import warnings
from functools import partial
from pathlib import Path

#: subcommand -> (module in ``scorekit.cli``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "train on built-in data, sample fast, write a report folder (the main job)"),
    "train": ("train", "train a denoiser on a built-in data set or your own files"),
    "sample": ("sample", "draw samples from a trained run (.npy or .png)"),
    "train-classifier": ("train_classifier", "a noisy classifier for classifier guidance"),
    "likelihood": ("likelihood", "per-example log-likelihoods of a data file under a trained run"),
    "restore": ("restore", "posterior samples given a measurement (inpaint, super-resolve, deblur, denoise)"),
    "bench": ("bench", "benchmarks on exact targets (samplers, training, likelihood)"),
    "export": ("export", "write a trained run as safetensors + JSON + a model card"),
}


def add_run_dir(parser: argparse.ArgumentParser) -> None:
    """``--run`` / ``--run-dir``: a folder written by ``scorekit train`` (required).

    ``--run-dir`` is the spelling to use under ``torchrun``, whose parser matches abbreviations over
    the whole command line and takes ``--run`` for its own ``--run-path``.
    """
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        metavar="RUN_DIR",
        help="a folder written by scorekit train (use --run-dir under torchrun)",
    )


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """The model to use: ``--run RUN_DIR`` (a scorekit training run) or ``--diffusers PATH`` (a
    diffusers model folder with its scheduler config; ``--subfolder``, ``--allow-pickle``,
    ``--null-label``). Exactly one is required; ``load_model_source`` loads it."""
    g = parser.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", "--run-dir", dest="run", metavar="RUN_DIR",
                   help="a folder written by scorekit train (use --run-dir under torchrun)")  # fmt: skip
    g.add_argument("--diffusers", metavar="PATH",
                   help="a diffusers model or pipeline folder (save_pretrained), with its scheduler "
                   "config; see docs/bring-your-own-model.md")  # fmt: skip
    a = parser.add_argument
    a("--subfolder", help="with --diffusers: the model's folder inside PATH (e.g. unet)")
    a("--allow-pickle", action="store_true",
      help="with --diffusers: load .bin/.ckpt pickle weights, which can run code (trusted files only)")  # fmt: skip
    a("--null-label", type=int, default=None,
      help="with --diffusers: the class id the model was trained with as 'no class' (for guidance)")  # fmt: skip


def load_model_source(args: argparse.Namespace, *, device, weights: str = "ema"):
    """``(denoiser, info)`` of ``--run`` (``scorekit.runs.load_run``) or ``--diffusers``
    (``scorekit.models.from_diffusers``, its ``run_info``)."""
    if getattr(args, "diffusers", None) is None:
        from scorekit.runs import load_run

        return load_run(args.run, weights=weights, device=device)
    from scorekit.models import from_diffusers

    d = from_diffusers(args.diffusers, subfolder=args.subfolder, device=device,
                       allow_pickle=args.allow_pickle)  # fmt: skip
    return d.as_run(null_label=args.null_label, name=Path(args.diffusers).name)


def check_output(path: str, *, suffixes: tuple[str, ...], option: str = "--out") -> Path:
    """``path`` as a ``Path`` once it is known to be writable, or a one-line ValueError.

    Checked before the work starts, so an hour of sampling is not lost to a typo: the suffix is one
    of ``suffixes``; the path is not a folder; its folder exists; a file can be created there (tried
    for real: root writes through permission bits, and a read-only mount only shows on trying).
    """
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"{option} must end in {' or '.join(suffixes)}; got {path!r}")
    if p.is_dir():
        raise ValueError(
            f"{option} {path} is a folder; give a file name, e.g. {p / ('out' + suffixes[0])}"
        )
    parent = p.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {parent} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise ValueError(
            f"{option} {path}: cannot write in {parent} ({e.strerror}); choose another folder"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return p


def check_sampling(sampler: str, nfe: int | None, schedule: str = "karras") -> None:
    """A one-line ValueError unless ``sampler`` and ``schedule`` are known names and ``nfe`` is a
    number of denoiser calls the sampler can make exactly (``None`` for an adaptive sampler)."""
    from scorekit.samplers import ADAPTIVE, get_sampler, get_schedule, steps_for

    for option, check in (("--sampler", lambda: get_sampler(sampler)),
                          ("--schedule", lambda: get_schedule(schedule))):  # fmt: skip
        try:
            check()
        except ValueError as e:
            raise ValueError(f"{option}: {e}") from None
    if sampler in ADAPTIVE:
        if nfe is not None:
            raise ValueError(
                f"--sampler {sampler} is adaptive (its tolerances set the NFE), so --nfe {nfe} "
                "cannot hold; give a fixed-NFE sampler such as ipndm, or (sample) leave out --nfe"
            )
        return
    try:
        steps_for(sampler, nfe, {})
    except ValueError as e:
        raise ValueError(f"--nfe {nfe} with --sampler {sampler}: {e}") from None


def _check_device(name: str) -> None:
    """A one-line ValueError unless ``--device`` names a device torch has here."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise ValueError(
                f"--device {name}: this machine has {n} CUDA device(s); use --device cpu"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: scorekit runs on cpu, cuda or mps")


#: errno -> what to do about it, for the one line an OSError becomes.
_OS_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions or write elsewhere",
    errno.EPERM: "check the permissions or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file name, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def user_error(e: BaseException) -> str | None:
    """The one line a failure the user can cause becomes, or ``None`` for a programming error."""
    from safetensors import SafetensorError

    if isinstance(e, OSError):
        code = errno.errorcode.get(e.errno, "") if e.errno else ""
        where = f"{e.filename}: " if e.filename else ""
        what = e.strerror or str(e) or type(e).__name__
        advice = _OS_ADVICE.get(e.errno)
        msg = f"{where}{what}" + (f" ({code})" if code else "") + (f"; {advice}" if advice else "")
    elif isinstance(e, SafetensorError):
        msg = f"not a valid safetensors file: {e}"
    elif isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        msg = f"out of memory ({str(e).splitlines()[0] if str(e) else 'MemoryError'}); try a smaller --batch"
    elif isinstance(e, (ValueError, TypeError, FloatingPointError)):  # ODESolveError is one
        msg = str(e) or type(e).__name__
    else:
        return None
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _check_common(args: argparse.Namespace) -> None:
    """Options several subcommands share, checked before any of them starts work."""
    device = getattr(args, "device", None)
    if isinstance(device, str):
        _check_device(device)
    threads = getattr(args, "threads", None)
    if isinstance(threads, int) and not isinstance(threads, bool) and threads < 1:
        raise ValueError(f"--threads must be a whole number >= 1; got {threads}")


def add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` unless it has one already (a subcommand may define its own)."""
    try:
        parser.add_argument("--debug", action="store_true", help="show tracebacks")
    except argparse.ArgumentError:
        pass


def _show_warning(command: str, message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the command line: one line, without the source line."""
    print(f"scorekit {command}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scorekit",
        description="Score-based generative modelling: train, sample, measure, in one frame.",
    )
    parser.add_argument("--debug", dest="debug_all", action="store_true",
                        help="show the traceback of an error instead of one line")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            mod = importlib.import_module(f"scorekit.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"scorekit.cli.{module}":
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
        add_debug(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"scorekit {args.command}: not available in this build", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"scorekit.cli.{args._module}")
    debug = args.debug_all or getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            if not debug:  # a warning is one line too (a skipped checkpoint, say)
                warnings.showwarning = partial(_show_warning, args.command)
            _check_common(args)
            return int(mod.run(args) or 0)
    except Exception as e:
        # A failure the user can cause: one clear line. Programming errors still raise.
        message = user_error(e)
        if message is None or debug:
            raise
        print(f"scorekit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
