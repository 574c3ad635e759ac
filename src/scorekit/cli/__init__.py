"""The ``scorekit`` command.

Each subcommand lives in its own module of this package, which defines ``add_arguments(parser)`` and
``run(args) -> int``. The table below is the one place that lists them; a module is imported only
when its subcommand runs (or when ``--help`` lists it), so ``scorekit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module in ``scorekit.cli``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "train on built-in data, sample fast, write a report folder (the main job)"),
    "train": ("train", "train a denoiser on a built-in data set or your own files"),
    "sample": ("sample", "draw samples from a trained run (.npy or .png)"),
    "likelihood": ("likelihood", "per-example log-likelihoods of a data file under a trained run"),
    "bench": ("bench", "benchmarks on exact targets (samplers, training, likelihood)"),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scorekit",
        description="Score-based generative modelling: train, sample, measure, in one frame.",
    )
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
    try:
        return int(mod.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # User errors: one clear line, no traceback. Programming errors still raise.
        if getattr(args, "debug", False):
            raise
        print(f"scorekit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
