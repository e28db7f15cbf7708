"""The columns of the output dataset (DESIGN.md, Output).

Owns: the output schema, with the typed label columns and the kept manifest columns.
Never: I/O, or how an outcome fills a row (`pipeline.rows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import pyarrow as pa

from ..errors import ConfigError

__all__ = ["COLUMNS", "schema"]

COLUMNS = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),  # ok | error
        ("answer", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("finish_reason", pa.string()),
        ("refusal", pa.string()),
        ("flags", pa.list_(pa.string())),  # an answer that needs a second look: empty, length, refusal, short
        ("model", pa.string()),
        ("response_id", pa.string()),
        ("batch_id", pa.string()),  # the provider's batch that answered the row (engine: batch)
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("reasoning_tokens", pa.int64()),
        ("cached_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        # what the budget counted: cost_usd, or the request's worst case when no usage came back
        ("charged_usd", pa.float64()),
        # of cost_usd, what answers this row replaced had cost (--retry-flagged, --retry-failed)
        ("earlier_cost_usd", pa.float64()),
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
