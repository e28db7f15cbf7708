"""engine: ray, on one local cluster of 3 nodes (1 CPU each) shared by the session."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import cli, simulator
from pipeline.config import LimitsConfig

from ..conftest import NAMED, image_bytes, named, write_config, write_manifest
from ..image_host import ImageHost
from ..s3_server import S3Server
from ..runs import (
    all_once,
    answered,
    answered_once,
    billed,
    finish,
    let_through,
    rate,
    refusals,
    settles_at,
    small_images,
    start_run,
    wait_for,
)
from . import cases

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline.engines.ray.coordinator import Coordinator  # noqa: E402
from pipeline.engines.ray.stages import RESERVATION_EXPIRES_S  # noqa: E402

pytestmark = pytest.mark.ray

TOKEN_COLUMNS = ["prompt_tokens", "completion_tokens", "total_tokens"]
# A run that follows a driver killed with SIGKILL waits for Ray to notice and to free what that
# driver's actors held; on a busy clean checkout that took over 30 s once (the run after it and
# the next one both waited), so the first answers get this long.
AFTER_A_KILLED_DRIVER_S = 120.0


def _run(config: Path, *args: str) -> int:
    return cli.main(["run", str(config), "-q", *args])


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def _read(directory: Path) -> pl.DataFrame:
    return pl.read_parquet(directory / "*.parquet").sort("id")


def test_both_engines_write_the_same_rows(cluster: Cluster, sim: simulator.Simulator, tmp_path: Path,
                                          images: Callable[..., list[str]]) -> None:
    paths = images(60)
    rows = [*named(paths), {"image": "images/missing.png", "name": "missing"}]
    manifest = write_manifest(tmp_path, rows)
    local = write_config(tmp_path, sim.url, manifest, prompt=NAMED, output={"dir": str(tmp_path / "local")})
    assert _run(local) == 1  # the missing image is an error row
    on_ray = write_config(tmp_path, sim.url, manifest, prompt=NAMED, output={"dir": str(tmp_path / "ray")},
                          ray={"http_actors": 2, "block_rows": 8})
    assert _run(on_ray, "--engine", "ray") == 1
    columns = ["id", "status", "answer", "error", *TOKEN_COLUMNS]
    a, b = _read(tmp_path / "local").select(columns), _read(tmp_path / "ray").select(columns)
    assert a.height == 61 and a["id"].n_unique() == 61
    assert a.equals(b)
    assert b.filter(pl.col("status") == "error")["error"].to_list() == [a.filter(pl.col("status") == "error")["error"][0]]


@pytest.mark.parametrize("remote", ["inline", "pass"])
def test_remote_images_on_ray_are_fetched_by_the_tasks_or_inlined_once_the_provider_cannot(
        cluster: Cluster, faulty_sim: Callable[..., Any], image_host: ImageHost, tmp_path: Path, remote: str) -> None:
    sim = faulty_sim(download_urls=True)  # fetches image URLs as OpenAI does, 400 when it cannot
    urls = [f"{image_host.url}/{name}/{k}.jpg" for k in range(4) for name in ("ok", "hotlink", "nowhere")]
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": url} for url in urls]),
                       input={"keep_columns": ["image"], "remote": remote}, ray={"http_actors": 2, "block_rows": 4})
    assert _run(cfg, "--engine", "ray") == 1
    out = {row["image"]: row for row in _read(tmp_path / "out").iter_rows(named=True)}
    assert {url for url, row in out.items() if row["status"] == "ok"} == {u for u in urls if "/nowhere/" not in u}
    assert all(out[u]["error"] == f"image: {u}: HTTP 404 Not Found" for u in urls if "/nowhere/" in u)
    refused = sum(1 for e in sim.log if e.status == 400)
    assert refused == (0 if remote == "inline" else 8)  # passed as URLs: hotlink and nowhere refused there


# The two rate tests run before any driver is killed: Ray Data keeps a killed driver's share of
# the cluster's CPUs for RESERVATION_EXPIRES_S, and a run in that time prepares rows slower.
def test_every_actor_keeps_within_one_global_limit_of_a_one_second_window_and_reaches_it(
        cluster: Cluster, serve: Any, tmp_path: Path) -> None:
    rows, rpm = 600, 3000  # 50 requests in any second, counted in the simulator's own process
    sim = serve(latency_s=0.05, requests_per_minute=rpm)
    manifest = write_manifest(tmp_path, small_images(tmp_path, rows))
    config = write_config(tmp_path, sim.url, manifest, engine="ray",
                          ray={"http_actors": 4, "block_rows": 16, "address": cluster.address},
                          limits={"concurrency": 16, "requests_per_minute": rpm})
    finish(start_run(config))
    log = sim.requests()
    assert refusals(log) == 0
    times = let_through(log)
    # from 2 s in (Ray starts the actors, and their workers import, one after another) to 2 s
    # before the end, when the actors run out of blocks one by one
    assert rate(times, since=times[0] + 2, until=times[-1] - 2) >= 0.97 * rpm / 60, \
        f"let through each second: {per_second(times)}, at most {_most_at_once(log)} at once"
    answered_once(tmp_path, rows)


def test_the_actors_find_an_unstated_lower_limit_and_say_so(cluster: Cluster, serve: Any, tmp_path: Path) -> None:
    rows, rpm, real = 800, 3000, 1500  # the provider allows half and says nothing about it
    sim = serve(latency_s=0.05, requests_per_minute=real, state_limits=False)
    manifest = write_manifest(tmp_path, small_images(tmp_path, rows))
    config = write_config(tmp_path, sim.url, manifest, engine="ray",
                          ray={"http_actors": 2, "block_rows": 16, "address": cluster.address},
                          limits={"concurrency": 16, "requests_per_minute": rpm, "max_attempts": 8})
    said = finish(start_run(config))
    settles_at(sim.requests(), real)
    assert "pace: held at" in said
    answered_once(tmp_path, rows)


def test_a_run_from_a_bucket_to_a_bucket_on_ray_writes_what_the_local_engine_does(
        cluster: Cluster, sim: simulator.Simulator, s3: str, s3_server: S3Server, tmp_path: Path) -> None:
    """The tasks read the images from the bucket on every node; the driver writes the output there."""
    names = []
    for i in range(24):
        s3_server.put(f"{s3}/data/images/img{i:03d}.png", image_bytes((64, 48), (i * 9 % 256, 40, 200)))
        names.append(f"images/img{i:03d}.png")
    rows = pl.DataFrame({"image": [*names, "images/missing.png"]})
    s3_server.put(f"{s3}/data/manifest.parquet", parquet_bytes(rows))
    results = {}
    for engine in ("local", "ray"):
        cfg = write_config(tmp_path, sim.url, f"{s3}/data/manifest.parquet", output={"dir": f"{s3}/{engine}"},
                           ray={"http_actors": 2, "block_rows": 4})
        assert _run(cfg, "--engine", engine) == 1  # the missing image is an error row
        results[engine] = pl.read_parquet(f"{s3}/{engine}/*.parquet").sort("id").select(
            "id", "status", "error", *TOKEN_COLUMNS)
    assert results["local"].height == 25 and results["local"].equals(results["ray"])
    assert results["ray"].filter(pl.col("status") == "error")["error"].to_list() == [
        f"image: missing object {s3}/data/images/missing.png"]


def test_one_429_makes_only_its_request_wait_its_retry_after(cluster: Cluster, sim: simulator.Simulator,
                                                             tmp_path: Path, images: Callable[..., list[str]]) -> None:
    # one 429 while others are answered says the pace was too high, not that the provider is
    # closed: the pace is cut, only the refused request waits, the other actors go on
    sim.plan("img0030", [429], retry_after_s=2)
    manifest = write_manifest(tmp_path, named(images(300)))
    config = write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine="ray",
                          ray={"http_actors": 4, "block_rows": 8}, limits={"concurrency": 16})
    assert _run(config) == 0
    log = sim.requests()
    refused = next(entry for entry in log if entry.status == 429)
    retried = [entry for entry in log if entry.markers == refused.markers and entry is not refused]
    assert len(retried) == 1 and retried[0].time >= refused.answered_at + 2.0
    during = [entry for entry in log if refused.answered_at < entry.time < refused.answered_at + 1.9]
    assert len(during) > 10 or len(log) - log.index(refused) < 50  # not paused, unless the run was near its end
    assert len(log) == 301


def per_second(times: list[float]) -> list[int]:
    counts = [0] * (int(times[-1] - times[0]) + 1)
    for t in times:
        counts[int(t - times[0])] += 1
    return counts


def test_losing_a_worker_node_mid_run_leaves_every_id_once(cluster: Cluster, faulty_sim: Callable[..., Any],
                                                         tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(latency_s=0.05)
    manifest = write_manifest(tmp_path, named(images(600)))
    config = write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine="ray",
                          ray={"http_actors": 4, "block_rows": 8}, limits={"concurrency": 8})
    doomed = cluster.add_node(num_cpus=1)  # a fourth node, so the session keeps its three
    cluster.wait_for_nodes()
    codes: list[int] = []
    run = threading.Thread(target=lambda: codes.append(_run(config)))
    run.start()
    wait_for(lambda: len(sim.requests()) >= 150)
    cluster.remove_node(doomed, allow_graceful=False)
    run.join(timeout=300)
    assert codes == [0]
    all_once(tmp_path / "out", 600)  # whatever the lost node held (blocks, an actor, requests in flight)
    # until the cluster has seen the node die, it places tasks and actors of later runs there
    wait_for(lambda: not any(node["NodeID"] == doomed.node_id and node["Alive"] for node in ray.nodes()), 120)


@pytest.mark.parametrize("rerun_engine", ["local", "ray"])
def test_a_killed_driver_then_a_rerun_finishes_with_every_id_once(
        cluster: Cluster, faulty_sim: Callable[..., Any], tmp_path: Path, images: Callable[..., list[str]],
        rerun_engine: str) -> None:
    sim = faulty_sim(latency_s=0.02)
    manifest = write_manifest(tmp_path, named(images(500)))
    config = write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine="ray",
                          ray={"http_actors": 2, "block_rows": 8, "address": cluster.address},
                          limits={"concurrency": 8})
    driver = start_run(config)
    wait_for(lambda: answered(sim) >= 100 or driver.poll() is not None, AFTER_A_KILLED_DRIVER_S)
    assert driver.poll() is None, "the run ended before the kill"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed = time.monotonic()
    assert _run(config, "--engine", rerun_engine) == 0
    all_once(tmp_path / "out", 500)
    # answered but not journalled when the driver died, at most: the actors' blocks in flight
    # (2 actors x 2 blocks x 8 rows) and the blocks the driver had fetched (4 x 8)
    assert answered(sim) <= 500 + 2 * 2 * 8 + 4 * 8
    # the killed driver's dataset holds its share of the cluster's CPUs until this long after it
    # died; the concurrency test below fails on a cluster where that takes longer
    time.sleep(max(0.0, killed + RESERVATION_EXPIRES_S - time.monotonic()))


def test_two_endpoints_each_stay_under_their_own_limit(cluster: Cluster, serve: Any, tmp_path: Path,
                                                      images: Callable[..., list[str]]) -> None:
    cases.two_endpoints_each_stay_under_their_own_limit("ray", serve, tmp_path, images)


def test_the_budget_holds_over_the_whole_cluster(cluster: Cluster, sim: simulator.Simulator, tmp_path: Path,
                                                 images: Callable[..., list[str]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, [{"image": p} for p in images(40, size=(700, 500))])
    config = write_config(tmp_path, sim.url, manifest, engine="ray", ray={"http_actors": 4, "block_rows": 4},
                          limits={"concurrency": 8})
    capsys.readouterr()
    assert cli.main(["estimate", str(config), "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)["cost_usd"]["expected"] / 2
    assert _run(config, "--set", f"limits.max_cost_usd={budget}") == 3
    spent = _read(tmp_path / "out")["cost_usd"].sum()
    assert billed(sim) <= budget and spent == pytest.approx(billed(sim))
    assert spent > budget / 2


def _most_at_once(log: list[simulator.LogEntry]) -> int:
    events = sorted([(entry.time, 1) for entry in log] + [(entry.answered_at, -1) for entry in log])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def test_the_actors_share_out_the_concurrency_never_more(cluster: Cluster, faulty_sim: Callable[..., Any],
                                                         tmp_path: Path, images: Callable[..., list[str]]) -> None:
    # answers slow enough that the run outlasts the actors' start on a busy cold cluster (at
    # 0.1 s one clean CI run ended before a second actor was up: never two requests at once)
    sim = faulty_sim(latency_s=0.3)
    manifest = write_manifest(tmp_path, named(images(120)))
    config = write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine="ray",
                          ray={"http_actors": 4, "block_rows": 4}, limits={"concurrency": 6})
    assert _run(config) == 0
    log = sim.requests()
    assert 1 < _most_at_once(log) <= 6, f"{_most_at_once(log)} at once over {log[-1].answered_at - log[0].time:.1f} s"


def test_a_node_without_the_key_stops_the_run_with_error_rows_not_a_crash(
        cluster: Cluster, sim: simulator.Simulator, tmp_path: Path, images: Callable[..., list[str]],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ANNOTATE_DRIVER_ONLY_KEY", "sk-here-only")  # the nodes started without it
    manifest = write_manifest(tmp_path, named(images(40)))
    config = write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine="ray",
                          endpoint={"api_key_env": "ANNOTATE_DRIVER_ONLY_KEY"}, ray={"block_rows": 4})
    capsys.readouterr()
    assert _run(config) == 1
    err = capsys.readouterr().err
    assert "ANNOTATE_DRIVER_ONLY_KEY is unset or empty on node" in err and "Traceback" not in err
    assert sim.requests() == []
    out = _read(tmp_path / "out")
    assert set(out["status"]) == {"error"} and out.height >= 3


def test_a_signal_stops_every_actor_keeps_what_was_in_flight_and_a_rerun_asks_nothing_twice(
        cluster: Cluster, faulty_sim: Callable[..., Any], tmp_path: Path, images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(latency_s=0.2)
    manifest = write_manifest(tmp_path, named(images(300)))
    config = write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine="ray",
                          ray={"http_actors": 2, "block_rows": 4, "address": cluster.address},
                          limits={"concurrency": 8})
    driver = start_run(config)
    wait_for(lambda: answered(sim) >= 40 or driver.poll() is not None, AFTER_A_KILLED_DRIVER_S)
    signalled = time.monotonic()  # the simulator runs in this process: the same clock as its log
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err
    assert max(entry.time for entry in sim.requests()) < signalled + 1.0  # every actor stopped at once
    first = _read(tmp_path / "out")
    assert first.height == answered(sim) < 300  # what was in flight was journalled
    assert _run(config) == 0
    all_once(tmp_path / "out", 300)
    assert answered(sim) == 300  # nothing answered before the signal was asked again


def test_the_budget_held_by_an_actor_ray_restarted_counts_as_spent_and_frees_the_waiters() -> None:
    coordinator = Coordinator([LimitsConfig()], limit_usd=1.0, spent_usd=0.0)
    a1, a2, b1 = ("actor-a", "life-1"), ("actor-a", "life-2"), ("actor-b", "life-1")

    async def main() -> None:
        await coordinator.begin(a1)
        await coordinator.begin(b1)
        assert await coordinator.hold(a1, 0.3) and await coordinator.hold(b1, 0.5)
        late = asyncio.create_task(coordinator.hold(a1, 0.3))  # 0.8 held + 0.3 would pass 1.0: waits
        await asyncio.sleep(0.05)
        assert not late.done()
        await coordinator.begin(a2)  # Ray started actor-a again: its first life's 0.3 may have been paid
        await coordinator.release(b1, 0.5, 0.1)  # room now: 0.4 spent
        assert await asyncio.wait_for(late, timeout=5) is False  # that life is over: nothing is sent
        assert coordinator.budget.spent_usd == pytest.approx(0.4)
        assert coordinator.budget.in_flight == 0 and coordinator.budget.held_usd == pytest.approx(0.0)
        assert coordinator.holds == {}

    asyncio.run(main())


def test_the_budget_held_by_an_actor_that_never_came_back_is_spent_at_the_wave_end() -> None:
    coordinator = Coordinator([LimitsConfig()], limit_usd=1.0, spent_usd=0.0)
    lost = ("actor-a", "life-1")

    async def main() -> None:
        await coordinator.begin(lost)
        assert await coordinator.hold(lost, 0.7)
        waiting = asyncio.create_task(coordinator.hold(("actor-b", "life-1"), 0.5))
        await asyncio.sleep(0.05)
        await coordinator.end_wave()
        assert await asyncio.wait_for(waiting, timeout=5) is False  # 0.7 spent + 0.5 would pass 1.0
        assert coordinator.budget.exhausted

    asyncio.run(main())


def test_a_request_that_left_late_is_counted_in_the_cluster_window_from_when_it_left() -> None:
    # one request a second at most in any second: a request that left half a second after its
    # moment keeps the next one back until a second after it really left
    coordinator = Coordinator([LimitsConfig(requests_per_minute=60)], limit_usd=None, spent_usd=0.0)

    async def main() -> tuple[float, float, float]:
        first = await coordinator.pace(0, 0)
        assert first is not None
        _, granted, ticket = first
        await coordinator.sent(ticket, granted + 0.5)
        second = await coordinator.pace(0, 0)
        assert second is not None
        return granted, granted + 0.5, second[1]

    granted, left, next_granted = asyncio.run(main())
    assert next_granted >= left + 1.0 > granted + 1 / 0.98 + 0.4


def test_the_limit_the_provider_states_lowers_ours(cluster: Cluster, faulty_sim: Callable[..., Any], tmp_path: Path,
                                                   images: Callable[..., list[str]]) -> None:
    cases.the_limit_the_provider_states_lowers_ours("ray", faulty_sim, tmp_path, images)


def test_both_engines_write_the_same_labels(cluster: Cluster, tmp_path: Path) -> None:
    """The labelling demo, with its invalid and schema-breaking answers asked again, on each engine
    against its own bundled simulator (whose faults follow each request's content, not its order)."""
    demo = Path(__file__).parents[2] / "configs"
    runs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        assert cli.main(["run", str(demo / "demo-labels.yaml"), "-q", "-o", str(out), "--engine", engine,
                         "--set", f"input.manifest={demo / 'demo' / 'manifest.csv'}"]) == 0
        runs[engine] = _read(out).select("id", "status", "colour", "shapes", "photo", "answer", "attempts",
                                         *TOKEN_COLUMNS)
    assert runs["local"].height == 24
    assert runs["local"].equals(runs["ray"])
