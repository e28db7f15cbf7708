"""`annotate estimate`: rows, tokens and cost of a run before it is sent.

Owns: the pre-run estimate: image sizes from headers and file ends only (remembered by file,
mtime and size; a remote image's from its first 64 KB), the model's image-token rule, text
tokens, and the cost range. Never: sending requests to the provider (a sample is an ordinary
run of a few rows, made by the runner, whose answers stay in the output directory).

Text tokens are approximated at four characters a token: tiktoken fetches its encodings
over the network on first use, which an offline machine cannot do.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from .. import images, objects
from ..config import PromptConfig, RunConfig
from ..errors import RowInputError
from ..fetch import fetch_heads
from ..manifest import ImageRef, Manifest, ManifestRow
from ..payload import UNSET_MAX_TOKENS, input_texts
from ..store.folder import open_folder
from ..store.parts import parts, scan
from ..structured import build_schema
from .pricing import PriceTable
from .tokens import Detail, input_tokens

__all__ = ["Estimate", "estimate", "TEXT_TOKENS_NOTE"]

TEXT_TOKENS_NOTE = "approximated at 4 characters a token (no tokenizer is loaded offline)"
EXPECTED_OUTPUT_SHARE = 0.5  # without a sample, an answer is expected to use half of max_tokens


@dataclass
class Estimate:
    rows: int = 0
    images: int = 0
    unreadable: int = 0  # rows whose images cannot be read: they will not be sent
    image_tokens: int = 0
    text_tokens: int = 0
    input_low: int = 0  # detail 'auto' billed as 'low'
    input_max: int = 0  # a token per byte of text; remote images at their costliest shape
    output_expected: float = 0.0
    output_max: int = 0
    sampled: int = 0  # rows whose real usage scaled the estimate

    @property
    def input_expected(self) -> int:
        return self.image_tokens + self.text_tokens


# --- image sizes, from headers ----------------------------------------------------------------


Sizes = tuple[tuple[int, int] | None, ...]  # one per image sent; None where not known (a URL)


@functools.lru_cache(maxsize=65_536)
def _sizes_of(ref: str, root: Path, prompt: PromptConfig, version: tuple[str, int, int, int]) -> Sizes:
    """`version` (the file's path, mtime, size and inode) is here only to be part of the key."""
    return images.sizes_as_sent(ref, root, prompt) or (None,)


def _sizes(ref: ImageRef, root: Path, prompt: PromptConfig) -> Sizes:
    """`images.sizes_as_sent`, remembered for the life of the process by file and version, so a
    file rewritten since is read again. The version is mtime, size and inode, not mtime alone:
    mtimes tick every few ms (2 s on FAT), and a rewrite within one tick must count too."""
    if isinstance(ref, bytes) or images.is_remote(ref) or objects.is_object_url(ref):
        return images.sizes_as_sent(ref, root, prompt) or (None,)
    try:
        path = images.resolve(ref, root)
        stat = os.stat(path)
    except (OSError, ValueError, RuntimeError):  # missing, a data: URL, a NUL in the path, an unknown ~user
        return images.sizes_as_sent(ref, root, prompt) or (None,)  # a URL's None, or the RowInputError saying why
    return _sizes_of(ref, root, prompt, (str(path), stat.st_mtime_ns, stat.st_size, stat.st_ino))


# --- rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Images:
    """The input tokens a row's images add: the same for every row showing the same references."""

    count: int
    tokens: int
    low: int  # detail 'auto' billed as 'low'
    worst: int  # images of unknown size (URLs) at their costliest shape


@dataclass(frozen=True, slots=True)
class _Text:
    """The input tokens a row's texts add."""

    tokens: int
    worst: int  # a token per byte


_UNSEEN = _Images(0, 0, 0, 0)  # compared by identity; None means "cannot be read"
_REMEMBERED_SETS = 65_536  # image reference sets remembered in one estimate, then forgotten at once
_HEAD_BYTES = 65_536  # of a remote image, enough for its header: a JPEG's EXIF segment may take 64 KB
_SHORT = 4_096  # characters: paths and URLs are shorter; image bytes and data: URLs are not kept


class _Counter:
    """What a row adds, worked out once per distinct image references and once per prompt
    length and remembered in `by_refs` and `by_length`: rows showing the same files, or with
    prompts as long, cost a dictionary lookup each."""

    def __init__(self, cfg: RunConfig, root: Path) -> None:
        self._model, self._prompt, self._root = cfg.request.model, cfg.prompt, root
        self._schema = build_schema(cfg.output_schema, cfg.request.structured)
        self._low_detail: Detail = "low" if cfg.prompt.detail == "auto" else cfg.prompt.detail
        self.by_refs: dict[tuple[ImageRef, ...], _Images | None] = {}
        self.by_length: dict[tuple[int, int], _Text] = {}
        self._fetch = cfg.input.fetch
        self._inline = cfg.input.remote == "inline"
        self._remote: dict[str, Sizes | RowInputError] = {}  # the batch's remote images, by URL

    def look_up_remote(self, batch: Sequence[ManifestRow]) -> None:
        """The sizes of the batch's remote and object-store images not seen yet, from their first
        bytes fetched at once (with input.remote: pass, http(s) images are URLs of unknown size,
        as the provider gets them)."""
        seen = self.by_refs
        urls = list(dict.fromkeys(ref for row in batch if row.images not in seen for ref in row.images
                                  if objects.is_object_url(ref) or self._inline and images.is_remote(ref)))
        self._remote = {}
        for url, head in fetch_heads(self._fetch, urls, _HEAD_BYTES).items() if urls else ():
            try:
                self._remote[url] = head if isinstance(head, RowInputError) else (
                    images.sizes_from_head(head, url, self._prompt))
            except RowInputError as exc:
                self._remote[url] = exc

    def add_images(self, refs: tuple[ImageRef, ...]) -> _Images | None:
        """None when an image cannot be read: the row will not be sent."""
        found = self._images(refs)
        if sum(map(len, refs)) <= _SHORT:  # else the bytes would stay in memory
            if len(self.by_refs) >= _REMEMBERED_SETS:
                self.by_refs.clear()
            self.by_refs[refs] = found
        return found

    def add_text(self, row: ManifestRow, key: tuple[int, int]) -> _Text:
        texts = input_texts(row, self._prompt, self._schema)
        detail = self._prompt.detail
        found = self.by_length[key] = _Text(input_tokens(self._model, texts, [], detail),
                                        input_tokens(self._model, texts, [], detail, worst=True))
        return found

    def _images(self, refs: tuple[ImageRef, ...]) -> _Images | None:
        if not refs:
            return None
        detail = self._prompt.detail
        try:
            sizes = [size for ref in refs for size in self._sizes(ref)]
        except RowInputError:
            return None
        return _Images(count=len(sizes), tokens=input_tokens(self._model, [], sizes, detail),
                       low=input_tokens(self._model, [], sizes, self._low_detail),
                       worst=input_tokens(self._model, [], sizes, detail, worst=True))


    def _sizes(self, ref: ImageRef) -> Sizes:
        found = self._remote.get(ref) if isinstance(ref, str) else None
        if isinstance(found, RowInputError):
            raise found
        return found or _sizes(ref, self._root, self._prompt)


def _count(cfg: RunConfig) -> Estimate:
    objects.use_options(cfg.storage_options)
    manifest = Manifest(cfg.input, cfg.prompt)
    counter = _Counter(cfg, manifest.root)
    by_refs, by_length = counter.by_refs, counter.by_length
    rows = images_ = unreadable = image_tokens = text_tokens = low = worst = 0
    for batch in manifest.batches():
        counter.look_up_remote(batch)
        for row in batch:  # a million times: so lookups and additions only, the work is per key
            image = by_refs.get(row.images, _UNSEEN)
            if image is _UNSEEN:
                image = counter.add_images(row.images)
            if image is None:
                unreadable += 1
                continue
            # Keyed by the length of the one text that varies by row (the system prompt and the
            # schema are the run's), in characters and in UTF-8 bytes: all that 4 characters a
            # token and a token a byte read. A real tokenizer would need the text as the key.
            prompt = row.prompt
            key = (len(prompt), len(prompt) if prompt.isascii() else len(prompt.encode("utf-8")))
            text = by_length.get(key) or counter.add_text(row, key)
            rows += 1
            images_ += image.count
            image_tokens += image.tokens
            text_tokens += text.tokens
            low += text.tokens + image.low
            worst += text.worst + image.worst  # input_tokens of texts and images is the sum of each's
    output_max = (cfg.request.max_tokens or UNSET_MAX_TOKENS) * cfg.request.choices
    return Estimate(rows=rows, images=images_, unreadable=unreadable, image_tokens=image_tokens,
                    text_tokens=text_tokens, input_low=low, input_max=worst, output_max=rows * output_max,
                    output_expected=rows * output_max * EXPECTED_OUTPUT_SHARE)


def _scale_by_sample(out: Estimate, directory: Path | str, expected_prompt_per_row: float) -> None:
    """Replace the guesses with what the sampled rows really used, per row."""
    folder = open_folder(directory)
    written = parts(folder)
    if not written:
        return
    answered = scan(written, options=folder.options).filter(pl.col("status") == "ok", pl.col("prompt_tokens").is_not_null())
    used = answered.select(rows=pl.len(), prompt=pl.col("prompt_tokens").mean(),
                           completion=pl.col("completion_tokens").mean()).collect().row(0, named=True)
    if not used["rows"]:
        return  # no sampled answer reported its usage
    ratio = used["prompt"] / expected_prompt_per_row if expected_prompt_per_row else 1.0
    out.image_tokens = round(out.image_tokens * ratio)
    out.text_tokens = round(out.text_tokens * ratio)
    out.output_expected = used["completion"] * out.rows
    out.sampled = used["rows"]


def estimate(cfg: RunConfig, sampled_dir: Path | str | None = None) -> dict[str, Any]:
    """The estimate as one JSON-ready object; costs are None where no price is known."""
    out = _count(cfg)
    if sampled_dir is not None and out.rows:
        _scale_by_sample(out, sampled_dir, out.input_expected / out.rows)
    prices, model = PriceTable(cfg.pricing), cfg.request.model
    price = prices.find(model)
    batch = cfg.engine == "batch"

    def usd(inputs: float, outputs: float, at_batch_price: bool = batch) -> float | None:
        return prices.list_usd(model, inputs, outputs, batch=at_batch_price)

    low_output = out.rows * cfg.request.choices  # at least a token a choice
    return {
        "rows": out.rows,
        "images": out.images,
        "unreadable_rows": out.unreadable,
        "model": model,
        "detail": cfg.prompt.detail,
        "detail_auto_as_high": cfg.prompt.detail == "auto",
        "text_tokens_note": TEXT_TOKENS_NOTE,
        "sampled_rows": out.sampled,
        "input_tokens": {"image": out.image_tokens, "text": out.text_tokens, "total": out.input_expected,
                         "low": out.input_low, "max": out.input_max},
        "output_tokens": {"expected": round(out.output_expected), "max": out.output_max},
        "cost_usd": {"low": usd(min(out.input_low, out.input_expected), low_output),
                     "expected": usd(out.input_expected, out.output_expected),
                     "high": usd(max(out.input_max, out.input_expected), out.output_max)},
        "price_per_1m_tokens": None if price is None else price.model_dump(),
        "engine": cfg.engine,
        # what the expected cost would be online, beside a batch price
        "online_expected_usd": usd(out.input_expected, out.output_expected, False) if batch else None,
    }
