"""The images `annotate view` shows: each row's first image found again through its run's
manifest, as the run sent it (converted, turned upright, downscaled), and a thumbnail of it.

Owns: which image a shown row has (learnt for a whole page in one pass over the manifest),
and the thumbnails, made on demand and kept in the user's cache. Never: rows or HTTP.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import polars as pl
from PIL import Image

from ..errors import RowInputError, StoreError
from ..export.source import RunInputs, fetch_images, image_of, run_inputs
from ..manifest import ImageRef
from ..store.folder import Folder, cache_home

__all__ = ["Pictures", "Unavailable", "THUMB_PX"]

THUMB_PX = 320  # the longer side of a thumbnail
KNOWN_MAX = 20_000  # rows whose image is remembered (a few hundred pages)


class Unavailable(Exception):
    """The row's image cannot be shown; the message says why."""


class Pictures:
    def __init__(self, folder: Folder, info: dict[str, Any], cache: Path | None = None) -> None:
        self._folder = folder
        self._info = info
        self._inputs: RunInputs | None = None
        self._refs: OrderedDict[str, ImageRef | None] = OrderedDict()
        self._lock = threading.Lock()
        self.cache = cache or cache_home() / "thumbs"

    def _run_inputs(self) -> RunInputs:
        if self._inputs is None:
            if not self._info:
                raise Unavailable("the output has no _run.json, so its manifest is unknown")
            try:
                self._inputs = run_inputs(self._folder, self._info)
            except StoreError as exc:
                raise Unavailable(str(exc)) from None
        return self._inputs

    def learn(self, ids: list[str]) -> None:
        """Find the first image of each of these rows in one pass over the manifest."""
        unknown = [row_id for row_id in ids if row_id not in self._refs]
        if not unknown:
            return
        try:
            manifest = self._run_inputs().manifest
            only = pl.LazyFrame({"id": unknown}, schema={"id": pl.String})
            found = {row.id: row.images[0] if row.images else None
                     for batch in manifest.batches(only=only) for row in batch}
        except (Unavailable, StoreError, OSError):
            return  # each image then says why it is missing
        with self._lock:
            for row_id in unknown:
                self._refs[row_id] = found.get(row_id)
            while len(self._refs) > KNOWN_MAX:
                self._refs.popitem(last=False)

    def sent(self, row_id: str) -> tuple[bytes, str]:
        """The row's first image as the run sent it, and its suffix."""
        if row_id not in self._refs:
            self.learn([row_id])
        ref = self._refs.get(row_id)
        if ref is None:
            raise Unavailable(f"row {row_id} has no image in the manifest now")
        inputs = self._run_inputs()
        try:
            (remote,) = fetch_images(inputs, [(ref,)])
            if isinstance(remote, RowInputError):
                raise remote
            return image_of(ref, inputs, remote, "sent")  # a remote image is fetched, whatever input.remote says
        except RowInputError as exc:
            raise Unavailable(str(exc)) from None

    def thumbnail(self, row_id: str) -> bytes:
        """A JPEG of at most THUMB_PX a side, made once per image and kept in the cache."""
        if row_id not in self._refs:
            self.learn([row_id])
        ref = self._refs.get(row_id)
        key = hashlib.sha256(ref if isinstance(ref, bytes) else repr((ref, self._info.get("manifest"))).encode())
        path = self.cache / f"{key.hexdigest()[:32]}.jpg"
        if path.exists():
            return path.read_bytes()
        data, _ = self.sent(row_id)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.thumbnail((THUMB_PX, THUMB_PX))
                out = io.BytesIO()
                image.convert("RGB").save(out, "JPEG", quality=85)
        except (OSError, ValueError, SyntaxError) as exc:
            raise Unavailable(f"the image cannot be read ({exc})") from None
        self.cache.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
        temporary.write_bytes(out.getvalue())
        temporary.replace(path)  # whole or not at all: another thread may make the same one
        return out.getvalue()

