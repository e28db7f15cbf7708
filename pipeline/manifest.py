"""Manifest rows: read with Polars, lazily and in slices; row ids; prompts filled from columns.

Owns: the manifest formats, which columns exist, the image column's shape (paths or URLs,
lists of them, bytes, or the Hugging Face `{bytes, path}` struct), row ids. Never: opening
image files (a row carries its references as written) or anything over the network.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from .config import InputConfig, PromptConfig
from .errors import ManifestError

__all__ = ["ImageRef", "ManifestRow", "Manifest", "IMAGE_SUFFIXES"]

ImageRef = str | bytes  # a path or URL as written in the manifest, or the image's own bytes
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})
_BATCH_ROWS = 1_000


@dataclass(frozen=True, slots=True)
class ManifestRow:
    id: str
    images: tuple[ImageRef, ...]
    prompt: str  # the user text, placeholders already filled
    keep: Mapping[str, Any]  # manifest columns copied to the output untouched


def _image_folder(folder: Path) -> pl.LazyFrame:
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    return pl.LazyFrame({"image": files}, schema={"image": pl.String})


# Column types are inferred from every row, so a value far down a file cannot break a run
# half-way; that costs one extra pass when the manifest is opened.
_READERS: dict[str, Callable[[Path], pl.LazyFrame]] = {
    ".csv": lambda p: pl.scan_csv(p, infer_schema_length=None),
    ".tsv": lambda p: pl.scan_csv(p, separator="\t", infer_schema_length=None),
    ".parquet": lambda p: pl.scan_parquet(p),
    ".jsonl": lambda p: pl.scan_ndjson(p),
    ".ndjson": lambda p: pl.scan_ndjson(p),
}


def _scan(path: Path) -> pl.LazyFrame:
    if path.is_dir():
        return _image_folder(path)
    if not path.exists():
        raise ManifestError(f"input.manifest: {path} does not exist")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ManifestError(f"input.manifest: {path} is not one of {', '.join(_READERS)} or a folder of images")
    return reader(path)


def _is_image_type(dtype: pl.DataType | pl.datatypes.DataTypeClass) -> bool:
    if isinstance(dtype, pl.List | pl.Array):
        return _is_image_type(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return {f.name for f in dtype.fields} >= {"bytes", "path"}
    return dtype in (pl.String, pl.Binary)


def _refs(value: Any) -> tuple[ImageRef, ...]:
    """The image references in one cell, whatever the column's shape."""
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        return (value,) if value else ()
    if isinstance(value, dict):  # Hugging Face Image feature: the bytes win over the path
        return _refs(value.get("bytes") or value.get("path"))
    return tuple(ref for item in value for ref in _refs(item))


def _stable_id(images: tuple[ImageRef, ...], prompt: str) -> str:
    # Hash the rendered prompt, not the template: two rows showing one image with different
    # {label} values ask different questions, and resume must not skip either.
    digest = hashlib.blake2b(digest_size=12)
    for ref in images:
        digest.update(hashlib.blake2b(ref).digest() if isinstance(ref, bytes) else ref.encode())
        digest.update(b"\0")
    digest.update(prompt.encode())
    return digest.hexdigest()


class Manifest:
    """One manifest, checked against the config when opened; rows come out in slices."""

    def __init__(self, source: InputConfig, prompt: PromptConfig) -> None:
        self.path = source.manifest
        self.root = source.image_root or (self.path if self.path.is_dir() else self.path.parent)
        self._frame = _scan(self.path)
        self._source = source
        self._template = prompt.user
        try:
            schema = self._frame.collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ManifestError(f"input.manifest: cannot read {self.path}: {exc}") from None
        self._fields = [name for _, name, _, _ in string.Formatter().parse(prompt.user) if name]
        self._check_columns(schema)
        self.keep_schema = pl.Schema({name: schema[name] for name in source.keep_columns})
        if source.id_column:
            self._check_unique(source.id_column)

    def _check_columns(self, schema: pl.Schema) -> None:
        wanted = {
            "input.image_column": [self._source.image_column],
            "input.id_column": [self._source.id_column] if self._source.id_column else [],
            "input.keep_columns": list(self._source.keep_columns),
            "prompt.user": self._fields,
        }
        for key, names in wanted.items():
            for name in names:
                if name not in schema:
                    raise ManifestError(
                        f"{key}: column {name!r} is not in {self.path} (columns: {', '.join(schema.names())})"
                    )
        image_type = schema[self._source.image_column]
        if not _is_image_type(image_type):
            raise ManifestError(
                f"input.image_column: column {self._source.image_column!r} has type {image_type}; expected "
                "paths or URLs (str), a list of them, image bytes, or a {bytes, path} struct"
            )

    def _check_unique(self, column: str) -> None:
        try:
            dupes = (
                self._frame.group_by(column).len().filter(pl.col("len") > 1).head(3).collect()
            )
        except pl.exceptions.PolarsError as exc:
            raise ManifestError(f"input.manifest: cannot read {self.path}: {exc}") from None
        if dupes.height:
            shown = ", ".join(repr(v) for v in dupes[column].to_list())
            raise ManifestError(f"input.id_column: column {column!r} has duplicate ids, e.g. {shown}")

    def count(self) -> int:
        return int(self._frame.select(pl.len()).collect().item())

    def batches(self, rows: int = _BATCH_ROWS) -> Iterator[list[ManifestRow]]:
        """Rows in slices of `rows`, from one streaming pass over the file."""
        source = self._source
        columns = list(dict.fromkeys([source.image_column, *self._fields, *source.keep_columns]
                                     + ([source.id_column] if source.id_column else [])))
        try:
            for frame in self._frame.select(columns).collect_batches(chunk_size=rows):
                yield [self._row(values) for values in frame.iter_rows(named=True)]
        except pl.exceptions.PolarsError as exc:
            raise ManifestError(f"input.manifest: cannot read {self.path}: {exc}") from None

    def _row(self, values: dict[str, Any]) -> ManifestRow:
        images = _refs(values[self._source.image_column])
        prompt = self._template.format_map({k: "" if values[k] is None else values[k] for k in self._fields})
        given = values[self._source.id_column] if self._source.id_column else None
        return ManifestRow(
            id=str(given) if given is not None else _stable_id(images, prompt),
            images=images,
            prompt=prompt,
            keep={name: values[name] for name in self._source.keep_columns},
        )
