"""Answers that need a second look: empty, cut at max_tokens, a refusal, too short, or the same
text as many other rows.

Owns: the flags of one answered row (`flags_of`, a plain function every engine's rows pass
through in the driver) and the duplicate texts of a dataset (`duplicate_answers`, a Polars
query: a duplicate is only known over many rows). Never: I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import polars as pl

from .config import QualityConfig

__all__ = ["DUPLICATE", "flags_of", "duplicate_answers", "duplicate_ids", "flagged_ids"]

DUPLICATE = "duplicate"  # counted over the dataset (report, viewer, --retry-flagged), never stored
DUPLICATE_MIN_ROWS = 3  # fewer rows sharing a text are never duplicates, whatever the share


@functools.lru_cache(maxsize=8)
def _refusal(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


def flags_of(row: Mapping[str, Any], quality: QualityConfig, prose: bool) -> list[str] | None:
    """The flags of an answered row (None for a row with no answer). `prose`: the answer is free
    text, not JSON for an output_schema, so its length is judged too."""
    if row.get("status") != "ok":
        return None
    text = (row.get("answer") or "").strip()
    flags = []
    if not text:
        flags.append("empty")
    if row.get("finish_reason") == "length":
        flags.append("length")
    pattern = _refusal(quality.refusal_patterns)
    if row.get("refusal") or (pattern is not None and pattern.match(text)):
        flags.append("refusal")
    if prose and text and len(text) < quality.min_chars:
        flags.append("short")
    return flags


def _unflagged(rows: pl.LazyFrame) -> pl.LazyFrame:
    """Answered rows with a text and no flag (rows written before flags existed count as unflagged)."""
    ok = rows.filter((pl.col("status") == "ok") & (pl.col("answer").str.strip_chars() != ""))
    return ok.filter(pl.col("flags").list.len().fill_null(0) == 0)


def duplicate_answers(rows: pl.LazyFrame, share: float) -> pl.LazyFrame:
    """The answer texts given by more than `share` of the answered rows (and by at least
    DUPLICATE_MIN_ROWS), with how many rows gave each: columns `answer`, `rows`. Rows that
    carry a flag already (a refusal repeats one text too) are not counted."""
    counts = _unflagged(rows).group_by("answer").agg(pl.len().alias("rows"))
    answered = rows.filter(pl.col("status") == "ok").select(pl.len().alias("total"))
    return (counts.join(answered, how="cross")
            .filter((pl.col("rows") >= DUPLICATE_MIN_ROWS) & (pl.col("rows") > pl.col("total") * share))
            .select("answer", "rows"))


def duplicate_ids(rows: pl.LazyFrame, share: float) -> pl.LazyFrame:
    """The ids of the rows `duplicate_answers` counts."""
    return _unflagged(rows).join(duplicate_answers(rows, share).select("answer"), on="answer", how="semi").select("id")


def flagged_ids(rows: pl.LazyFrame, quality: QualityConfig, prose: bool) -> pl.LazyFrame:
    """The ids of answered rows that carry a flag, or whose text is a duplicate (prose only)."""
    flagged = rows.filter((pl.col("status") == "ok") & (pl.col("flags").list.len() > 0)).select("id")
    return pl.concat([flagged, duplicate_ids(rows, quality.duplicate_share)]) if prose else flagged
