"""Manifest rows: read with Polars, lazily and in slices; row ids; prompts filled from columns.

Owns: the manifest formats, which columns exist, the image column's shape (paths or URLs,
lists of them, bytes, or the Hugging Face `{bytes, path}` struct), row ids, and which files of
a folder are images (by suffix, else by the header). Never: decoding image files (a row
carries its references as written) or anything over the network.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import polars_hash as plh

from . import objects
from .config import InputConfig, PromptConfig
from .errors import ManifestError
from .image_file import is_image_file, is_image_name, suffix_of

__all__ = ["ImageRef", "ManifestRow", "Manifest", "ids_of_last_run"]

log = logging.getLogger(__name__)

ImageRef = str | bytes  # a path or URL as written in the manifest, or the image's own bytes
_BATCH_ROWS = 1_000
_NAMED = 5  # skipped files named in the warning


@dataclass(frozen=True, slots=True)
class ManifestRow:
    id: str
    images: tuple[ImageRef, ...]
    prompt: str  # the user text, placeholders already filled
    keep: Mapping[str, Any]  # manifest columns copied to the output untouched


def _image_folder(folder: Path) -> pl.LazyFrame:
    """Every file under `folder` Pillow can read, by its suffix or else its header; hidden files
    and folders (.DS_Store, .git) are left out, and other skipped files are named in a warning."""
    files: list[str] = []
    skipped: list[str] = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        (files if is_image_file(path) else skipped).append(str(relative))
    return _listed(files, skipped, folder)


def _bucket_folder(url: str) -> pl.LazyFrame:
    """Every object under the folder URL named as an image Pillow reads, by its suffix alone (a
    header would cost a request per object); hidden names left out, others named in a warning."""
    files: list[str] = []
    skipped: list[str] = []
    try:
        for name, _ in objects.Bucket(url).names():
            if not any(part.startswith(".") for part in name.split("/")):
                (files if is_image_name(name) else skipped).append(name)
    except OSError as exc:
        raise ManifestError(f"input.manifest: cannot list {url}: {exc}") from None
    if not files and not skipped:
        raise ManifestError(f"input.manifest: no objects under {url}")
    return _listed(files, skipped, url)


def _listed(files: list[str], skipped: list[str], folder: Path | str) -> pl.LazyFrame:
    if skipped:
        names = ", ".join(skipped[:_NAMED]) + (f" and {len(skipped) - _NAMED} more" if len(skipped) > _NAMED else "")
        log.warning("input.manifest: skipped %d file%s in %s that Pillow cannot read as images: %s",
                    len(skipped), "s" if len(skipped) > 1 else "", folder, names)
    return pl.LazyFrame({"image": files}, schema={"image": pl.String})


# CSV columns are read as text: a type guessed from the first rows can be broken by a value
# far down the file, half-way through a run. Parquet and JSON lines keep their own types.
# Polars reads object-store URLs itself, given the storage options the environment lacks.
_Reader = Callable[[Path | str, dict[str, str] | None], pl.LazyFrame]
_READERS: dict[str, _Reader] = {
    ".csv": lambda p, o: pl.scan_csv(p, infer_schema=False, storage_options=o),
    ".tsv": lambda p, o: pl.scan_csv(p, separator="\t", infer_schema=False, storage_options=o),
    ".parquet": lambda p, o: pl.scan_parquet(p, storage_options=o),
    ".jsonl": lambda p, o: pl.scan_ndjson(p, storage_options=o),
    ".ndjson": lambda p, o: pl.scan_ndjson(p, storage_options=o),
}


def _is_folder(location: Path | str) -> bool:
    """A folder of images: a local directory, or a URL whose name is not a manifest file's."""
    if isinstance(location, Path):
        return location.is_dir()
    return location.endswith("/") or suffix_of(str(location)) not in _READERS


def _scan(location: Path | str) -> pl.LazyFrame:
    if isinstance(location, str):
        objects.check_extra(location)
        if _is_folder(location):
            return _bucket_folder(location)
        return _READERS[suffix_of(str(location))](location, objects.polars_options(location) or None)
    if location.is_dir():
        return _image_folder(location)
    if not location.exists():
        raise ManifestError(f"input.manifest: {location} does not exist")
    reader = _READERS.get(suffix_of(str(location)))
    if reader is None:
        raise ManifestError(f"input.manifest: {location} is not one of {', '.join(_READERS)} or a folder of images")
    return reader(location, None)


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


def _ref_text(expr: pl.Expr, dtype: pl.DataType | pl.datatypes.DataTypeClass) -> pl.Expr:
    """The text an image cell stands for in its row id: paths and URLs as written, bytes as hex."""
    if isinstance(dtype, pl.List | pl.Array):
        return expr.list.eval(_ref_text(pl.element(), dtype.inner)).list.join("\0")
    if isinstance(dtype, pl.Struct):
        data = expr.struct.field("bytes")
        return pl.when(data.is_not_null()).then(data.bin.encode("hex")).otherwise(expr.struct.field("path"))
    return expr.bin.encode("hex") if dtype == pl.Binary else expr


def _template(text: str) -> list[tuple[str, str | None]]:
    """A prompt template as (literal, column) pairs; only plain {column} placeholders."""
    pieces = []
    for literal, name, spec, conversion in string.Formatter().parse(text):
        if spec or conversion or (name is not None and not name):
            raise ManifestError(f"prompt.user: placeholders are plain {{column}} names, got {text!r}")
        pieces.append((literal, name))
    return pieces


class Manifest:
    """One manifest, checked against the config when opened; rows come out in slices."""

    def __init__(self, source: InputConfig, prompt: PromptConfig) -> None:
        self.path = source.manifest
        root = source.image_root or (self.path if _is_folder(self.path) else _parent(self.path))
        # Relative references under a bucket become URLs as rows are made; `root` is then unused.
        self.root = root if isinstance(root, Path) else Path()
        self._bucket_root = root if isinstance(root, str) else None
        self._frame = _scan(self.path)
        self._source = source
        self._template = _template(prompt.user)
        try:
            schema = self._frame.collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise ManifestError(f"input.manifest: cannot read {self.path}: {exc}") from None
        self._fields = [name for _, name in self._template if name]
        self._check_columns(schema)
        self._image_type = schema[source.image_column]
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

    def _prompt(self) -> pl.Expr:
        parts = [part for literal, name in self._template
                 for part in (pl.lit(literal), *([pl.col(name).cast(pl.String).fill_null("")] if name else []))]
        return pl.concat_str(parts) if parts else pl.lit("")

    def _id(self, prompt: pl.Expr) -> pl.Expr:
        # Hash the rendered prompt, not the template: two rows showing one image with different
        # {label} values ask different questions, and resume must not skip either. SHA-256, so
        # the ids are the same whatever library computes them, in any version.
        image = _ref_text(pl.col(self._source.image_column), self._image_type).fill_null("")
        stable = plh.concat_str([image, pl.lit("\0"), prompt]).chash.sha2_256().str.slice(0, 24)
        if self._source.id_column:
            return pl.coalesce(pl.col(self._source.id_column).cast(pl.String), stable)
        return stable

    def batches(self, rows: int = _BATCH_ROWS, skip: pl.LazyFrame | None = None,
                limit: int | None = None, only: pl.LazyFrame | None = None) -> Iterator[list[ManifestRow]]:
        """Rows in slices of `rows`, from one streaming pass over the file, each id once: the
        ids in `skip` (a frame with an `id` column: already done) are dropped there, before
        any row becomes a Python object, and with `only`, the ids not in it."""
        source = self._source
        prompt = self._prompt()
        frame = self._frame.select(self._id(prompt).alias("_id"), prompt.alias("_prompt"),
                                   pl.col(source.image_column).alias("_image"), *source.keep_columns)
        if skip is not None:
            frame = frame.join(skip.select(_id="id"), on="_id", how="anti", maintain_order="left")
        if only is not None:
            frame = frame.join(only.select(_id="id"), on="_id", how="semi", maintain_order="left")
        if not source.id_column:  # identical rows ask one question once (after the skip: less to hold)
            frame = frame.unique(subset="_id", keep="first", maintain_order=True)
        if limit is not None:
            frame = frame.head(limit)
        try:
            for chunk in frame.collect_batches(chunk_size=rows):
                yield [self._row(values) for values in chunk.iter_rows(named=True)]
        except pl.exceptions.PolarsError as exc:
            raise ManifestError(f"input.manifest: cannot read {self.path}: {exc}") from None

    def _in_bucket(self, ref: ImageRef) -> ImageRef:
        """A relative path under a bucket's folder, as the object's URL."""
        assert self._bucket_root is not None
        return objects.child(self._bucket_root, ref) if isinstance(ref, str) and _relative(ref) else ref

    def _row(self, values: dict[str, Any]) -> ManifestRow:
        refs = _refs(values["_image"])
        return ManifestRow(
            id=values["_id"],
            images=tuple(map(self._in_bucket, refs)) if self._bucket_root else refs,
            prompt=values["_prompt"],
            keep={name: values[name] for name in self._source.keep_columns},
        )


def _parent(location: Path | str) -> Path | str:
    return location.parent if isinstance(location, Path) else objects.parent(location)


def _relative(ref: str) -> bool:
    """A path written relative to the manifest's folder (not a URL, an absolute path or ~)."""
    return "://" not in ref[:16] and not ref.startswith(("/", "~", "data:"))


def ids_of_last_run(run_info: Mapping[str, Any] | None) -> pl.Series | None:
    """The ids of the manifest a run read (as its `_run.json` names it), in the manifest's
    order; None when that manifest cannot be read any more."""
    if run_info is None:
        return None
    try:
        source = InputConfig.model_validate(run_info["config"]["input"] | {"manifest": run_info["manifest"]["path"]})
        manifest = Manifest(source, PromptConfig.model_validate(run_info["config"]["prompt"]))
        return pl.concat([pl.Series("id", [row.id for row in batch], pl.String) for batch in manifest.batches()])
    except (OSError, ValueError, KeyError, TypeError, ManifestError):
        return None
