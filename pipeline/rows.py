"""An outcome as an output row: an answer, an answer that fits no schema, or an error.

Owns: filling the output columns (`pipeline.store.columns`) from a reply or a failure, on any
engine. Never: I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .completion import Reply
from .errors import RowInputError
from .manifest import ManifestRow
from .store.columns import COLUMNS

__all__ = ["answered", "failed", "image_failed", "unparsed"]


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


def image_failed(row: ManifestRow, exc: RowInputError, attempts: int = 0) -> dict[str, Any]:
    """A row whose images could not be read or fetched; `attempts` requests were made."""
    return failed(row, f"image: {exc}", attempts, exc.retryable)
