"""engine: batch against the simulator's Batch API, which behaves as OpenAI's does at its
strictest: output lines in no order, no output file when nothing was answered, lines that
expire or fail with 500, a 429 on create, validation that fails a file too large or too long."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import cli
from pipeline.simulator import Simulator

from ..conftest import NAMED, named, write_config, write_manifest
from ..runs import finish, start_run

FAST = {"batch_validating_s": 0.05, "batch_lines_per_s": 400.0}
POLL = {"poll_s": 0.05}


def batch_config(tmp_path: Path, sim: Simulator, rows: int, images: Callable[..., list[str]],
                 **sections: Any) -> Path:
    manifest = write_manifest(tmp_path, named(images(rows)))
    batch = {**POLL, **sections.pop("batch", {})}
    return write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine="batch", batch=batch, **sections)


def out_rows(tmp_path: Path) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "out" / "*.parquet")


def answered_lines(sim: Simulator) -> Counter[str]:
    """How often each image's line was answered 200 by any batch."""
    return Counter(m for e in sim.requests() if e.batch_id and e.status == 200 for m in e.markers[:1])


def test_a_run_through_batches_answers_every_row_once_and_keeps_the_providers_usage(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    sim = faulty_sim(**FAST, batch_rate_500=0.2, batch_expire_share=0.2, batch_refuse_creates=1)
    config = batch_config(tmp_path, sim, 30, images, batch={"max_requests": 8, "resubmit": 3})

    code = cli.main(["run", str(config), "-q"])

    rows = out_rows(tmp_path)
    assert rows["id"].n_unique() == rows.height == 30
    ok, failed = rows.filter(pl.col("status") == "ok"), rows.filter(pl.col("status") != "ok")
    assert code == (0 if failed.is_empty() else 1)
    assert failed["retryable"].all() and failed["error"].str.contains("in 4 batches").all()
    assert max(answered_lines(sim).values()) == 1  # no row asked again once answered
    usage = {e.response_id: e.usage for e in sim.requests() if e.batch_id and e.status == 200}
    for row in ok.iter_rows(named=True):  # each answer's tokens as the provider counted them
        said = usage[row["response_id"]]
        assert said is not None and row["batch_id"]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (said["prompt_tokens"], said["completion_tokens"])
        assert row["cost_usd"] == pytest.approx((said["prompt_tokens"] * 1.25 + said["completion_tokens"] * 5.0) / 1e6)
    desk = sim.batches
    assert desk.creates_refused == 1
    statuses = Counter(b.status for b in desk.batches.values())
    assert statuses["expired"] >= 1 and sum(statuses.values()) >= 5  # 4 files of 8 rows at least, then the rest again
    assert any(e.batch_id and e.status == 500 for e in sim.requests())
    assert set(desk.files) == set()  # every file deleted once its answers were journalled
    assert not list((tmp_path / "out" / "_batches").iterdir())
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "out"), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)["batch"]
    assert said["rows"] == ok.height and said["cost_usd"] == pytest.approx(ok["cost_usd"].sum())
    assert said["online_cost_usd"] == pytest.approx(2 * said["cost_usd"])  # gpt-4o: the batch price is half


def shards_made(sim: Simulator) -> tuple[Counter[str], Counter[str]]:
    """Uploads by file name and batches by shard: each should be 1."""
    desk = sim.batches
    uploads = Counter(f.filename for f in desk.uploaded)
    batches = Counter((b.metadata or {}).get("annotate_shard", "") for b in desk.batches.values())
    return uploads, batches


def test_killed_at_any_moment_the_same_command_goes_on_without_asking_or_making_anything_twice(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(batch_validating_s=0.1, batch_lines_per_s=40.0, batch_expire_share=0.1)
    config = batch_config(tmp_path, sim, 40, images, batch={"max_requests": 10, "resubmit": 5})
    draw = random.Random(7)
    for _ in range(6):  # while uploading, creating, waiting or collecting: wherever the kill falls
        run = start_run(config)
        time.sleep(draw.uniform(0.3, 1.5))
        run.kill()
        run.wait(timeout=30)
    finish(start_run(config))

    rows = out_rows(tmp_path)
    assert rows["id"].n_unique() == rows.height == 40 and (rows["status"] == "ok").all()
    assert max(answered_lines(sim).values()) == 1
    uploads, batches = shards_made(sim)
    assert max(uploads.values()) == 1 and max(batches.values()) == 1


def test_ctrl_c_leaves_the_batches_running_and_the_next_run_collects_them(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(batch_validating_s=0.1, batch_lines_per_s=5.0)  # a batch takes seconds
    config = batch_config(tmp_path, sim, 12, images, batch={"max_requests": 6})
    run = start_run(config)
    while len(sim.batches.batches) < 2 and run.poll() is None:
        time.sleep(0.02)
    started = time.monotonic()
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=30)
    assert run.returncode == 130 and time.monotonic() - started < 5, err
    assert "annotate batch status" in err
    assert {b.status for b in sim.batches.batches.values()} <= {"validating", "in_progress", "completed"}
    assert not list((tmp_path / "out").glob("*.parquet")) or out_rows(tmp_path).height < 12

    finish(start_run(config))
    assert out_rows(tmp_path).height == 12 and max(answered_lines(sim).values()) == 1
    assert len(sim.batches.batches) == 2  # the same two batches, collected


def test_no_wait_submits_and_exits_and_status_and_cancel_see_the_batches(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    sim = faulty_sim(batch_validating_s=0.1, batch_lines_per_s=4.0)
    config = batch_config(tmp_path, sim, 8, images, batch={"max_requests": 4})
    assert cli.main(["run", str(config), "-q", "--no-wait"]) == 0
    assert len(sim.batches.batches) == 2 and not list((tmp_path / "out").glob("*.parquet"))

    assert cli.main(["batch", "status", str(tmp_path / "out")]) == 0
    listed = capsys.readouterr().out
    assert all(batch_id in listed for batch_id in sim.batches.batches)
    assert cli.main(["batch", "cancel", str(tmp_path / "out")]) == 0  # and collects what they finished
    said = capsys.readouterr().out
    assert "asked to cancel 2 batches" in said and "answered now:" in said
    assert {b.status for b in sim.batches.batches.values()} == {"cancelled"}
    collected = out_rows(tmp_path).height if list((tmp_path / "out").glob("*.parquet")) else 0
    assert collected == sum(1 for e in sim.requests() if e.batch_id and e.status == 200)

    assert cli.main(["run", str(config), "-q"]) == 0  # asks the rest in new batches
    rows = out_rows(tmp_path)
    assert rows.height == 8 and (rows["status"] == "ok").all() and max(answered_lines(sim).values()) == 1
    assert Counter(b.status for b in sim.batches.batches.values())["cancelled"] == 2


def test_a_schema_run_through_batches_fills_the_typed_columns(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(**FAST)
    config = batch_config(tmp_path, sim, 6, images, output_schema={"colour": "str", "objects": "int"})
    assert cli.main(["run", str(config), "-q"]) == 0
    rows = out_rows(tmp_path)
    assert rows["colour"].is_not_null().all() and rows["objects"].dtype == pl.Int64


def test_a_budget_is_held_by_each_batch_before_it_is_created(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(**FAST)
    # gpt-4o at the batch price: a row's worst case is about (110 + 50 tokens) -> $0.0004
    config = batch_config(tmp_path, sim, 20, images, limits={"max_cost_usd": 0.002})
    assert cli.main(["run", str(config), "-q"]) == 3  # stopped at the budget
    rows = out_rows(tmp_path)
    assert 0 < rows.height < 20 and rows["cost_usd"].sum() <= 0.002
    assert sum(1 for e in sim.requests() if e.batch_id) == rows.height  # nothing asked that was not kept


def test_estimate_prices_a_batch_run_at_the_batch_price(
        sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    config = batch_config(tmp_path, sim, 4, images)
    assert cli.main(["estimate", str(config), "--json"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert cli.main(["estimate", str(config), "--json", "--engine", "local"]) == 0
    online = json.loads(capsys.readouterr().out)
    assert batch["cost_usd"]["expected"] == pytest.approx(online["cost_usd"]["expected"] / 2)
    assert batch["online_expected_usd"] == pytest.approx(online["cost_usd"]["expected"])


@pytest.mark.parametrize("cap", [{"batch_max_lines": 5}, {"batch_max_bytes": 2_500}],
                         ids=["too-many-lines", "too-many-bytes"])
def test_files_the_provider_will_not_take_are_split_until_it_does(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]],
        cap: dict[str, int]) -> None:
    sim = faulty_sim(**FAST, **cap)  # fewer lines or bytes than the config's files hold
    config = batch_config(tmp_path, sim, 16, images, batch={"max_requests": 16, "resubmit": 4})
    assert cli.main(["run", str(config), "-q"]) == 0
    rows = out_rows(tmp_path)
    assert rows.height == 16 and (rows["status"] == "ok").all() and max(answered_lines(sim).values()) == 1
    desk = sim.batches
    if "batch_max_lines" in cap:
        assert any(b.status == "failed" for b in desk.batches.values())  # too_many_tasks, then halves
    else:
        assert len(desk.uploaded) > 1 and all(len(f.data) <= 2_500 for f in desk.uploaded)


def test_a_batch_made_though_its_answer_was_lost_is_found_not_made_again(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(**FAST, batch_lose_creates=2)  # made, then answered 500: a retry would make a second
    config = batch_config(tmp_path, sim, 12, images, batch={"max_requests": 6})
    assert cli.main(["run", str(config), "-q"]) == 0
    assert sim.batches.creates_lost == 2
    _, batches = shards_made(sim)
    assert len(batches) == 2 and max(batches.values()) == 1
    assert out_rows(tmp_path).height == 12 and max(answered_lines(sim).values()) == 1


def test_rows_no_batch_answered_are_retryable_errors_and_the_next_run_asks_them(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(**FAST, batch_expire_share=0.5)
    config = batch_config(tmp_path, sim, 12, images, batch={"resubmit": 0})
    assert cli.main(["run", str(config), "-q"]) == 1
    failed = out_rows(tmp_path).filter(pl.col("status") != "ok")
    assert failed.height > 0 and failed["retryable"].all() and failed["error"].str.contains("expired").all()

    sim.settings = sim.settings.model_copy(update={"batch_expire_share": 0.0})
    assert cli.main(["run", str(config), "-q"]) == 0
    rows = out_rows(tmp_path)
    assert rows.height == 12 and (rows["status"] == "ok").all() and max(answered_lines(sim).values()) == 1


def test_an_answer_that_breaks_the_schema_is_asked_again_in_a_later_batch_and_every_answer_is_paid_for(
        faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(**FAST, rate_schema_break=0.5)
    config = batch_config(tmp_path, sim, 12, images, output_schema={"colour": "str", "objects": "int"},
                          request={"parse_retries": 3}, input={"keep_columns": ["name"]})
    cli.main(["run", str(config), "-q"])
    rows = out_rows(tmp_path)
    assert rows.height == 12
    lines: dict[str, list[dict[str, Any]]] = {}
    for e in sim.requests():
        if e.batch_id and e.status == 200 and e.usage:
            lines.setdefault(e.markers[0], []).append(e.usage)
    asked_again = {text: usages for text, usages in lines.items() if len(usages) > 1}
    assert asked_again  # some answers broke the schema and were asked again
    for row in rows.iter_rows(named=True):
        usages = lines[f"Describe {row['name']}."]
        assert row["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)  # every paid answer counts
        assert row["attempts"] >= len(usages)
    ok = rows.filter(pl.col("status") == "ok")
    assert ok["colour"].is_not_null().all()
    assert (rows.filter(pl.col("status") != "ok")["error"].str.starts_with("parse_error")).all()
