"""What a run produced, read back from its output directory with Polars.

Owns: the summary of an output directory: rows by status, requests sent (retries included),
tokens and cost in total and by model, cost per 1,000 images, what the Batch API saved, latency percentiles, throughput, the commonest errors, and value
counts of the output schema's enum and boolean fields.
Never: writing to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from . import quality
from .config import Price, QualityConfig
from .cost.pricing import PriceTable
from .store.folder import Folder, open_folder
from .store.parts import parts, read_run_info, scan
from .structured import categories

__all__ = ["summarize", "render"]

_TOKENS = ("prompt", "completion", "reasoning", "cached", "total")
# cost_usd holds what the answers a row replaced cost too (earlier_cost_usd): a model's or a
# batch's figures take the row's own answer only
_earlier = pl.col("earlier_cost_usd").fill_null(0.0)
_own_cost = (pl.col("cost_usd") - _earlier).alias("cost_usd")


def summarize(directory: Path | str) -> dict[str, Any]:
    folder = open_folder(directory)
    rows = scan(parts(folder, required=True), options=folder.options)
    ok = rows.filter(pl.col("status") == "ok")
    answered = rows.filter(pl.col("model").is_not_null())  # an unparseable answer was paid for too
    totals = rows.select(
        rows=pl.len(),
        images=pl.col("images").sum(),
        attempts=pl.col("attempts").sum(),
        cost_usd=pl.col("cost_usd").sum(),
        earlier_usd=_earlier.sum(),
        unpriced=(pl.col("model").is_not_null() & pl.col("cost_usd").is_null()).sum(),
        seconds=(pl.col("finished_at").max() - pl.col("finished_at").min()).dt.total_milliseconds() / 1000,
        **{name: pl.col(f"{name}_tokens").sum() for name in _TOKENS},
    ).collect().row(0, named=True)
    by_status = rows.group_by("status").len().sort("status").collect()
    by_model = (answered.group_by("model")
                .agg(pl.len().alias("rows"), pl.col("prompt_tokens").sum(), pl.col("completion_tokens").sum(),
                     _own_cost.sum())
                .sort("model").collect())
    latency = ok.select(**{f"p{q}": pl.col("latency_ms").quantile(q / 100) for q in (50, 95, 99)}).collect()
    errors = (rows.filter(pl.col("status") != "ok").group_by("error").len()
              .sort(["len", "error"], descending=[True, False]).head(10).collect())
    images, seconds = totals["images"] or 0, totals["seconds"] or 0.0
    return {
        "dir": str(directory),
        "rows": totals["rows"],
        "images": images,
        "by_status": dict(by_status.iter_rows()),
        "attempts": totals["attempts"] or 0,
        "tokens": {name: totals[name] or 0 for name in _TOKENS},
        "cost_usd": totals["cost_usd"],
        "replaced_answers_usd": totals["earlier_usd"] or 0.0,  # of cost_usd: answers asked again since
        "unpriced_rows": totals["unpriced"],
        "cost_per_1000_images_usd": totals["cost_usd"] / images * 1000 if images else None,
        "by_model": by_model.to_dicts(),
        "latency_ms": latency.row(0, named=True),
        "rows_per_s": totals["rows"] / seconds if seconds else None,
        "errors": [{"error": e, "rows": n} for e, n in errors.iter_rows()],
        "labels": _value_counts(folder, ok),
        "flags": _flag_counts(folder, rows),
        "batch": _batch_savings(folder, answered),
    }


@dataclass(frozen=True)
class _Sums:
    """Token sums of many answers, as one usage record (a price is linear in tokens)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int | None


def _batch_savings(directory: Folder, answered: pl.LazyFrame) -> dict[str, Any] | None:
    """Rows answered through the Batch API, what they cost, and what they would have online."""
    sums = (answered.filter(pl.col("batch_id").is_not_null()).group_by("model")
            .agg(pl.len().alias("rows"), _own_cost.sum(),
                 *(pl.col(f"{name}_tokens").sum() for name in ("prompt", "completion", "total", "cached")))
            .collect())
    if sums.is_empty():
        return None
    prices = PriceTable({name: Price(**p) for name, p in ((read_run_info(directory) or {}).get("config") or {})
                         .get("pricing", {}).items()})
    online = [prices.cost_usd(m["model"], _Sums(m["prompt_tokens"], m["completion_tokens"], m["total_tokens"],
                                                m["cached_tokens"])) for m in sums.iter_rows(named=True)]
    cost = float(sums["cost_usd"].sum())
    return {"rows": int(sums["rows"].sum()), "cost_usd": cost,
            "online_cost_usd": None if None in online else sum(c for c in online if c is not None)}


def _flag_counts(directory: Folder, rows: pl.LazyFrame) -> dict[str, int]:
    """Answered rows by flag (`pipeline.quality`), commonest first; duplicates counted over all
    rows by the run's quality settings (prose answers only)."""
    frame = (rows.filter(pl.col("status") == "ok").select(pl.col("flags").explode().alias("flag"))
             .drop_nulls().group_by("flag").len().collect())
    counts = dict(frame.iter_rows())
    config = (read_run_info(directory) or {}).get("config") or {}
    if config.get("output_schema") is None:
        repeated = quality.duplicate_answers(rows, QualityConfig(**config.get("quality", {})).duplicate_share)
        if duplicates := int(repeated.select(pl.col("rows").sum()).collect().item() or 0):
            counts[quality.DUPLICATE] = duplicates
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _value_counts(directory: Folder, ok: pl.LazyFrame) -> dict[str, list[dict[str, Any]]]:
    """Answered rows by each enum and boolean field of the run's output schema, commonest first."""
    info = read_run_info(directory) or {}
    schema = (info.get("config") or {}).get("output_schema")
    counts = {}
    for path in categories(schema) if schema else []:
        column = pl.col(path[0])
        for name in path[1:]:
            column = column.struct.field(name)
        frame = (ok.select(column.alias("value")).group_by("value").len()
                 .sort(["len", "value"], descending=[True, False], nulls_last=True).collect())
        counts[".".join(path)] = [{"value": v, "rows": n} for v, n in frame.iter_rows()]
    return counts


def render(report: dict[str, Any]) -> str:
    status = ", ".join(f"{n} {s}" for s, n in report["by_status"].items())
    t = report["tokens"]
    lines = [
        f"{report['dir']}: {report['rows']} rows ({status}), {report['images']} images",
        f"  requests: {report['attempts']} attempts, retries included",
        f"  tokens: {t['prompt']} prompt ({t['cached']} cached) + {t['completion']} completion "
        f"({t['reasoning']} reasoning) = {t['total']}",
        f"  cost: ${report['cost_usd']:.4f}"
        + (f", ${report['cost_per_1000_images_usd']:.4f} per 1,000 images" if report["cost_per_1000_images_usd"]
           is not None else "")
        + (f" (${report['replaced_answers_usd']:.4f} of it for answers asked again since)"
           if report["replaced_answers_usd"] else "")
        + (f" ({report['unpriced_rows']} answered rows had no known price)" if report["unpriced_rows"] else ""),
    ]
    lines += [f"    {m['model']}: {m['rows']} rows, {m['prompt_tokens']} + {m['completion_tokens']} tokens, "
              f"${m['cost_usd']:.4f}" for m in report["by_model"]]
    lat = report["latency_ms"]
    if lat["p50"] is not None:
        lines.append(f"  latency ms: p50 {lat['p50']:.0f}, p95 {lat['p95']:.0f}, p99 {lat['p99']:.0f}")
    if report["rows_per_s"]:
        lines.append(f"  throughput: {report['rows_per_s']:.1f} rows/s (first to last outcome)")
    if batch := report["batch"]:
        online = batch["online_cost_usd"]
        lines.append(f"  through the Batch API: {batch['rows']} rows, ${batch['cost_usd']:.4f}"
                     + (f"; online they would have cost ${online:.4f}, saved ${online - batch['cost_usd']:.4f}"
                        if online is not None else ""))
    lines += [f"  {e['rows']} x {e['error']}" for e in report["errors"]]
    if report["flags"]:
        lines.append("  flagged for a second look: " + ", ".join(f"{n} {flag}" for flag, n in report["flags"].items())
                     + " (annotate run --retry-flagged asks them again)")
    lines += [f"  {field}: " + ", ".join(f"{_shown(c['value'])} {c['rows']}" for c in counts)
              for field, counts in report["labels"].items()]
    return "\n".join(lines)


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
