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

__all__ = ["FLAGS", "DUPLICATE", "flags_of", "duplicate_answers", "flagged_ids"]

# Flags a row carries in its `flags` column, as it is answered.
FLAGS = ("empty", "length", "refusal", "short")
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


def duplicate_answers(rows: pl.LazyFrame, share: float) -> pl.LazyFrame:
    """The answer texts given by more than `share` of the answered rows (and by at least
    DUPLICATE_MIN_ROWS), with how many rows gave each: columns `answer`, `rows`. Rows that
    carry a flag already (a refusal repeats one text too) are not counted."""
    ok = rows.filter(pl.col("status") == "ok")
    plain = ok.filter(pl.col("flags").list.len().fill_null(0) == 0) if "flags" in rows.collect_schema() else ok
    counts = plain.filter(pl.col("answer").str.strip_chars() != "").group_by("answer").agg(pl.len().alias("rows"))
    return (counts.join(ok.select(pl.len().alias("total")), how="cross")
            .filter((pl.col("rows") >= DUPLICATE_MIN_ROWS) & (pl.col("rows") > pl.col("total") * share))
            .select("answer", "rows"))


def flagged_ids(rows: pl.LazyFrame, quality: QualityConfig, prose: bool) -> pl.LazyFrame:
    """The ids of answered rows that carry a flag, or whose text is a duplicate (prose only)."""
    flagged = rows.filter((pl.col("status") == "ok") & (pl.col("flags").list.len() > 0)).select("id")
    if not prose:
        return flagged
    repeated = rows.join(duplicate_answers(rows, quality.duplicate_share).select("answer"), on="answer", how="semi")
    return pl.concat([flagged, repeated.filter(pl.col("status") == "ok").select("id")]).unique()
