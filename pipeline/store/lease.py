"""One writer per output directory in a bucket: a lock object with a lease, taken and renewed
by conditional writes.

No kernel drops a bucket's lock when a process dies, so the lock object says until when it
holds (LEASE_S) and its holder renews it every RENEW_S. It is created only if absent
(If-None-Match: *) and renewed or taken over only if unchanged since read (If-Match: its ETag),
so of two runs racing for it one wins. A run after a crash waits out the lease, unless it is
on the same machine with the same journal folder: the local lock it holds (lock.py) proves the
old holder dead. S3 (since 2024), GCS and Azure Blob all make these writes conditional.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .. import objects
from ..errors import StoreError

__all__ = ["Lease", "LEASE_FILE", "LEASE_S"]

log = logging.getLogger(__name__)

LEASE_FILE = "_lock.json"
LEASE_S = 60.0
RENEW_S = LEASE_S / 4


class Lease:
    def __init__(self, bucket: objects.Bucket, local: Path) -> None:
        self._bucket = bucket
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "journal": str(local.resolve())}
        self._tag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None  # set when another run took the lock over: stop writing

    def _body(self) -> bytes:
        return json.dumps({**self._me, "until": time.time() + LEASE_S}).encode()

    def acquire(self) -> None:
        try:
            self._tag = self._bucket.create(LEASE_FILE, self._body())
        except objects.Conflict:
            self._take_over()
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._renewer.start()

    def _take_over(self) -> None:
        try:
            data, tag = self._bucket.read_tagged(LEASE_FILE)
            holder: dict[str, Any] = json.loads(data)
        except objects.NotFound:  # let go between our create and our read
            self._tag = self._bucket.create(LEASE_FILE, self._body())
            return
        except ValueError:
            holder = {}
        mine = holder.get("host") == self._me["host"] and holder.get("journal") == self._me["journal"]
        left = float(holder.get("until", 0)) - time.time()
        if not mine and left > 0:
            raise StoreError(f"output.dir: another annotate run is writing to {self._bucket.url} (host "
                             f"{holder.get('host')}, pid {holder.get('pid')}); its lease ends in {left:.0f} s "
                             "unless it renews it")
        try:
            self._tag = self._bucket.replace(LEASE_FILE, self._body(), tag)
        except objects.Conflict:
            raise StoreError(f"output.dir: another annotate run took {self._bucket.url} first") from None
        log.info("took over the lock of %s from %s", self._bucket.url, holder or "an unreadable lock")

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                assert self._tag is not None
                self._tag = self._bucket.replace(LEASE_FILE, self._body(), self._tag)
            except objects.Conflict:
                self.lost = f"output.dir: another run took over the lock of {self._bucket.url}"
                log.error("%s; this run writes no more there", self.lost)
                return
            except OSError as exc:  # the store is unreachable for now: try again before the lease ends
                log.warning("could not renew the lock of %s: %s", self._bucket.url, exc)

    def check(self) -> None:
        """StoreError once another run took the lock over."""
        if self.lost:
            raise StoreError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self._tag is not None and not self.lost:
            self._bucket.delete(LEASE_FILE)
            self._tag = None
