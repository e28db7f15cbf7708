"""One writer per output directory in a bucket: a lock object with a lease, taken and renewed
by conditional writes.

No kernel drops a bucket's lock when a process dies, so the lock object says until when it
holds (LEASE_S) and its holder renews it every RENEW_S. It is created only if absent
(If-None-Match: *) and renewed, taken over or let go only if unchanged since read (If-Match:
its ETag), so of two runs racing for it one wins. A run after a crash waits out the lease,
unless its journal folder is the holder's (the same random id, kept in that folder): the local
lock it holds on that folder (lock.py) proves the old holder dead. S3 (since 2024), GCS and
Azure Blob all make these writes conditional. Machines' clocks are taken to agree within
RENEW_S: `until` is read on the taker's clock.

A holder that cannot renew for LEASE_S - RENEW_S (the store unreachable, the process stopped)
or finds the lock taken over writes nothing more there: `check` raises before each write.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from .. import objects
from ..errors import StoreError

__all__ = ["Lease", "LEASE_FILE", "LEASE_S"]

log = logging.getLogger(__name__)

LEASE_FILE = "_lock.json"
LEASE_S = 60.0
RENEW_S = LEASE_S / 4


class Lease:
    """The lock object of an output folder in a bucket, held for this run's journal folder `owner`."""

    def __init__(self, bucket: objects.Bucket, owner: str) -> None:
        self._bucket = bucket
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "owner": owner}
        self._tag: objects.Tag | None = None
        self._renewed = 0.0  # time.monotonic() of the last write that held the lease
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._lost: str | None = None  # why this run may not write any more

    def _body(self, until: float) -> bytes:
        return json.dumps({**self._me, "until": until}).encode()

    def acquire(self) -> None:
        """StoreError (exit 2) when another run holds it, or the store cannot be reached."""
        try:
            try:
                self._hold(self._bucket.create(LEASE_FILE, self._body(time.time() + LEASE_S)))
            except objects.Conflict:
                self._take_over()
        except (OSError, objects.Conflict) as exc:
            raise StoreError(f"output.dir: cannot take the lock of {self._bucket.url}: {exc}") from None
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._renewer.start()

    def _hold(self, tag: objects.Tag) -> None:
        self._tag, self._renewed = tag, time.monotonic()

    def _take_over(self) -> None:
        try:
            data, tag = self._bucket.read_tagged(LEASE_FILE)
        except objects.NotFound:  # let go between our create and our read
            self._hold(self._bucket.create(LEASE_FILE, self._body(time.time() + LEASE_S)))
            return
        try:
            holder: dict[str, Any] = json.loads(data)
        except ValueError:
            holder = {}
        left = float(holder.get("until", 0)) - time.time()
        if holder.get("owner") != self._me["owner"] and left > 0:
            raise StoreError(f"output.dir: another annotate run is writing to {self._bucket.url} (host "
                             f"{holder.get('host')}, pid {holder.get('pid')}); its lease ends in {left:.0f} s "
                             "unless it renews it")
        try:
            self._hold(self._bucket.replace(LEASE_FILE, self._body(time.time() + LEASE_S), tag))
        except objects.Conflict:
            raise StoreError(f"output.dir: another annotate run took the lock of {self._bucket.url} first") from None
        if left > 0:
            log.info("took over the lock of %s from a run of this journal that is gone", self._bucket.url)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                assert self._tag is not None
                self._hold(self._bucket.replace(LEASE_FILE, self._body(time.time() + LEASE_S), self._tag))
            except objects.Conflict:
                self._lost = f"output.dir: another run took over the lock of {self._bucket.url}"
                log.error("%s; this run writes no more there", self._lost)
                return
            except OSError as exc:  # unreachable for now: `check` stops the writes before the lease ends
                log.warning("could not renew the lock of %s: %s", self._bucket.url, exc)

    def check(self) -> None:
        """StoreError unless this run still holds the lease for longer than one renewal."""
        if not self._lost and time.monotonic() - self._renewed > LEASE_S - RENEW_S:
            self._lost = (f"output.dir: the lock of {self._bucket.url} could not be renewed for "
                          f"{LEASE_S - RENEW_S:.0f} s; another run may hold it now")
        if self._lost:
            raise StoreError(self._lost)

    def release(self) -> None:
        """Let go, if the lock is still ours: its lease ends now (a conditional write, so a lock
        another run took over is never touched)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        if self._tag is not None and not self._lost:
            try:
                self._bucket.replace(LEASE_FILE, self._body(0.0), self._tag)
            except (objects.Conflict, OSError) as exc:  # taken over, or unreachable: its lease runs out
                log.warning("could not let go of the lock of %s: %s", self._bucket.url, exc)
        self._tag = None
