"""Helpers for tests that run `annotate` as a user does, in a process of its own, and count
what the simulator let through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from pipeline.simulator import LogEntry, Simulator

from .conftest import KEY, image_bytes

SETTLE_S = 5.0  # a run that starts above what the provider allows settles within this


def wait_for(condition: Callable[[], bool], deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, "condition not met before the deadline"
        time.sleep(0.005)


def start_run(cfg: Path) -> subprocess.Popen[str]:
    """`annotate run CONFIG -q` in a process of its own, as a user starts it."""
    # A shell's background job starts with SIGINT ignored; a terminal's Ctrl-C does not. Reset it.
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "-q"], env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(client: subprocess.Popen[str]) -> str:
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    return out + err


def answered(sim: Simulator) -> int:
    return sum(e.status == 200 for e in sim.requests())


GPT_4O = (2.50, 10.00)  # USD per 1M input and output tokens, as bundled


def billed(sim: Simulator) -> float:
    """What the simulator's answers cost, from the usage it returned."""
    cost: float = sum((e.usage["prompt_tokens"] * GPT_4O[0] + e.usage["completion_tokens"] * GPT_4O[1]) / 1e6
                      for e in sim.requests() if e.status == 200 and e.usage)
    return cost


def all_once(directory: Path, rows: int) -> pl.DataFrame:
    """The output of `directory`: every one of `rows` ids once."""
    out = pl.read_parquet(directory / "*.parquet").sort("id")
    assert out.height == rows and out["id"].n_unique() == rows
    return out


def answered_once(tmp_path: Path, rows: int) -> None:
    out = all_once(tmp_path / "out", rows)
    assert out["status"].to_list() == ["ok"] * rows
    for path in (tmp_path / "out").iterdir():
        assert KEY.encode() not in path.read_bytes()


def let_through(log: list[LogEntry]) -> list[float]:
    return sorted(entry.time for entry in log if entry.status == 200)


def refusals(log: list[LogEntry]) -> int:
    return sum(entry.status == 429 for entry in log)


def settled(log: list[LogEntry], since: float, until: float = float("inf")) -> list[LogEntry]:
    """The requests that arrived in [since, until): a run that starts above what the provider
    allows overshoots once, before its first 429 comes back; what it settles at is measured after."""
    return [entry for entry in log if since <= entry.time < until]


def rate(times: list[float], since: float = -1.0, until: float = float("inf")) -> float:
    """Requests a second let through between the first and the last in [since, until)."""
    inside = [t for t in times if since <= t < until]
    return (len(inside) - 1) / (inside[-1] - inside[0])


def settles_at(log: list[LogEntry], rpm: int, until: float = float("inf")) -> None:
    """What a run let through once settled, until `until`: at least 90% of `rpm`, with 429s at most 2% of requests."""
    times = let_through(log)
    after = settled(log, since=times[0] + SETTLE_S, until=until)
    assert rate(times, since=times[0] + SETTLE_S, until=until) >= 0.9 * rpm / 60
    assert refusals(after) <= 0.02 * len(after)


def small_images(tmp_path: Path, n: int) -> list[dict[str, str]]:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        (folder / f"img{i:04d}.png").write_bytes(image_bytes((32, 24), (i % 256, i // 256 * 40 % 256, 90)))
    return [{"image": f"images/img{i:04d}.png"} for i in range(n)]



def before_each_refusal(log: list[LogEntry]) -> list[list[int]]:
    """For each 429, how long before it (ms) each request let through in the second before
    it arrived: what to read when a run was refused that should not have been."""
    return [[round((entry.time - t) * 1000) for t in let_through(log) if entry.time - 1.0 <= t <= entry.time]
            for entry in log if entry.status == 429]
