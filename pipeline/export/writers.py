"""The formats an export writes, one class each, fed one item at a time.

- jsonl: one JSON object a row (the output row and its image reference); no image bytes.
- sidecar: each image beside a same-named .txt caption (ID.jpg, ID.txt), as kohya-ss's and
  SimpleTuner's trainers read a folder.
- webdataset: tar shards (00000.tar, ...) of ID.jpg, ID.txt and ID.json, as the webdataset
  library reads them.
- hf: a Hugging Face `datasets` dataset saved with save_to_disk, the image as its Image
  feature (the hf extra).

Owns: file names and layout of each format. Never: which rows, or reading images (source.py).
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from ..errors import ConfigError
from .source import Item

__all__ = ["write", "takes_images", "FORMATS", "HF_EXTRA"]

FORMATS = ("jsonl", "sidecar", "webdataset", "hf")
HF_EXTRA = "annotate-pipeline[hf]"
SHARD_ROWS = 1_000  # rows in one webdataset tar


def _json(item: Item) -> bytes:
    return json.dumps({**item.row, "image": item.ref}, default=str, ensure_ascii=False).encode()


def _caption(item: Item) -> bytes:
    return (item.row.get("answer") or "").encode()


def write_jsonl(items: Iterable[Item], to: Path) -> None:
    to.parent.mkdir(parents=True, exist_ok=True)
    with open(to, "wb") as file:
        for item in items:
            file.write(_json(item) + b"\n")


def write_sidecar(items: Iterable[Item], to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for item in items:
        assert item.image is not None
        (to / f"{item.row['id']}.{item.suffix}").write_bytes(item.image)
        (to / f"{item.row['id']}.txt").write_bytes(_caption(item))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(items: Iterable[Item], to: Path, shard_rows: int = SHARD_ROWS) -> None:
    to.mkdir(parents=True, exist_ok=True)
    rows = iter(items)
    for shard in itertools.count():
        first = next(rows, None)
        if first is None:
            return
        with tarfile.open(to / f"{shard:05d}.tar", "w") as tar:
            for item in itertools.chain([first], itertools.islice(rows, shard_rows - 1)):
                assert item.image is not None
                key = item.row["id"]  # hex: no dot, which webdataset reads as the start of the extension
                _member(tar, f"{key}.{item.suffix}", item.image)
                _member(tar, f"{key}.txt", _caption(item))
                _member(tar, f"{key}.json", _json(item))


def write_hf(items: Iterable[Item], to: Path, schema: pl.Schema) -> None:
    """Rows are encoded as `datasets` encodes examples and written to one Arrow file in batches
    (datasets' own ArrowWriter, so memory holds a batch), in a folder beside `to` that is
    removed once the dataset is saved. (`Dataset.from_generator` would fingerprint the
    generator by pickling it, which a generator over a live manifest cannot be.)"""
    try:
        import datasets
        from datasets.arrow_writer import ArrowWriter
    except ImportError:
        raise ConfigError(f"--format hf needs the {HF_EXTRA} extra: pip install '{HF_EXTRA}'") from None
    features = datasets.Features.from_arrow_schema(pl.DataFrame(schema=schema).to_arrow().schema)
    features["image"] = datasets.Image()
    features["text"] = datasets.Value("string")
    to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=to.parent, prefix=f".{to.name}-") as staging:
        path = str(Path(staging) / "data.arrow")
        with ArrowWriter(features=features, path=path) as writer:
            for item in items:
                example = {**item.row, "image": {"bytes": item.image, "path": None}, "text": item.row.get("answer")}
                writer.write(features.encode_example(example))
            writer.finalize()
        datasets.Dataset.from_file(path).save_to_disk(str(to))


def takes_images(fmt: str) -> bool:
    return fmt != "jsonl"


def write(fmt: str, items: Iterable[Item], to: Path, schema: pl.Schema) -> None:
    if fmt == "jsonl":
        write_jsonl(items, to)
    elif fmt == "sidecar":
        write_sidecar(items, to)
    elif fmt == "webdataset":
        write_webdataset(items, to)
    else:
        write_hf(items, to, schema)
