"""`annotate estimate`: rows, tokens and cost of a run before it is sent.

Owns: the pre-run estimate: image sizes from headers only, the model's image-token rule,
text tokens, and the cost range. Never: sending requests (a sample is an ordinary run of a
few rows, made by the runner, whose answers stay in the output directory).

Text tokens are approximated at four characters a token: tiktoken fetches its encodings
over the network on first use, which an offline machine cannot do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from . import images
from .config import RunConfig
from .errors import RowInputError
from .manifest import ImageRef, Manifest
from .payload import UNSET_MAX_TOKENS, input_texts
from .pricing import PriceTable
from .store import parts
from .structured import labels
from .tokens import input_tokens

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


def _sizes(refs: tuple[ImageRef, ...], root: Path, max_side: int | None) -> list[tuple[int, int] | None]:
    if not refs:
        raise RowInputError("no image")
    return [_size(ref, root, max_side) if isinstance(ref, str) else images.size_as_sent(ref, root, max_side)
            for ref in refs]


@functools.lru_cache(maxsize=65_536)  # manifests often show one file in many rows
def _size(ref: str, root: Path, max_side: int | None) -> tuple[int, int] | None:
    return images.size_as_sent(ref, root, max_side)


def _count(cfg: RunConfig) -> Estimate:
    prompt, request = cfg.prompt, cfg.request
    manifest = Manifest(cfg.input, prompt)
    schema = labels(cfg.output_schema, request.structured)
    out = Estimate()
    output_max = (request.max_tokens or UNSET_MAX_TOKENS) * request.choices
    for batch in manifest.batches():
        for row in batch:
            try:
                sizes = _sizes(row.images, manifest.root, prompt.max_side)
            except RowInputError:
                out.unreadable += 1
                continue
            texts = input_texts(row, prompt, schema)
            text = input_tokens(request.model, texts, [], prompt.detail)
            image = input_tokens(request.model, [], sizes, prompt.detail)
            low_detail = "low" if prompt.detail == "auto" else prompt.detail
            out.rows += 1
            out.images += len(sizes)
            out.text_tokens += text
            out.image_tokens += image
            out.input_low += text + input_tokens(request.model, [], sizes, low_detail)
            out.input_max += input_tokens(request.model, texts, sizes, prompt.detail, worst=True)
            out.output_max += output_max
            out.output_expected += output_max * EXPECTED_OUTPUT_SHARE
    return out


def _scale_by_sample(out: Estimate, directory: Path, expected_prompt_per_row: float) -> None:
    """Replace the guesses with what the sampled rows really used, per row."""
    written = parts(directory)
    if not written:
        return
    answered = pl.scan_parquet(written).filter(pl.col("status") == "ok", pl.col("prompt_tokens").is_not_null())
    used = answered.select(rows=pl.len(), prompt=pl.col("prompt_tokens").mean(),
                           completion=pl.col("completion_tokens").mean()).collect().row(0, named=True)
    if not used["rows"]:
        return  # no sampled answer reported its usage
    ratio = used["prompt"] / expected_prompt_per_row if expected_prompt_per_row else 1.0
    out.image_tokens = round(out.image_tokens * ratio)
    out.text_tokens = round(out.text_tokens * ratio)
    out.output_expected = used["completion"] * out.rows
    out.sampled = used["rows"]


def estimate(cfg: RunConfig, sampled_dir: Path | None = None) -> dict[str, Any]:
    """The estimate as one JSON-ready object; costs are None where no price is known."""
    out = _count(cfg)
    if sampled_dir is not None and out.rows:
        _scale_by_sample(out, sampled_dir, out.input_expected / out.rows)
    prices, model = PriceTable(cfg.pricing), cfg.request.model
    price = prices.find(model)

    def usd(inputs: float, outputs: float) -> float | None:
        return prices.list_usd(model, inputs, outputs)

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
    }
