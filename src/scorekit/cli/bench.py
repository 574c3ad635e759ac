"""``scorekit bench NAME``: run one benchmark; each lives in ``scorekit.bench.NAME``."""

from __future__ import annotations

import argparse
import importlib

from scorekit.cli import add_debug

#: benchmark -> one-line help; the module ``scorekit.bench.<name>`` defines add_arguments and run.
BENCHES: dict[str, str] = {
    "samplers": "error vs NFE of every sampler x schedule on exact targets, against diffusers",
    "train": "training quality and loop overhead on ring8 and digits",
    "likelihood": "bits/dim, NFE and time of ODE likelihood and ELBO; OOD AUROC",
    "guidance": "sliced W2 to the exact tilted target vs network evaluations, every guidance rule",
    "inverse": "posterior samplers vs the exact posterior of mixtures: sliced W2, coverage, NFE",
    "models": "a diffusers DDPM UNet on the digits: scorekit samplers vs diffusers schedulers",
    "guided_solvers": "DPM-Solver-v3 half-corrector and DC-Solver over guidance scale, exact targets",
    "parallel": "Picard-iteration sampling: sequential rounds vs steps, ODE and SDE samplers",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help_ in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_)
        try:
            mod = importlib.import_module(f"scorekit.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"scorekit.bench.{name}":
                raise
            continue
        mod.add_arguments(p)
        add_debug(p)  # so that --debug may follow the benchmark's own options


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(f"scorekit.bench.{args.bench}").run(args) or 0)
