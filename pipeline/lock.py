"""One writer per output directory: a lock file naming the process that holds it.

A lock whose process is gone (same host, PID no longer running, or running but started
after the lock was taken: a reused PID) is taken over; a live one, or one from another
host, is refused with a message naming its holder.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .errors import StoreError

__all__ = ["Lock", "LOCK_FILE"]

LOCK_FILE = "_lock"


def _started(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return started is None or _started(pid) in (None, started)


class Lock:
    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": _started(os.getpid())}

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._mine, f)
            return

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, -1, str(self._mine["host"])  # unreadable: a torn write by a dead writer
        if host != self._mine["host"]:
            raise StoreError(f"output.dir: {self.path.parent} is locked by PID {pid} on {host}; if that run is "
                             f"gone, delete {self.path}")
        if pid > 0 and _alive(pid, holder.get("started")):
            raise StoreError(f"output.dir: another annotate run (PID {pid}) is writing to {self.path.parent}")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
