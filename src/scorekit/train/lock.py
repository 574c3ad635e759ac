"""One training per run folder: a lock file created atomically, released on exit, taken over when stale.

``RUN_DIR/train.lock`` holds JSON ``{"pid", "host", "started"}`` of the process training there. It is
created with ``O_CREAT | O_EXCL`` (exactly one of two racing processes succeeds) and deleted when the
training ends, by an exception included. A process killed with SIGKILL cannot delete it: a lock whose
process no longer exists on this host is stale and the next training takes it over, saying so. A lock
from another host cannot be checked and is never taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["LOCK", "RunLockedError", "run_lock"]

LOCK = "train.lock"
#: A lock file still empty or unreadable this long after it was created is a crash mid-creation.
_UNREADABLE_GRACE_S = 10.0


class RunLockedError(ValueError):
    """Another training holds the run folder's lock."""


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the ``with`` block (the folder is created if needed).

    Raises:
        RunLockedError: (a ValueError) naming the holder's pid, host and start time.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if not _stale(path, holder):
                raise RunLockedError(_busy(run_dir, path, holder)) from None
            print(f"scorekit train: {path}: the training that held it ({_who(holder)}) is gone; "
                  "taking it over", file=sys.stderr)  # fmt: skip
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        break
    else:  # pragma: no cover - three processes racing for one stale lock
        raise RunLockedError(_busy(run_dir, path, _holder(path)))
    try:
        yield path
    finally:
        if _holder(path) == me:  # never delete a lock that someone took over from us
            path.unlink(missing_ok=True)


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _stale(path: Path, holder: dict | None) -> bool:
    if holder is None:  # being written right now, or a crash between creating and writing it
        try:
            return time.time() - path.stat().st_mtime > _UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _who(holder: dict | None) -> str:
    if holder is None:
        return "unknown process: the lock file is empty"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _busy(run_dir: Path, path: Path, holder: dict | None) -> str:
    return (
        f"--out {run_dir} is in use by another training ({_who(holder)}); wait for it to end or "
        f"use another --out (if that process is gone for good, delete {path})"
    )
