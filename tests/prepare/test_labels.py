"""Structured runs against the simulator: typed columns, re-asks, parse errors, fallbacks, resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.simulator import Simulator

from ..conftest import NAMED, body_of, image_bytes, named, usage_of, write_config, write_manifest

PALETTE = "black, white, grey, red, orange, yellow, green, cyan, blue, purple, pink, brown"
LABELS: dict[str, Any] = {
    "colour": {"type": f"enum[{PALETTE}]", "description": "the dominant colour"},
    "shapes": "int",
    "photo": "bool",
    "tags": "list[str]",
    "shape": {"ratio": "float", "size": "enum[small, medium, large]"},
}


def coloured(tmp_path: Path, colours: list[str]) -> Path:
    """A manifest of one plain image per colour, named so sim.plan() can find them."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    paths = []
    for i, colour in enumerate(colours):
        (folder / f"img{i:04d}.png").write_bytes(image_bytes((64 + i, 48), colour))
        paths.append(f"images/img{i:04d}.png")
    return write_manifest(tmp_path, [{**row, "truth": c} for row, c in zip(named(paths), colours)])


def labelled(tmp_path: Path, url: str, manifest: Path, **request: Any) -> Path:
    return write_config(tmp_path, url, manifest, prompt=NAMED, output_schema=LABELS,
                        input={"keep_columns": ["truth"]}, request=request)


def read_out(directory: Path) -> pl.DataFrame:
    return pl.read_parquet(directory / "*.parquet")


def test_a_labelling_run_writes_typed_columns_read_back_alike_by_polars_and_duckdb(
        sim: Simulator, tmp_path: Path) -> None:
    colours = ["red", "blue", "green", "yellow"] * 2
    assert cli.main(["run", str(labelled(tmp_path, sim.url, coloured(tmp_path, colours))), "-q"]) == 0

    arrow = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    assert {name: str(arrow.field(name).type) for name in LABELS} == {
        "colour": "string", "shapes": "int64", "photo": "bool", "tags": "list<element: string>",
        "shape": "struct<ratio: double, size: string>"}
    out = read_out(tmp_path / "out").sort("id")
    assert out.schema["shapes"] == pl.Int64 and out.schema["photo"] == pl.Boolean
    assert out["colour"].to_list() == out["truth"].to_list()  # the simulator reads the colour off the image
    assert out["shapes"].to_list() == [0] * 8 and out["photo"].to_list() == [False] * 8
    assert set(out["shape"].struct.field("size")) == {"small"}
    assert out["shape"].struct.field("ratio").dtype == pl.Float64

    selected = duckdb.sql(f"SELECT * FROM read_parquet('{tmp_path / 'out'}/*.parquet')")
    assert selected is not None  # a SELECT has a result
    ducked = selected.pl().sort("id")
    assert ducked.select(list(LABELS)).equals(out.select(list(LABELS)))
    described = duckdb.sql(f"DESCRIBE SELECT shapes, photo, tags, colour FROM "
                           f"read_parquet('{tmp_path / 'out'}/*.parquet')")
    assert described is not None
    types: dict[str, str] = dict(zip(*described.pl().select("column_name", "column_type")
                                     .to_dict(as_series=False).values()))
    assert types == {"shapes": "BIGINT", "photo": "BOOLEAN", "tags": "VARCHAR[]", "colour": "VARCHAR"}


@pytest.mark.parametrize("mode", ["json_object", "prompt"])
def test_the_fallback_modes_give_the_same_columns(sim: Simulator, tmp_path: Path, mode: str) -> None:
    colours = ["red", "blue", "green"]
    manifest = coloured(tmp_path, colours)
    assert cli.main(["run", str(labelled(tmp_path, sim.url, manifest)), "-q"]) == 0
    assert cli.main(["run", str(labelled(tmp_path, sim.url, manifest, structured=mode)), "-q",
                     "-o", str(tmp_path / mode)]) == 0
    sent = [body_of(e) for e in sim.log[3:]]
    if mode == "json_object":
        assert all(b["response_format"] == {"type": "json_object"} for b in sent)
    else:  # the schema goes in the user's text, and no response_format
        assert all("response_format" not in b and '"properties"' in b["messages"][-1]["content"][0]["text"]
                   for b in sent)
    first, second = (read_out(tmp_path / d).sort("id").select(list(LABELS)) for d in ("out", mode))
    assert first.equals(second)


def test_bad_answers_are_asked_again_and_every_row_ends_ok_or_as_a_parse_error(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(rate_invalid_json=0.1, rate_schema_break=0.05, seed=3)
    manifest = write_manifest(tmp_path, named(images(80)))
    cfg = write_config(tmp_path, sim.url, manifest, prompt=NAMED, output_schema=LABELS)
    assert cli.main(["run", str(cfg), "-q"]) in (0, 1)

    out = read_out(tmp_path / "out")
    assert out.height == 80 and out["id"].n_unique() == 80
    first = [e for e in sim.log if len(body_of(e)["messages"]) == 1]
    again = [e for e in sim.log if len(body_of(e)["messages"]) == 3]  # the question, the answer, what was wrong
    assert len(first) == 80 and len(first) + len(again) == len(sim.log)
    assert again, "the simulator sent no bad answer: the test proves nothing"
    assert len(again) == sum(1 for e in first if e.flaws[0])  # one re-ask per bad answer (parse_retries 1)
    ok, bad = out.filter(pl.col("status") == "ok"), out.filter(pl.col("status") == "error")
    assert bad.height == sum(1 for e in again if e.flaws[0])
    assert ok["colour"].null_count() == 0 and ok["shapes"].null_count() == 0
    assert bad["error"].str.starts_with("parse_error: the answer").all()
    assert bad["answer"].null_count() == 0  # the raw answer is kept, the typed columns stay empty
    assert bad.select(pl.col(list(LABELS)).is_null().all()).row(0) == (True,) * len(LABELS)
    # every request's usage is in its row: re-asks included
    assert out["prompt_tokens"].sum() == sum(e.usage["prompt_tokens"] for e in sim.log if e.usage)
    assert out["completion_tokens"].sum() == sum(e.usage["completion_tokens"] for e in sim.log if e.usage)


def test_an_answer_that_stays_invalid_is_a_parse_error_row_with_the_raw_answer_and_all_its_usage(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    sim = faulty_sim(rate_invalid_json=1.0)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(3))), prompt=NAMED,
                       output_schema=LABELS, request={"parse_retries": 2})
    assert cli.main(["run", str(cfg), "-q"]) == 1
    assert "3 failed" in capsys.readouterr().out

    out = read_out(tmp_path / "out")
    assert set(out["status"]) == {"error"} and out["retryable"].to_list() == [False] * 3
    assert out["error"].str.starts_with("parse_error: the answer is not valid JSON").all()
    assert out["answer"].null_count() == 0 and out["colour"].null_count() == 3
    assert len(sim.log) == 9 and out["attempts"].to_list() == [3] * 3
    follow_up = body_of(sim.log[-1])["messages"]
    assert follow_up[-2]["role"] == "assistant" and "not valid JSON" in follow_up[-1]["content"]
    assert out["prompt_tokens"].sum() == sum(usage_of(e)["prompt_tokens"] for e in sim.log)
    assert out["cost_usd"].null_count() == 0 and out["cost_usd"].sum() > 0

    assert cli.main(["run", str(cfg), "-q"]) == 1  # a parse error is final ...
    assert len(sim.log) == 9
    assert cli.main(["run", str(cfg), "-q", "--retry-failed", "--set", "request.parse_retries=0"]) == 1
    assert len(sim.log) == 12  # ... unless asked for


def test_n_choices_fill_the_columns_from_the_first_valid_one(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(rate_schema_break=0.5, seed=1)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(12))), prompt=NAMED,
                       output_schema=LABELS, request={"n": 3, "parse_retries": 0})
    code = cli.main(["run", str(cfg), "-q"])

    out = read_out(tmp_path / "out")
    assert code == (1 if (out["status"] == "error").any() else 0)
    flaws = {e.response_id: e.flaws for e in sim.log}
    picked_later = 0
    for row in out.iter_rows(named=True):
        assert len(row["answers"]) == 3
        if row["status"] == "error":  # no choice fitted
            assert None not in flaws[row["response_id"]]
            continue
        first_valid = flaws[row["response_id"]].index(None)
        assert row["answer"] == row["answers"][first_valid]
        picked_later += first_valid > 0
    assert picked_later, "no row needed a later choice: the test proves nothing"
    assert len(sim.log) == 12


def test_an_endpoint_refusing_response_format_stops_the_run_and_names_the_fallback(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    sim = faulty_sim(refuse_response_format="json_schema")
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(20))), prompt=NAMED,
                       output_schema=LABELS, limits={"concurrency": 1})
    assert cli.main(["run", str(cfg), "-q"]) == 1
    err = capsys.readouterr().err
    assert "response_format" in err and "request.structured: json_object" in err
    assert len(sim.log) == 3

    # how the schema is asked for is not part of the run's identity: the fallback resumes
    assert cli.main(["run", str(cfg), "-q", "--set", "request.structured=json_object"]) == 0
    out = read_out(tmp_path / "out")
    assert out.height == 20 and set(out["status"]) == {"ok"}


def test_a_changed_schema_refuses_to_resume_unless_forced(sim: Simulator, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    manifest = coloured(tmp_path, ["red", "blue", "green"])
    cfg = labelled(tmp_path, sim.url, manifest)
    assert cli.main(["run", str(cfg), "-q", "--limit", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(cfg), "-q", "--set", "output_schema.shapes=float"]) == 2
    err = capsys.readouterr().err
    assert "output_schema.properties.shapes.type: 'integer' -> 'number'" in err and "--force" in err
    assert len(sim.log) == 1
    assert cli.main(["run", str(cfg), "-q"]) == 0
    assert len(sim.log) == 3


def test_streamed_structured_answers_fill_the_same_columns(sim: Simulator, tmp_path: Path) -> None:
    manifest = coloured(tmp_path, ["red", "blue"])
    assert cli.main(["run", str(labelled(tmp_path, sim.url, manifest, stream=True)), "-q"]) == 0
    out = read_out(tmp_path / "out").sort("id")
    assert out["colour"].to_list() == out["truth"].to_list() and out["prompt_tokens"].null_count() == 0


def test_report_counts_the_values_of_enum_and_boolean_fields(sim: Simulator, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    manifest = coloured(tmp_path, ["red", "red", "blue", "green"])
    assert cli.main(["run", str(labelled(tmp_path, sim.url, manifest)), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "out"), "--json"]) == 0
    labels = json.loads(capsys.readouterr().out)["labels"]
    assert labels == {"colour": [{"value": "red", "rows": 2}, {"value": "blue", "rows": 1},
                                 {"value": "green", "rows": 1}],
                      "photo": [{"value": False, "rows": 4}],
                      "shape.size": [{"value": "small", "rows": 4}]}
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    assert "colour: red 2, blue 1, green 1" in capsys.readouterr().out


def test_re_asks_stay_within_the_budget_and_keep_what_was_paid_for(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(rate_invalid_json=1.0)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(10))), prompt=NAMED,
                       output_schema=LABELS, request={"parse_retries": 5}, limits={"concurrency": 2,
                                                                                     "max_cost_usd": 0.02})
    assert cli.main(["run", str(cfg), "-q"]) == 3

    out = read_out(tmp_path / "out")
    assert out["charged_usd"].sum() <= 0.02
    assert out["prompt_tokens"].sum() == sum(usage_of(e)["prompt_tokens"] for e in sim.log)  # every answer is kept
    assert len(sim.log) > out.height  # re-asks were sent before the budget ran out


def test_a_full_json_schema_goes_out_strict_and_its_answers_land_in_typed_columns(
        sim: Simulator, tmp_path: Path) -> None:
    from .test_structured import FULL

    config = write_config(tmp_path, sim.url, coloured(tmp_path, ["red", "blue", "green"]), prompt=NAMED,
                          output_schema=FULL)
    assert cli.main(["run", str(config), "-q"]) == 0  # the simulator refuses a strict schema that breaks the rules
    sent = body_of(sim.log[0])["response_format"]["json_schema"]
    assert sent["strict"] is True and set(sent["schema"]["required"]) == set(FULL["properties"])
    arrow = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    assert {name: str(arrow.field(name).type) for name in FULL["properties"]} == {
        "label": "string", "note": "string", "count": "int64", "box": "struct<x: int64, y: int64>",
        "kind": "string"}
    out = read_out(tmp_path / "out")
    assert out["status"].to_list() == ["ok"] * 3
    assert set(out["label"]) <= {"cat", "dog"} and out["box"].struct.field("x").null_count() == 0


def test_a_schema_with_no_strict_form_goes_out_with_strict_false_and_one_warning(
        sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    open_schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "additionalProperties": True}
    config = write_config(tmp_path, sim.url, coloured(tmp_path, ["red", "blue"]), prompt=NAMED,
                          output_schema=open_schema)
    assert cli.main(["run", str(config), "-q"]) == 0
    warned = [r.getMessage() for r in caplog.records if "output_schema is asked for with strict: false" in r.getMessage()]
    assert len(warned) == 1 and "(an object open to more properties has no strict form)" in warned[0]
    assert {body_of(entry)["response_format"]["json_schema"]["strict"] for entry in sim.log} == {False}
    out = read_out(tmp_path / "out")
    assert out["status"].to_list() == ["ok"] * 2 and out.schema["colour"] == pl.String


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_in_the_refusal_field_is_a_parse_error_naming_it_and_is_not_asked_again(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]], stream: bool) -> None:
    """As OpenAI's Structured Outputs refuse: content null, the words in `refusal`; asking again
    with what was wrong would be paid for and refused again."""
    sim = faulty_sim(rate_refusal=0.5, seed=2)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(16))), prompt=NAMED,
                       output_schema=LABELS, request={"stream": stream, "parse_retries": 2})
    assert cli.main(["run", str(cfg), "-q"]) == 1

    out = read_out(tmp_path / "out")
    refused = {e.response_id for e in sim.log if e.flaws == ("refusal",)}
    assert 3 <= len(refused) <= 13 and len(sim.log) == 16  # no refusal was asked again
    bad = out.filter(pl.col("response_id").is_in(list(refused)))
    assert bad.height == len(refused) and set(bad["status"]) == {"error"}
    assert set(bad["error"]) == {"parse_error: the answer is a refusal: I'm sorry, I cannot assist with that request."}
    assert set(bad["refusal"]) == {"I'm sorry, I cannot assist with that request."} and bad["colour"].null_count() == bad.height
    assert out.filter(~pl.col("response_id").is_in(list(refused)))["status"].to_list() == ["ok"] * (16 - len(refused))
    assert (bad["completion_tokens"] > 0).all()  # a refusal is paid for
