"""One writer per output directory: an advisory lock on a file in it.

The kernel holds the lock (flock) for the process and drops it when the process ends, by
`kill -9` and out-of-memory too, so a lock is never left behind by a dead run and there is
no stale lock to take over. The file names the holder (PID and host) for the message a second
run gets. On network file systems that do not support flock, two hosts are not kept apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from ..errors import StoreError

__all__ = ["Lock", "LOCK_FILE"]

LOCK_FILE = "_lock"


class Lock:
    """`directory`'s lock; `label` names what it guards in messages (a bucket's URL, whose
    journal folder this is), by default the directory."""

    def __init__(self, directory: Path, label: str | None = None) -> None:
        self.path = directory / LOCK_FILE
        self._label = label or str(directory)
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        lock_file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip()
            lock_file.close()
            raise StoreError(f"output.dir: another annotate run is writing to {self._label} "
                             f"({holder or 'holder unknown'})") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        lock_file.flush()
        self._file = lock_file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock; the file stays, so no one locks a stale inode
            self._file = None
