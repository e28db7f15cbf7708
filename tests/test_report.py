"""`annotate report`: totals equal the sums over the Parquet rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from pipeline import cli
from pipeline.simulator import Simulator

from .conftest import NAMED, named, write_config, write_manifest


def test_report_json_totals_equal_the_sums_over_the_rows(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sim.plan("img0002", [400])
    sim.plan("img0003", [500])  # answered on the second attempt
    paths = images(8)
    rows = [{"image": [row["image"]], "name": row["name"]} for row in named(paths[:6])]
    rows.append({"image": paths[6:], "name": "pair"})
    manifest = write_manifest(tmp_path, rows, name="m.parquet")
    cfg = write_config(tmp_path, sim.url, manifest, prompt=NAMED)
    assert cli.main(["run", str(cfg), "-q"]) == 1
    capsys.readouterr()

    assert cli.main(["report", str(tmp_path / "out"), "--json"]) == 0

    report = json.loads(capsys.readouterr().out)
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    ok = out.filter(pl.col("status") == "ok")
    assert report["rows"] == out.height == 7 and report["images"] == 8
    assert report["by_status"] == {"error": 1, "ok": 6}
    assert report["attempts"] == out["attempts"].sum() == len(sim.requests()) == 8
    assert report["tokens"] == {"prompt": ok["prompt_tokens"].sum(), "completion": ok["completion_tokens"].sum(),
                                "reasoning": 0, "cached": 0, "total": ok["total_tokens"].sum()}
    assert report["cost_usd"] == pytest.approx(ok["cost_usd"].sum())
    assert report["cost_per_1000_images_usd"] == pytest.approx(ok["cost_usd"].sum() / 8 * 1000)
    (model,) = report["by_model"]
    assert (model["model"], model["rows"], model["prompt_tokens"]) == ("gpt-4o", 6, ok["prompt_tokens"].sum())
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["p99"]
    assert report["errors"] == [{"error": out.filter(pl.col("status") == "error")["error"][0], "rows": 1}]
    assert report["rows_per_s"] > 0

    assert cli.main(["report", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "7 rows (1 error, 6 ok), 8 images" in text and "requests: 8 attempts" in text
