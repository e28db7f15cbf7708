"""Resume: the journal, the lock, the run's identity, --retry-failed and compaction."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import cli
from pipeline.simulator import Simulator
from pipeline.store import compact
from pipeline.store.columns import COLUMNS
from pipeline.store.journal import JOURNAL_FILE
from pipeline.store.lock import LOCK_FILE

from ..conftest import NAMED, named, write_config, write_manifest

HOLD_LOCK = (  # a process that takes an output directory's lock and keeps it
    "import sys, time, pathlib\n"
    "from pipeline.store.lock import Lock\n"
    "folder = pathlib.Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)\n"
    "lock = Lock(folder); lock.acquire(); print('held', flush=True); time.sleep(60)\n"
)


def read_out(directory: Path) -> pl.DataFrame:
    return pl.read_parquet(directory / "*.parquet")


@pytest.fixture
def job(sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]) -> Path:
    """A config for 6 named images against the shared simulator."""
    return write_config(tmp_path, sim.url, write_manifest(tmp_path, named(images(6))), prompt=NAMED)


def test_permanent_errors_are_not_asked_again_unless_retry_failed(job: Path, sim: Simulator, tmp_path: Path) -> None:
    sim.plan("img0001", [400])
    sim.plan("img0002", [503] * 4)
    assert cli.main(["run", str(job), "-q"]) == 1
    errors = read_out(tmp_path / "out").filter(pl.col("status") == "error").sort("attempts")
    assert errors.select("attempts", "retryable").rows() == [(1, False), (4, True)]
    sim.reset()

    assert cli.main(["run", str(job), "-q"]) == 1  # the transient one is asked again, the 400 is not
    assert len(sim.log) == 1 and "img0002" in sim.log[0].markers[0]
    sim.reset()

    assert cli.main(["run", str(job), "-q", "--retry-failed"]) == 0
    assert len(sim.log) == 1 and "img0001" in sim.log[0].markers[0]
    out = read_out(tmp_path / "out")
    assert out.height == 6 and out["id"].n_unique() == 6 and set(out["status"]) == {"ok"}


def test_a_changed_config_is_refused_naming_what_changed_unless_forced(
    job: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["run", str(job), "-q", "--limit", "2"]) == 0
    capsys.readouterr()

    assert cli.main(["run", str(job), "-q", "--set", "request.temperature=0.7"]) == 2
    err = capsys.readouterr().err
    assert "request.temperature: None -> 0.7" in err and "--force" in err
    assert cli.main(["run", str(job), "-q", "--set", "prompt.detail=low"]) == 2
    assert len(sim.log) == 2

    # speed settings may change freely; --force accepts a changed answer setting on purpose
    assert cli.main(["run", str(job), "-q", "--limit", "1", "--set", "limits.concurrency=3",
                     "--set", "endpoint.timeout_s=9"]) == 0
    assert cli.main(["run", str(job), "-q", "--force", "--set", "request.temperature=0.7"]) == 0
    assert len(sim.log) == 6


def test_a_lock_left_by_a_killed_run_does_not_stop_the_next(job: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "out")], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()  # like kill -9: no clean-up ran
    holder.wait()
    assert (tmp_path / "out" / LOCK_FILE).exists()
    assert cli.main(["run", str(job), "-q"]) == 0


def test_a_live_lock_is_refused_and_nothing_is_sent(job: Path, sim: Simulator, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "out")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert cli.main(["run", str(job), "-q"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert "another annotate run is writing" in err and f'"pid": {holder.pid}' in err
    assert sim.log == []


def test_a_torn_journal_tail_is_dropped_and_the_rest_recovered(job: Path, sim: Simulator, tmp_path: Path) -> None:
    # A child journals three batches of outcomes and dies without closing, leaving a WAL behind.
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from pipeline.store.journal import Journal\n"
        "j = Journal(Path(sys.argv[1]))\n"
        "for batch in range(3):\n"
        "    j.append([{'id': f'x{batch}-{i}', 'status': 'ok', 'answer': 'a' * 300} for i in range(20)])\n"
        "os._exit(9)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(out)], check=False)
    wal = out / (JOURNAL_FILE + "-wal")
    size = wal.stat().st_size
    assert size > 0
    with open(wal, "r+b") as f:
        f.truncate(size - 700)  # tear the last transaction's last frame

    assert cli.main(["run", str(job), "-q"]) == 0

    ids = set(read_out(out)["id"])
    assert {f"x0-{i}" for i in range(20)} | {f"x1-{i}" for i in range(20)} <= ids
    assert not any(i.startswith("x2-") for i in ids)  # the torn transaction is gone, whole
    assert len(ids) == 40 + 6


def test_compact_keeps_one_row_per_id_in_manifest_order(
    job: Path, sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.plan("img0003", [503] * 4)
    for _ in range(3):
        cli.main(["run", str(job), "-q", "--limit", "2"])
    assert cli.main(["run", str(job), "-q"]) == 0
    out = tmp_path / "out"
    before = read_out(out)
    assert len(list(out.glob("part-*.parquet"))) >= 4

    assert cli.main(["compact", str(out)]) == 0

    parts = list(out.glob("part-*.parquet"))
    after = pl.read_parquet(parts)
    assert len(parts) == 1 and "in manifest order" in capsys.readouterr().out
    assert after.height == 6 and after["id"].n_unique() == 6
    assert [Path(p).stem for p in pl.read_csv(tmp_path / "manifest.csv")["image"]] == [
        row["answer"].split('"Describe ')[1][:7] for row in after.iter_rows(named=True)]
    assert after.sort("id").equals(before.sort("id"))
    assert not list(out.glob(".*tmp")) and not (out / "_compact.json").exists()


def test_compact_in_piles_gives_what_one_table_in_memory_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Piles of 7 rows, parts of 10 and old parts of 30 read 7 at a time: every boundary falls
    inside a pile, a part or an old part somewhere."""
    monkeypatch.setattr(compact, "PILE_ROWS", 7)
    out = tmp_path / "out"
    out.mkdir()
    for n, ids in enumerate([range(0, 30), range(20, 50), range(5, 35, 2)]):  # later parts answer again
        pl.DataFrame(COLUMNS.empty_table()).clear(len(ids)).with_columns(
            id=pl.Series([f"r{i:02d}" for i in ids]), answer=pl.lit(f"part {n}")).write_parquet(out / f"part-x-{n}.parquet")
    old = pl.read_parquet(sorted(out.glob("part-*.parquet")))
    manifest = pl.Series([f"r{i:02d}" for i in range(45, -1, -1)])  # r46..r49 are not in it any more
    want = (old.unique("id", keep="last", maintain_order=True).join(manifest.to_frame("id").with_row_index("o"), on="id", how="left")
            .sort("o", nulls_last=True, maintain_order=True).drop("o"))

    done = compact.compact(out, manifest, rows_per_part=10)

    files = sorted(out.glob("part-*.parquet"))
    assert (done.rows, done.parts_after, len(files)) == (50, 5, 5)
    assert pl.read_parquet(files).equals(want)
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [10] * 5
    assert not list(out.glob(".*"))  # no piles or hidden parts left behind


def test_compacting_twice_in_a_row_keeps_every_row(job: Path, tmp_path: Path) -> None:
    assert cli.main(["run", str(job), "-q", "--limit", "3"]) == 0
    assert cli.main(["run", str(job), "-q"]) == 0
    out = tmp_path / "out"
    assert cli.main(["compact", str(out)]) == 0
    assert cli.main(["compact", str(out)]) == 0  # within the same second: new names never clash with old ones
    rows = read_out(out)
    assert rows.height == 6 and rows["id"].n_unique() == 6


def test_parts_written_before_a_column_was_added_still_resume_report_and_compact(
        job: Path, sim: Simulator, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(["run", str(job), "-q", "--limit", "3"]) == 0
    for part in out.glob("*.parquet"):  # as older versions wrote them: no image_notes, flags, earlier_cost_usd
        pl.read_parquet(part).drop("image_notes", "flags", "earlier_cost_usd").write_parquet(part)
    sim.reset()

    assert cli.main(["run", str(job), "-q", "--retry-flagged"]) == 0
    assert len(sim.log) == 0  # rows written before answers were flagged carry no flag
    assert cli.main(["run", str(job), "-q"]) == 0
    assert len(sim.log) == 3  # the 3 answered before are not asked again
    assert cli.main(["report", str(out)]) == 0
    assert cli.main(["compact", str(out)]) == 0
    rows = read_out(out)
    assert rows.height == 6 and rows["id"].n_unique() == 6 and "image_notes" in rows.columns
    assert rows["flags"].to_list().count(None) == 3  # the old rows; the new ones have theirs
