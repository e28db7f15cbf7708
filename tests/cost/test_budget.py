"""limits.max_cost_usd: what the provider bills for a directory never passes it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import polars as pl
import pytest

from pipeline import cli
from pipeline.cost.budget import Budget
from pipeline.simulator import Simulator

from ..conftest import write_config, write_manifest
from ..runs import billed


def test_a_budget_of_half_the_estimate_stops_under_it_exits_3_and_a_larger_one_finishes(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, [{"image": p} for p in images(40, size=(700, 500))])
    cfg = write_config(tmp_path, sim.url, manifest, limits={"concurrency": 8})
    capsys.readouterr()
    assert cli.main(["estimate", str(cfg), "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)["cost_usd"]["expected"] / 2

    assert cli.main(["run", str(cfg), "-q", "--set", f"limits.max_cost_usd={budget}"]) == 3

    assert "stopped there: raise limits.max_cost_usd" in capsys.readouterr().out
    spent = pl.read_parquet(tmp_path / "out" / "*.parquet")["cost_usd"].sum()
    assert billed(sim) <= budget and spent == pytest.approx(billed(sim))
    assert spent > budget / 2  # it did spend, up to near the cap

    assert cli.main(["run", str(cfg), "-q", "--set", f"limits.max_cost_usd={budget * 4}"]) == 0
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert out.height == 40 and out["id"].n_unique() == 40
    assert billed(sim) == pytest.approx(out["cost_usd"].sum())  # nothing was paid for twice


def test_a_resumed_run_counts_what_earlier_runs_spent(sim: Simulator, tmp_path: Path,
                                                     images: Callable[..., list[str]]) -> None:
    manifest = write_manifest(tmp_path, [{"image": p} for p in images(10)])
    cfg = write_config(tmp_path, sim.url, manifest, limits={"concurrency": 2})
    assert cli.main(["run", str(cfg), "-q", "--limit", "5"]) == 0
    spent = cast(float, pl.read_parquet(tmp_path / "out" / "*.parquet")["cost_usd"].sum())  # a Float64 column
    sim.reset()

    assert cli.main(["run", str(cfg), "-q", "--set", f"limits.max_cost_usd={spent * 1.01}"]) == 3
    assert sim.log == []  # the earlier runs already spent the budget


def test_budget_holds_worst_cases_in_flight_and_settles_to_what_was_billed() -> None:
    budget = Budget(1.0, spent_usd=0.25)
    assert budget.hold_now(0.5) and not budget.hold_now(0.3)  # 0.25 + 0.5 + 0.3 > 1
    assert not budget.exhausted  # the request in flight may cost less than it holds: wait for it
    budget.release(0.5, 0.1)
    assert (budget.spent_usd, budget.held_usd) == pytest.approx((0.35, 0.0))
    assert budget.hold_now(0.3)  # now it fits
    budget.release(0.3, 0.3)
    assert not budget.hold_now(0.4) and budget.exhausted  # 0.65 + 0.4 > 1 with nothing in flight
    assert Budget(None).hold_now(1e9)


def test_what_earlier_runs_were_charged_counts_even_without_a_reported_cost(tmp_path: Path) -> None:
    from pipeline.store import columns
    from pipeline.store.parts import Store

    schema = columns.schema(pl.Schema())
    rows: list[dict[str, Any]] = [
        {"id": "a", "status": "ok", "cost_usd": 0.25, "charged_usd": 0.25},
        {"id": "b", "status": "ok", "cost_usd": None, "charged_usd": 0.5}]  # no usage: its worst case
    store = Store(tmp_path, schema)
    store.record(rows)
    store.close()
    reopened = Store(tmp_path, schema)
    assert reopened.spent_usd == pytest.approx(0.75)
    reopened.close()
