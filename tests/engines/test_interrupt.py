"""Stopping a run at any moment loses nothing that was answered, and asks nothing twice."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from pipeline import cli
from pipeline.config import InputConfig, PromptConfig
from pipeline.manifest import Manifest
from pipeline.simulator import Simulator
from pipeline.store.lock import LOCK_FILE

from ..conftest import write_config, write_manifest
from ..runs import answered, start_run, wait_for


def held(sim: Simulator) -> int:
    """Requests the simulator is holding unanswered (its hang fault)."""
    return sum(e.fault == "hang" and e.status == 0 for e in sim.requests())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_what_is_in_flight_writes_it_and_a_rerun_asks_nothing_twice(
    faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]], sig: signal.Signals
) -> None:
    sim = faulty_sim(latency_s=0.2)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p} for p in images(30)]),
                       limits={"concurrency": 3})
    run = start_run(cfg)
    wait_for(lambda: answered(sim) >= 6)
    run.send_signal(sig)
    _, err = run.communicate(timeout=30)

    assert run.returncode == 130
    assert "run the same command again to resume" in err
    first = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert first.height == answered(sim) and set(first["status"]) == {"ok"}  # in-flight ones finished too

    assert cli.main(["run", str(cfg), "-q"]) == 0
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert out.height == 30 and out["id"].n_unique() == 30
    assert answered(sim) == 30  # nothing answered before the signal was asked again


def progress(moment: str, sim: Simulator, out: Path, pid: int, chance: random.Random) -> Callable[[], bool]:
    """Whether a run (process `pid`) has reached `moment`, told by what it did, not by the clock:
    "store open" (it holds the output directory's lock: it is replaying what the last kill left in
    the journal, or about to send), "first request" (one of its requests reached the simulator),
    "flowing" (the simulator answered it between 1 and 100 times)."""
    if moment == "store open":
        lock = out / LOCK_FILE
        return lambda: lock.exists() and f'"pid": {pid},' in lock.read_text()
    if moment == "first request":
        sent = len(sim.requests())
        return lambda: len(sim.requests()) > sent
    target = answered(sim) + chance.randint(1, 100)
    return lambda: answered(sim) >= target


def test_sigkill_at_moments_of_progress_loses_nothing_paid_for_and_duplicates_nothing(
    faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    # each "flowing" kill lets at most 100 answers (and those in flight) through: most rows are left to the last run
    rows, concurrency, chance = 2_000, 16, random.Random(20261125)
    sim = faulty_sim(latency_s=0.002, rate_500=0.02, retry_after_s=0.01)
    manifest = write_manifest(tmp_path, [{"image": p} for p in images(rows, size=(8, 8))])
    cfg = write_config(tmp_path, sim.url, manifest, limits={"concurrency": concurrency, "max_attempts": 8})
    moments = ["store open", "flowing", "flowing", "first request", "flowing", "flowing", "store open", "flowing",
               "flowing", "first request", "flowing", "flowing"]
    for moment in moments:
        run = start_run(cfg)
        reached = progress(moment, sim, tmp_path / "out", run.pid, chance)
        wait_for(lambda: reached() or run.poll() is not None)
        assert run.poll() is None, f"the run ended by itself before the {moment} kill"
        run.send_signal(signal.SIGKILL)
        run.wait()

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    expected = {row.id for batch in Manifest(InputConfig(manifest=manifest), PromptConfig()).batches()
                for row in batch}
    assert out.height == rows and out["id"].n_unique() == rows and set(out["id"]) == expected
    assert set(out["status"]) == {"ok"}
    assert answered(sim) <= rows + len(moments) * concurrency


def test_a_second_signal_stops_at_once_and_the_journal_keeps_what_was_received(
    faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    sim = faulty_sim(latency_s=0.05)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p} for p in images(200)]),
                       limits={"concurrency": 4})
    run = start_run(cfg)
    wait_for(lambda: answered(sim) >= 10)
    sim.settings = sim.settings.model_copy(update={"rate_hang": 1.0, "hang_s": 60.0})
    wait_for(lambda: held(sim) >= 4)  # every request in flight hangs now
    run.send_signal(signal.SIGINT)
    stderr = run.stderr
    assert stderr is not None
    wait_for(lambda: "stopping" in stderr.readline())  # the first is handled (two at once are one)
    run.send_signal(signal.SIGINT)
    run.communicate(timeout=20)  # far less than the 30 s grace: the second signal did not wait

    assert run.returncode == 130
    sim.settings = sim.settings.model_copy(update={"rate_hang": 0.0})
    assert cli.main(["run", str(cfg), "-q"]) == 0
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert out.height == 200 and out["id"].n_unique() == 200
    assert answered(sim) <= 200 + 4  # at most the requests in flight at the second signal were lost
