"""Answers that need a second look: the `flags` column as rows are answered, their counts in
`annotate report`, and `annotate run --retry-flagged`, against a simulator that answers some
requests empty, with a refusal, or with one caption for every image."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import cli
from pipeline.config import QualityConfig
from pipeline.quality import flags_of
from pipeline.simulator import Simulator
from pipeline.store.columns import COLUMNS
from pipeline.store.parts import Store

from .conftest import body_of, write_config, write_manifest

ROWS = 60
FLAWS = {"rate_empty": 0.12, "rate_refusal": 0.12, "rate_repeat": 0.12, "seed": 5}


@pytest.mark.parametrize(("row", "prose", "flags"), [
    ({"answer": "A red square on a white background."}, True, []),
    ({"answer": "   "}, True, ["empty"]),
    ({"answer": "", "finish_reason": "length"}, True, ["empty", "length"]),  # a reasoning model cut at max_tokens
    ({"answer": "A red squ", "finish_reason": "length"}, True, ["length", "short"]),
    ({"answer": "I’m sorry, but I can’t help with that."}, True, ["refusal"]),
    ({"answer": "i cannot identify people in images."}, True, ["refusal"]),
    ({"answer": '{"x": 1}', "refusal": "I can't assist with that."}, False, ["refusal"]),
    ({"answer": 'A shop sign reads "Sorry, we are closed".'}, True, []),  # quoted, not a refusal
    ({"answer": "A cat."}, True, ["short"]),
    ({"answer": '{"a":1}'}, False, []),  # JSON for an output schema is never short
])
def test_the_flags_of_one_answer(row: dict[str, Any], prose: bool, flags: list[str]) -> None:
    assert flags_of({"status": "ok", **row}, QualityConfig(), prose) == flags


def test_an_error_row_has_no_flags_and_patterns_can_be_set() -> None:
    assert flags_of({"status": "error", "answer": ""}, QualityConfig(), True) is None
    own = QualityConfig(refusal_patterns=("no comment",), min_chars=0)
    assert flags_of({"status": "ok", "answer": "No comment."}, own, True) == ["refusal"]
    assert flags_of({"status": "ok", "answer": "I'm sorry, no."}, own, True) == []


def _expected(flaw: str | None, finish_reason: str) -> list[str]:
    """The flags of an answer the simulator spoiled with `flaw` (a repeat is flagged only over the dataset)."""
    return [flag for flag, present in (("empty", flaw == "empty"), ("length", finish_reason == "length"),
                                       ("refusal", flaw == "refusal")) if present]


@pytest.fixture
def flawed(tmp_path: Path, faulty_sim: Callable[..., Simulator],
           images: Callable[..., list[str]]) -> tuple[Simulator, Path]:
    """A first run over all but 4 of ROWS images against a simulator that spoils some answers."""
    sim = faulty_sim(**FLAWS)
    paths = images(ROWS)
    manifest = write_manifest(tmp_path, [{"image": p, "name": Path(p).stem} for p in paths])
    cfg = write_config(tmp_path, sim.url, manifest, prompt={"user": "Describe {name} in a sentence."},
                       quality={"retry": {"max_tokens": 400, "temperature": 0.7}})
    assert cli.main(["run", str(cfg), "-q", "--limit", str(ROWS - 4)]) == 0  # 4 rows left for later
    return sim, cfg


def test_each_answer_is_flagged_as_the_simulator_spoiled_it_and_the_report_counts_them(
        flawed: tuple[Simulator, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sim, _ = flawed
    capsys.readouterr()
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    by_response = {row["response_id"]: row for row in out.iter_rows(named=True)}
    spoiled = {"empty": 0, "refusal": 0, "repeat": 0}
    for entry in sim.requests():
        row = by_response[entry.response_id]
        assert row["flags"] == _expected(entry.flaws[0], row["finish_reason"]), (entry.flaws, row["answer"])
        if entry.flaws[0]:
            spoiled[entry.flaws[0]] += 1
    assert min(spoiled.values()) >= 3  # every kind of spoiled answer is in the run

    assert cli.main(["report", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the refusals repeat one text too: a row already flagged is not counted a duplicate
    assert report["flags"] == {"empty": spoiled["empty"], "refusal": spoiled["refusal"], "duplicate": spoiled["repeat"]}
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    assert f"flagged for a second look: {spoiled['repeat']} duplicate" in capsys.readouterr().out


def test_retry_flagged_asks_only_flagged_rows_again_with_quality_retry_and_keeps_their_earlier_cost(
        flawed: tuple[Simulator, Path], tmp_path: Path, faulty_sim: Callable[..., Simulator],
        capsys: pytest.CaptureFixture[str]) -> None:
    first_sim, cfg = flawed
    before = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    spoiled = {e.response_id for e in first_sim.requests() if e.flaws[0]}
    flagged = set(before.filter(pl.col("response_id").is_in(list(spoiled)))["id"])
    assert len(flagged) >= 9
    second = faulty_sim(seed=3)  # answers everything well
    capsys.readouterr()

    code = cli.main(["run", str(cfg), "-q", "--retry-flagged", "--set", f"endpoint.base_url={second.url}"])

    text = capsys.readouterr().out
    assert code == 0, text
    asked = [body_of(e) for e in second.requests()]
    assert len(asked) == len(flagged), "only the flagged rows, not the 4 never asked"
    assert all(body["max_tokens"] == 400 and body["temperature"] == 0.7 for body in asked)
    assert f"flagged rows asked again: {len(flagged)}" in text
    after = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    assert after["id"].to_list() == before["id"].to_list()  # every id once
    old = {row["id"]: row for row in before.iter_rows(named=True)}
    for row in after.iter_rows(named=True):
        if row["id"] not in flagged:
            assert row["response_id"] == old[row["id"]]["response_id"]
            continue
        assert row["flags"] == [] and row["status"] == "ok"
        paid = old[row["id"]]["cost_usd"]
        assert row["earlier_cost_usd"] == pytest.approx(paid)
        new = (row["prompt_tokens"] * 2.5 + row["completion_tokens"] * 10.0) / 1e6
        assert row["cost_usd"] == pytest.approx(paid + new)
    assert after["cost_usd"].sum() == pytest.approx(
        sum((e.usage or {})["prompt_tokens"] * 2.5e-6 + (e.usage or {})["completion_tokens"] * 1e-5
            for sim in (first_sim, second) for e in sim.requests()))

    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cost_usd"] == pytest.approx(after["cost_usd"].sum())
    assert report["replaced_answers_usd"] == pytest.approx(before.filter(pl.col("id").is_in(list(flagged)))
                                                           ["cost_usd"].sum())
    assert report["by_model"][0]["cost_usd"] == pytest.approx(report["cost_usd"] - report["replaced_answers_usd"])

    assert cli.main(["run", str(cfg), "-q", "--retry-flagged", "--set", f"endpoint.base_url={second.url}"]) == 0
    assert len(second.requests()) == len(flagged), "nothing flagged is left to ask"


def test_a_flagged_row_whose_new_asking_fails_keeps_its_earlier_answer(
        tmp_path: Path, faulty_sim: Callable[..., Simulator], images: Callable[..., list[str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    sim = faulty_sim(rate_refusal=1.0)
    paths = images(3)
    manifest = write_manifest(tmp_path, [{"image": p, "name": Path(p).stem} for p in paths])
    cfg = write_config(tmp_path, sim.url, manifest, prompt={"user": "Describe {name}."})
    assert cli.main(["run", str(cfg), "-q"]) == 0
    refusals = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    assert refusals["flags"].to_list() == [["refusal"]] * 3
    sim.plan("img0001", [400])
    capsys.readouterr()

    assert cli.main(["run", str(cfg), "-q", "--retry-flagged"]) == 0

    assert "flagged rows asked again: 3 (1 failed and keep their earlier answer)" in capsys.readouterr().out
    after = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    assert after["id"].to_list() == refusals["id"].to_list() and after["status"].to_list() == ["ok"] * 3
    assert after["answer"].str.starts_with("I'm sorry").all()  # the simulator still refuses
    kept = set(after["response_id"]) & set(refusals["response_id"])
    assert len(kept) == 1  # the row answered 400 keeps its first answer; the others have new ones


def test_a_paid_new_asking_that_fits_no_schema_keeps_the_earlier_answer_and_adds_its_cost(
        tmp_path: Path, faulty_sim: Callable[..., Simulator], images: Callable[..., list[str]]) -> None:
    paths = images(4)
    manifest = write_manifest(tmp_path, [{"image": p} for p in paths])
    schema = {"colour": "str", "photo": "bool"}
    cfg = write_config(tmp_path, faulty_sim().url, manifest, output_schema=schema,
                       quality={"refusal_patterns": [r'\{"colour":'], "retry": {"max_tokens": 80}})  # flags them all
    assert cli.main(["run", str(cfg), "-q"]) == 0
    before = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    assert before["flags"].to_list() == [["refusal"]] * 4
    broken = faulty_sim(rate_invalid_json=1.0)  # every answer paid for, none fits the schema

    assert cli.main(["run", str(cfg), "-q", "--retry-flagged", "--set", f"endpoint.base_url={broken.url}",
                     "--set", "request.parse_retries=0"]) == 0

    after = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    assert after.select("id", "answer", "response_id").equals(before.select("id", "answer", "response_id"))
    paid = {e.response_id: e.usage for e in broken.requests()}
    assert len(paid) == 4
    added = sum((u or {})["prompt_tokens"] * 2.5e-6 + (u or {})["completion_tokens"] * 1e-5 for u in paid.values())
    assert after["cost_usd"].sum() == pytest.approx(before["cost_usd"].sum() + added)
    assert after["earlier_cost_usd"].sum() == pytest.approx(added)


@pytest.mark.parametrize(("extra", "message"), [
    (["--retry-failed"], "one kind of row again at a time"),
    (["--engine", "batch"], "engine batch collects its batches in later runs"),
    (["--set", "quality.retry.model=gpt-4o-mini"], "quality.retry.model"),
    (["--set", "request.model=o4-mini", "--set", "request.temperature=null", "--set", "quality.retry.temperature=0.7"],
     "quality.retry.temperature: o4-mini is a reasoning model"),
])
def test_retry_flagged_refuses_what_it_cannot_do_before_sending(
        flawed: tuple[Simulator, Path], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    sim, cfg = flawed
    sent = len(sim.requests())
    capsys.readouterr()
    assert cli.main(["run", str(cfg), "-q", "--retry-flagged", *extra]) == 2
    assert message in capsys.readouterr().err
    assert len(sim.requests()) == sent


def test_an_answer_asked_again_and_journalled_before_a_crash_replaces_the_old_one(tmp_path: Path) -> None:
    ok = {name: None for name in COLUMNS.names} | {"status": "ok", "images": 1, "attempts": 1,
                                                   "finished_at": datetime.now(timezone.utc)}
    first = Store(tmp_path / "out", COLUMNS)
    first.record([{**ok, "id": "a", "answer": "", "flags": ["empty"], "cost_usd": 0.5, "charged_usd": 0.5},
                  {**ok, "id": "b", "answer": "A fine caption.", "flags": []}])
    first.close()

    again = Store(tmp_path / "out", COLUMNS, redo=lambda rows: rows.filter(pl.col("flags").list.len() > 0).select("id"))
    assert again.redo_ids == {"a"} and again.paid_before == {"a": (0.5, 0.5)}
    again.record([{**ok, "id": "a", "answer": "A second caption.", "flags": [], "earlier_cost_usd": 0.5,
                   "finished_at": datetime.now(timezone.utc)}])
    assert again._journal is not None
    again._journal.close()  # killed before its last part: the new answer is only in the journal
    again._let_go()

    Store(tmp_path / "out", COLUMNS).close()  # a plain run replays it

    out = pl.read_parquet(tmp_path / "out" / "*.parquet").sort("id")
    assert out["id"].to_list() == ["a", "b"]
    assert out["answer"].to_list() == ["A second caption.", "A fine caption."]


def test_export_leaves_flagged_rows_out_unless_asked(flawed: tuple[Simulator, Path], tmp_path: Path) -> None:
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    plain = set(out.filter(pl.col("flags").list.len() == 0)["id"])
    assert 0 < len(plain) < out.height
    for name, extra in (("default", []), ("all", ["--where", "status = 'ok'"])):
        to = tmp_path / name
        assert cli.main(["export", str(tmp_path / "out"), "--to", str(to), "--format", "jsonl", "-q", *extra]) == 0
        exported = {json.loads(line)["id"] for line in to.read_text().splitlines()}
        assert exported == (plain if name == "default" else set(out["id"]))
