"""The training run folder: what ``train`` writes there, and never mixing two runs in one folder.

A fresh run into a folder that holds a run is refused (``--resume`` continues it, ``--overwrite``
deletes its files first, saying so), so a log, a configuration and checkpoints always belong to one run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["RUN_FILES", "fresh_folder", "holds_run"]


#: What ``train`` writes in a run folder; a folder holding any of them holds a run.
RUN_FILES = ("config.json", "log.jsonl", "loss.png", "checkpoints", "samples")


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds (part of) a training run: any of ``RUN_FILES``."""
    return any((Path(folder) / name).exists() for name in RUN_FILES)


def fresh_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run into a folder holding a run, or with ``overwrite`` delete that run's files
    (only ``RUN_FILES``: anything else of the user's stays) and say so."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one")
    if resume or not holds_run(out):
        return
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds a training run; use --resume to continue it, --overwrite "
            "to delete it and start afresh, or another --out"
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 deletes; the others only check
    gone = [name for name in RUN_FILES if (out / name).exists()]
    for name in gone:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink()
    print(f"scorekit train: --overwrite: deleted the previous run in {out} ({', '.join(gone)})",
          file=sys.stderr)  # fmt: skip
