"""SIGINT stops a run cleanly: what was received is on disk, and a rerun finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from pipeline import cli
from pipeline.simulator import Simulator

from .conftest import write_config, write_manifest


def wait_for(condition: Callable[[], bool], deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        time.sleep(0.02)


def test_sigint_writes_what_was_received_and_a_rerun_completes_without_duplicates(
    faulty_sim: Callable[..., Simulator], tmp_path: Path, images: Callable[..., list[str]]
) -> None:
    sim = faulty_sim(latency_s=0.2)
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p} for p in images(30)]),
                       limits={"concurrency": 2})
    run = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "-q"], env=os.environ.copy(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: sum(e.status == 200 for e in sim.requests()) >= 6)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=20)

    assert run.returncode == 130
    assert "run the same command again to resume" in err
    first = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert first.height >= 4 and set(first["status"]) == {"ok"}

    assert cli.main(["run", str(cfg), "-q"]) == 0
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert out.height == 30 and out["id"].n_unique() == 30
    answered = sum(e.status == 200 for e in sim.requests())
    assert answered <= 30 + 2  # at most the requests in flight at the signal were asked twice
