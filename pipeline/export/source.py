"""What an export writes: the output rows a filter selects, each with its image, in manifest order.

Owns: the filter (a Polars SQL condition over the output's columns), finding each selected
row's images again through the manifest its run read (`_run.json`), and the image bytes as they
were sent (converted, downscaled: the run's own preparation) or as the files are. Never: a
format (writers.py).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl

from .. import images
from ..config import InputConfig, PromptConfig
from ..errors import ConfigError, ManifestError, RowInputError, StoreError
from ..fetch import fetch_rows
from ..image_file import suffix_of
from ..manifest import ImageRef, Manifest, ManifestRow
from ..store.folder import Folder
from ..store.parts import parts, read_run_info, scan

__all__ = ["Item", "RunInputs", "Selection", "select", "items", "run_inputs", "image_of", "fetch_images", "ImagesAs"]

ImagesAs = Literal["sent", "original"]
_SUFFIX = {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}


@dataclass(frozen=True, slots=True)
class Item:
    row: dict[str, Any]  # the output row
    ref: str | None  # the first image as the manifest wrote it (None for image bytes)
    image: bytes | None  # its bytes, None when it cannot be read now
    suffix: str  # 'jpg', 'png', ... of those bytes
    problem: str | None = None  # why the image is missing


@dataclass(frozen=True)
class RunInputs:
    """What the run of an output directory read: its manifest, and how it prepared images."""

    manifest: Manifest
    source: InputConfig
    prompt: PromptConfig


@dataclass(frozen=True)
class Selection:
    rows: dict[str, dict[str, Any]]  # by id
    schema: pl.Schema
    inputs: RunInputs


def run_inputs(folder: Folder, info: Mapping[str, Any]) -> RunInputs:
    """The manifest and image settings of the run recorded in `info` (its _run.json)."""
    config = info["config"]
    try:
        source = InputConfig.model_validate(config["input"] | {"manifest": info["manifest"]["path"]})
        prompt = PromptConfig.model_validate(config["prompt"])
        return RunInputs(Manifest(source, prompt), source, prompt)
    except (ManifestError, ValueError, KeyError) as exc:
        raise StoreError(f"{folder.label}: the manifest of its run cannot be read, so its images cannot be "
                         f"found ({exc})") from None


def select(folder: Folder, where: str) -> Selection:
    """The output rows `where` keeps, and the manifest of the run that wrote them."""
    info = read_run_info(folder)
    if info is None:
        raise StoreError(f"{folder.label}: no _run.json here (is it an output.dir?)")
    frame = scan(parts(folder, required=True), options=folder.options)
    try:
        chosen = frame.filter(pl.sql_expr(where)).unique(subset="id", keep="last", maintain_order=True).collect()
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise ConfigError(f"--where: {where!r} is not a condition over the output's columns ({exc})") from None
    return Selection({row["id"]: row for row in chosen.iter_rows(named=True)}, chosen.schema, run_inputs(folder, info))


def image_of(ref: ImageRef, inputs: RunInputs, fetched: Mapping[str, bytes], how: ImagesAs) -> tuple[bytes, str]:
    """The image's bytes as the run sent them, or as the file is; its suffix. RowInputError
    when it cannot be read now."""
    root = inputs.manifest.root
    if how == "sent":
        part = images.to_parts([ref], root, inputs.prompt, fetched)[0]
        mime, _, encoded = part.url.removeprefix("data:").partition(";base64,")
        if not encoded:  # an http(s) URL the run passed on as it is (input.remote: pass)
            raise RowInputError(f"{ref!r} was sent as a URL; export it with --images original")
        return base64.b64decode(encoded), _SUFFIX.get(mime, "jpg")
    if isinstance(ref, bytes):
        data = ref
    else:
        data = fetched[ref] if ref in fetched else images.read_file(ref, root)
    return data, _SUFFIX.get(images.sniff_mime(data) or "", suffix_of(ref)[1:] if isinstance(ref, str) else "bin")


def fetch_images(inputs: RunInputs, refs: Sequence[Sequence[ImageRef]]) -> list[Mapping[str, bytes] | RowInputError]:
    """Each row's images (`refs`) fetched where they are remote or in a bucket, as the run fetched them."""
    return list(fetch_rows(inputs.source.fetch, refs))


def _item(row: dict[str, Any], found: ManifestRow, selection: Selection,
          fetched: Mapping[str, bytes] | RowInputError | None, how: ImagesAs) -> Item:
    """`fetched` None: the format takes no image."""
    ref = found.images[0] if found.images else None
    named = ref if isinstance(ref, str) else None
    if fetched is None:
        return Item(row, named, None, "bin")
    try:
        if ref is None:
            raise RowInputError("no image in this row")
        if isinstance(fetched, RowInputError):
            raise fetched
        data, suffix = image_of(ref, selection.inputs, fetched, how)
    except RowInputError as exc:
        return Item(row, named, None, "bin", str(exc))
    return Item(row, named, data, suffix or "bin")


def items(selection: Selection, how: ImagesAs, with_images: bool = True) -> Iterator[Item]:
    """Each selected row with its first image, in the manifest's order (a format without
    images passes `with_images` False: nothing is read)."""
    for batch in selection.inputs.manifest.batches():
        chosen = [row for row in batch if row.id in selection.rows]
        if not chosen:
            continue
        fetched: list[Mapping[str, bytes] | RowInputError | None] = (
            [*fetch_images(selection.inputs, [row.images[:1] for row in chosen])] if with_images else [None] * len(chosen))
        for found, remote in zip(chosen, fetched):
            yield _item(selection.rows[found.id], found, selection, remote, how)
