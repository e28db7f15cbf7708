"""One output row per manifest row: the columns of the dataset and how an outcome fills them.

Owns: the output schema (DESIGN.md, Output) and turning an answer or an error into a row.
Never: I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import polars as pl
import pyarrow as pa

from ..completion import Reply
from ..errors import ConfigError
from ..manifest import ManifestRow

__all__ = ["COLUMNS", "schema", "answered", "unparsed", "failed"]

COLUMNS = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),  # ok | error
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("refusal", pa.string()),
        ("model", pa.string()),
        ("response_id", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        # what the budget counted: cost_usd, or the request's worst case when no usage came back
        ("charged_usd", pa.float64()),
        ("latency_ms", pa.float64()),
        ("attempts", pa.int64()),
        ("error", pa.string()),
        ("retryable", pa.bool_()),  # for an error: asked again on the next run (else only with --retry-failed)
        ("images", pa.int64()),  # images in the row
        ("image_notes", pa.string()),  # what was done to them on the way (converted, first frame, downscaled)
        ("finished_at", pa.timestamp("ms", tz="UTC")),  # when the outcome was known
    ]
)


def schema(keep: pl.Schema, labels: Sequence[pa.Field] = ()) -> pa.Schema:
    """The output columns, one per output_schema field, then the manifest columns the config
    keeps (renamed input_NAME where they clash with an output column). ConfigError when a
    field's name is taken."""
    for f in labels:
        if f.name in COLUMNS.names or f.name in keep:
            taken = "an output column" if f.name in COLUMNS.names else "a kept manifest column (input.keep_columns)"
            raise ConfigError(f"output_schema.{f.name}: the name is {taken}; rename the field")
    kept = pl.DataFrame(schema=keep).to_arrow().schema
    clash = set(kept.names) & set(COLUMNS.names)
    if clash:
        kept = pa.schema([f.with_name(f"input_{f.name}") if f.name in clash else f for f in kept])
    return pa.schema([*COLUMNS, *labels, *kept])


def _common(row: ManifestRow) -> dict[str, Any]:
    """The columns every outcome has: the row's images, when it ended, and the kept columns."""
    kept = {f"input_{k}" if k in COLUMNS.names else k: v for k, v in row.keep.items()}
    return {"id": row.id, "images": len(row.images), "finished_at": datetime.now(timezone.utc), **kept}


def answered(row: ManifestRow, reply: Reply, cost_usd: float | None, charged_usd: float | None,
             values: Mapping[str, Any] | None = None, choice: int = 0) -> dict[str, Any]:
    """An answer; with an output schema, `values` are the typed columns read from `choice`,
    whose text is the `answer`."""
    usage = reply.usage
    return {
        **_common(row),
        **(values or {}),
        "status": "ok",
        "answer": reply.answers[choice],
        "answers": list(reply.answers),
        "finish_reason": reply.finish_reason,
        "refusal": reply.refusal,
        "model": reply.model,
        "response_id": reply.response_id,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "total_tokens": usage.total_tokens if usage else None,
        "reasoning_tokens": usage.reasoning_tokens if usage else None,
        "cached_tokens": usage.cached_tokens if usage else None,
        "cost_usd": cost_usd,
        "charged_usd": charged_usd,
        "latency_ms": round(reply.latency_ms, 1),
        "attempts": reply.attempts,
        "error": None,
    }


def unparsed(row: ManifestRow, reply: Reply, cost_usd: float | None, charged_usd: float | None,
             problem: str) -> dict[str, Any]:
    """An answer (paid for, kept raw) that no asking made fit the output schema."""
    return {**answered(row, reply, cost_usd, charged_usd), "status": "error", "error": f"parse_error: the answer {problem}",
            "retryable": False}


def failed(row: ManifestRow, error: str, attempts: int, retryable: bool) -> dict[str, Any]:
    return {**_common(row), "status": "error", "attempts": attempts, "error": error, "retryable": retryable}
