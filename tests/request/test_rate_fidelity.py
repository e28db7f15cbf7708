"""Whole runs against limits enforced the ways providers enforce them (the simulator's modes),
counted from the simulator's log: the rate the provider let through, and every 429.

The client runs as its own process (`python -m pipeline run`), as a user runs it, and so does
the simulator (tests/benchmarks/sim_process.py): neither's timing is the test process's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.simulator import LogEntry

from ..conftest import KEY, image_bytes, write_config, write_manifest
from ..benchmarks.sim_process import SimulatorProcess


@pytest.fixture
def serve() -> Iterator[Any]:
    """Starts a simulator process with the given settings; stopped after the test."""
    started: list[SimulatorProcess] = []

    def start(**settings: Any) -> SimulatorProcess:
        started.append(SimulatorProcess(**settings))
        return started[-1]

    yield start
    for sim in started:
        sim.__exit__(None, None, None)


def start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(client: subprocess.Popen[bytes]) -> str:
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err.decode()
    return (out + err).decode()


def answered_once(tmp_path: Path, rows: int) -> None:
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert out.height == rows and out["id"].n_unique() == rows
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


def mixed_images(tmp_path: Path, n: int) -> list[dict[str, str]]:
    """n distinct PNGs of six sizes, from one tile to several."""
    sizes = [(64, 48), (512, 512), (300, 900), (1024, 768), (128, 128), (700, 700)]
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(n):
        name = f"img{i:04d}.png"
        (folder / name).write_bytes(image_bytes(sizes[i % len(sizes)], (i % 256, i // 256 * 40 % 256, 90)))
        rows.append({"image": f"images/{name}"})
    return rows


def small_images(tmp_path: Path, n: int) -> list[dict[str, str]]:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        (folder / f"img{i:04d}.png").write_bytes(image_bytes((32, 24), (i % 256, i // 256 * 40 % 256, 90)))
    return [{"image": f"images/img{i:04d}.png"} for i in range(n)]


RPM = 6000  # 100 a second
SETTLE_S = 5.0
LIMITS = {"concurrency": 32, "max_attempts": 8}


@pytest.mark.parametrize("mode", [{"limit_mode": "window"},
                                  {"limit_mode": "window", "window_s": 10},
                                  {"limit_mode": "fixed_minute", "window_s": 2}, {"limit_mode": "bucket"}],
                         ids=["window-1s", "window-10s", "fixed-2s", "bucket"])
def test_requests_at_the_limit(serve: Any, tmp_path: Path, mode: dict[str, Any]) -> None:
    rows = 1000
    sim = serve(latency_s=0.05, requests_per_minute=RPM, **mode)
    manifest = write_manifest(tmp_path, small_images(tmp_path, rows))
    finish(start(write_config(tmp_path, sim.url, manifest, limits={**LIMITS, "requests_per_minute": RPM})))
    log = sim.requests()
    assert refusals(log) == 0
    assert rate(let_through(log)) >= 0.97 * RPM / 60
    answered_once(tmp_path, rows)


def test_tokens_at_the_limit_with_images_of_mixed_sizes(serve: Any, tmp_path: Path) -> None:
    rows, tpm = 600, 1_500_000  # 25,000 a second; requests of 150 to 1,200 tokens
    sim = serve(latency_s=0.05, tokens_per_minute=tpm)
    manifest = write_manifest(tmp_path, mixed_images(tmp_path, rows))
    finish(start(write_config(tmp_path, sim.url, manifest, limits={**LIMITS, "tokens_per_minute": tpm})))
    log = sim.requests()
    assert refusals(log) == 0
    counted = sorted((e.time, e.usage["prompt_tokens"] + 50) for e in log if e.status == 200 and e.usage)
    span = counted[-1][0] - counted[0][0]
    assert sum(n for _, n in counted[1:]) / span >= 0.97 * tpm / 60
    answered_once(tmp_path, rows)


def test_a_stalled_client_catches_up_no_further_than_the_window(serve: Any,
                                                                 tmp_path: Path) -> None:
    rows = 1200
    sim = serve(latency_s=0.05, requests_per_minute=RPM)
    manifest = write_manifest(tmp_path, small_images(tmp_path, rows))
    client = start(write_config(tmp_path, sim.url, manifest, limits={**LIMITS, "requests_per_minute": RPM}))
    for seen in (200, 500, 800):  # stopped three times, as a busy machine or a GC pause would
        while sim.seen() < seen and client.poll() is None:
            time.sleep(0.005)
        os.kill(client.pid, signal.SIGSTOP)
        time.sleep(0.3)
        os.kill(client.pid, signal.SIGCONT)
    finish(client)
    assert refusals(sim.requests()) == 0
    answered_once(tmp_path, rows)


@pytest.mark.parametrize("stated", [True, False], ids=["headers", "no-headers"])
def test_an_unstated_lower_limit_is_found(serve: Any, tmp_path: Path,
                                          stated: bool) -> None:
    rows, real = 1500, RPM // 2  # the provider allows half of what the config says, and does not say so
    sim = serve(latency_s=0.05, requests_per_minute=real, state_limits=stated)
    manifest = write_manifest(tmp_path, small_images(tmp_path, rows))
    said = finish(start(write_config(tmp_path, sim.url, manifest, limits={**LIMITS, "requests_per_minute": RPM})))
    settles_at(sim.requests(), real)
    if not stated:
        assert "held at" in said  # found from 429s; a stated limit is taken as it is
    answered_once(tmp_path, rows)


def test_a_neighbour_on_the_key_is_made_room_for_and_its_share_taken_back(
        serve: Any, tmp_path: Path) -> None:
    rows, neighbour = 3000, RPM // 4
    sim = serve(latency_s=0.05, requests_per_minute=RPM, neighbour_rpm=neighbour)
    manifest = write_manifest(tmp_path, small_images(tmp_path, rows))
    client = start(write_config(tmp_path, sim.url, manifest, limits={**LIMITS, "requests_per_minute": RPM}))
    while sim.seen() < 1200 and client.poll() is None:
        time.sleep(0.01)
    sim.update(neighbour_rpm=0)  # the other job ends
    stopped = time.monotonic()
    finish(client)
    log = sim.requests()
    settles_at(log, RPM - neighbour, until=stopped)
    times = let_through(log)
    back = next(t for t in times if t > stopped + 2 and rate(times, t - 2, t) >= 0.9 * RPM / 60)
    assert back - stopped <= 60
    answered_once(tmp_path, rows)
