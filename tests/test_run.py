"""End to end: `annotate run` against the simulator on 127.0.0.1."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import duckdb
import polars as pl
import pytest

from pipeline import cli
from pipeline.simulator import Simulator

from .conftest import KEY, NAMED, body_of, image_bytes, named, write_config, write_manifest


def read_out(tmp_path: Path) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "out" / "*.parquet")


def test_run_writes_one_ok_row_per_image_with_the_simulators_usage(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    paths = images(20)
    manifest = write_manifest(tmp_path, [{"image": p, "label": f"thing {i}"} for i, p in enumerate(paths)])
    cfg = write_config(tmp_path, sim.url, manifest, input={"keep_columns": ["label"]},
                       prompt={"user": "What is {label}?"})

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = read_out(tmp_path)
    assert out.height == 20 and out["id"].n_unique() == 20
    assert set(out["status"]) == {"ok"}
    answered = {e.response_id: e.usage for e in sim.log if e.status == 200}
    for row in out.iter_rows(named=True):
        usage = answered[row["response_id"]]
        assert usage is not None
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
            usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
        assert row["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10) / 1e6)
    assert sorted(out["label"]) == sorted(f"thing {i}" for i in range(20))
    counted = duckdb.sql(f"select count(*) from '{tmp_path}/out/*.parquet' where status = 'ok'")
    assert counted is not None  # a SELECT has a result
    assert counted.fetchall() == [(20,)]


def test_fault_mix_ends_with_every_row_ok_once_and_usage_as_answered(
    faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    sim = faulty_sim(rate_500=0.10, rate_429=0.05, rate_hang=0.02, rate_malformed=0.02, rate_drop=0.02,
                     rate_503=0.02, retry_after_s=0.05, hang_s=5.0, seed=3)
    paths = images(500, size=(16, 16))
    manifest = write_manifest(tmp_path, [{"image": p} for p in paths])
    cfg = write_config(tmp_path, sim.url, manifest, endpoint={"timeout_s": 0.5},
                       limits={"concurrency": 32, "max_attempts": 10})

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = read_out(tmp_path)
    assert out.height == 500 and out["id"].n_unique() == 500
    assert out["status"].unique().to_list() == ["ok"]
    faults = {e.fault for e in sim.log}
    assert {"500", "503", "429", "hang", "malformed", "drop"} <= faults
    assert cast(int, out["attempts"].max()) > 1
    answered = {e.response_id: e.usage for e in sim.log if e.status == 200 and e.fault is None}
    for row in out.select("response_id", "prompt_tokens", "completion_tokens", "total_tokens").iter_rows():
        usage = answered[row[0]]
        assert usage is not None
        assert row[1:] == (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])


def test_bad_rows_are_error_rows_and_the_run_goes_on(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    good = images(2)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    rows: list[dict[str, str | None]] = [
        {"image": p} for p in [*good, "images/missing.png", "images/broken.png", "images/empty.jpg"]]
    rows.append({"image": None})
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, rows))

    assert cli.main(["run", str(cfg), "-q"]) == 1

    out = read_out(tmp_path).sort("error", nulls_last=True)
    errors = [e for e in out["error"].to_list() if e]
    assert out.height == 6 and out.filter(pl.col("status") == "ok").height == 2
    assert any("missing file" in e and "missing.png" in e for e in errors)
    assert any("broken.png is corrupt" in e for e in errors)
    assert any("empty.jpg is empty" in e for e in errors)
    assert any("no image" in e for e in errors)
    assert all(e.startswith("image: ") for e in errors)
    assert len(sim.log) == 2  # nothing was sent for the bad rows


def test_permanent_400_is_recorded_once_and_not_retried(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    paths = images(3)
    sim.plan("img0001", [400])
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(paths)), prompt=NAMED)

    assert cli.main(["run", str(cfg), "-q"]) == 1

    out = read_out(tmp_path)
    bad = out.filter(pl.col("status") == "error").row(0, named=True)
    assert bad["error"].startswith("request: 400") and bad["attempts"] == 1
    assert len(sim.log) == 3


def test_rerun_skips_answered_rows_retries_failed_ones_and_keeps_one_row_per_id(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    paths = images(6)
    sim.plan("img0002", [503, 503])
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(paths)), prompt=NAMED,
                       limits={"max_attempts": 2})
    assert cli.main(["run", str(cfg), "-q"]) == 1
    assert read_out(tmp_path).filter(pl.col("status") == "error").height == 1
    sim.reset()

    assert cli.main(["run", str(cfg), "-q"]) == 0

    assert len(sim.log) == 1  # only the failed row was asked again
    out = read_out(tmp_path)
    assert out.height == 6 and out["id"].n_unique() == 6 and set(out["status"]) == {"ok"}


def test_limit_answers_only_that_many_rows(sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]) -> None:
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p} for p in images(5)]))
    assert cli.main(["run", str(cfg), "-q", "--limit", "2"]) == 0
    assert read_out(tmp_path).height == 2
    assert cli.main(["run", str(cfg), "-q"]) == 0
    assert read_out(tmp_path).height == 5 and len(sim.log) == 5


def test_wrong_key_stops_the_run_early_with_one_message(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sim.plan("img", [401] * 50)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(40))), prompt=NAMED,
                       limits={"concurrency": 1})

    assert cli.main(["run", str(cfg), "-q"]) == 1

    assert len(sim.log) < 10
    err = capsys.readouterr().err
    assert "401" in err and "ANNOTATE_TEST_KEY" in err and KEY not in err


def test_several_images_per_row_go_in_one_message(sim: Simulator, tmp_path: Path,
                                                 images: Callable[..., list[str]]) -> None:
    paths = images(4)
    manifest = write_manifest(tmp_path, [{"images": paths[:2]}, {"images": paths[2:]}], name="m.parquet")
    cfg = write_config(tmp_path, sim.url, manifest, input={"image_column": "images"})

    assert cli.main(["run", str(cfg), "-q"]) == 0

    for entry in sim.log:
        content = body_of(entry)["messages"][-1]["content"]
        assert [part["type"] for part in content] == ["text", "image_url", "image_url"]


def test_hugging_face_image_struct_and_binary_columns(sim: Simulator, tmp_path: Path) -> None:
    rows = [{"image": {"bytes": image_bytes(colour="blue"), "path": "a.png"}, "raw": image_bytes(colour="green")}]
    manifest = write_manifest(tmp_path, rows, name="hf.parquet")
    for column in ("image", "raw"):
        cfg = write_config(tmp_path, sim.url, manifest, input={"image_column": column},
                           output={"dir": str(tmp_path / column)})
        assert cli.main(["run", str(cfg), "-q"]) == 0
    answers = [body_of(entry)["messages"][-1]["content"][1]["image_url"]["url"][:22] for entry in sim.log]
    assert answers == ["data:image/png;base64,"] * 2


def test_stream_and_n_assemble_every_choice_with_usage(sim: Simulator, tmp_path: Path,
                                                      images: Callable[..., list[str]]) -> None:
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p} for p in images(3)]),
                       request={"model": "gpt-4o", "max_tokens": 50, "stream": True, "n": 2})

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = read_out(tmp_path)
    assert out["answers"].list.len().to_list() == [2, 2, 2]
    assert (out["answer"] == out["answers"].list.first()).all()
    assert cast(int, out["prompt_tokens"].min()) > 0 and cast(int, out["completion_tokens"].min()) > 0
    for entry in sim.log:
        assert body_of(entry)["stream"] is True and body_of(entry)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("auth", ["bearer", "x-api-key", "x-goog-api-key"])
def test_each_auth_style_reaches_the_server_and_the_key_is_written_nowhere(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], auth: str,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    sim.plan("img0001", [400])
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(2))), prompt=NAMED,
                       endpoint={"auth": auth, "headers": {"x-team": "vision"}})

    assert cli.main(["-v", "run", str(cfg), "-q"]) == 1  # the row answered 400 failed

    assert {e.auth for e in sim.log} == {auth}
    assert all(e.headers.get("x-team") == "vision" for e in sim.log)
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err + caplog.text
    for path in (tmp_path / "out").iterdir():
        assert KEY.encode() not in path.read_bytes()


def test_a_retry_after_a_429_waits_at_least_its_retry_after(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    sim.plan("img0000", [429], retry_after_s=0.4)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(1))), prompt=NAMED)

    assert cli.main(["run", str(cfg), "-q"]) == 0

    first, second = sim.log
    assert first.status == 429 and second.status == 200
    assert second.time - first.time >= 0.4


def test_in_process_simulator_from_the_config(tmp_path: Path, images: Callable[..., list[str]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANNOTATE_TEST_KEY")
    cfg = write_config(tmp_path, "http://unused.invalid/v1", write_manifest(tmp_path, [{"image": p} for p in images(3)]),
                       endpoint={"simulator": {"latency_s": 0.01}})
    assert cli.main(["run", str(cfg), "-q"]) == 0
    assert read_out(tmp_path)["status"].to_list() == ["ok"] * 3


def test_verbose_logs_one_line_a_request_and_each_retry_at_info(
        sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], caplog: pytest.LogCaptureFixture) -> None:
    sim.plan("img0001", [503])
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(2))), prompt=NAMED)

    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert cli.main(["-v", "run", str(cfg), "-q"]) == 0

    requests = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP Request: POST")]
    assert len(requests) == len(sim.log) == 3 and sum('"503"' in line for line in requests) == 1
    retries = [r for r in caplog.records if r.getMessage().startswith("Retrying")]
    assert len(retries) == 1 and retries[0].levelno == logging.INFO and "503" in retries[0].getMessage()
