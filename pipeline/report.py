"""What a run produced, read back from its output directory.

Owns: the summary of an output directory (rows by status, tokens, cost by model, latency
percentiles, the commonest errors). Never: writing to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from .errors import StoreError

__all__ = ["summarize", "render"]


def summarize(directory: Path) -> dict[str, Any]:
    parts = sorted(directory.glob("part-*.parquet"))
    if not parts:
        raise StoreError(f"{directory}: no Parquet parts here (is it an output.dir?)")
    rows = pl.scan_parquet(parts)
    status = rows.group_by("status").len().sort("status").collect()
    ok = rows.filter(pl.col("status") == "ok")
    by_model = (
        ok.group_by("model")
        .agg(pl.len().alias("rows"), pl.col("prompt_tokens").sum(), pl.col("completion_tokens").sum(),
             pl.col("cost_usd").sum().alias("cost_usd"), pl.col("cost_usd").null_count().alias("unpriced"))
        .sort("model")
        .collect()
    )
    latency = ok.select(
        *(pl.col("latency_ms").quantile(q).alias(f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99))
    ).collect()
    errors = (
        rows.filter(pl.col("status") != "ok").group_by("error").len().sort("len", descending=True).head(5).collect()
    )
    return {
        "dir": str(directory),
        "rows": dict(zip(status["status"].to_list(), status["len"].to_list(), strict=True)),
        "models": by_model.to_dicts(),
        "latency_ms": latency.to_dicts()[0],
        "top_errors": [{"error": e, "rows": n} for e, n in errors.iter_rows()],
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['dir']}: " + ", ".join(f"{n} {s}" for s, n in report["rows"].items())]
    for m in report["models"]:
        cost = "no price known" if m["unpriced"] == m["rows"] else f"${m['cost_usd']:.4f}"
        lines.append(f"  {m['model']}: {m['rows']} rows, {m['prompt_tokens']} prompt + "
                     f"{m['completion_tokens']} completion tokens, {cost}")
    lat = report["latency_ms"]
    if lat.get("p50") is not None:
        lines.append(f"  latency ms: p50 {lat['p50']:.0f}, p90 {lat['p90']:.0f}, p99 {lat['p99']:.0f}")
    for e in report["top_errors"]:
        lines.append(f"  {e['rows']} x {e['error']}")
    return "\n".join(lines)
