"""Cases either engine must pass alike, as functions of the engine: the local tests
(test_both_engines.py, no Ray needed) and the Ray tests (test_ray.py, once the session's
cluster has run other work) call them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import cli

from ..conftest import KEY_ENV, NAMED, named, write_config, write_manifest
from ..runs import all_once, before_each_refusal, rate, refusals


def _run(config: Path) -> int:
    return cli.main(["run", str(config), "-q"])


def two_endpoints_each_stay_under_their_own_limit(engine: str, serve: Any, tmp_path: Path,
                                                  images: Callable[..., list[str]]) -> None:
    # each simulator in its own process, where no pause of the test process times arrivals as a burst
    slow, fast = serve(requests_per_minute=600), serve(requests_per_minute=1800)  # 10/s and 30/s
    manifest = write_manifest(tmp_path, named(images(240)))
    endpoints = [{"base_url": sim.url, "api_key_env": KEY_ENV, "requests_per_minute": rpm}
                 for sim, rpm in ((slow, 600), (fast, 1800))]
    config = write_config(tmp_path, slow.url, manifest, prompt=NAMED, endpoint=None, endpoints=endpoints,
                          engine=engine, ray={"http_actors": 4, "block_rows": 8}, limits={"concurrency": 8})
    assert _run(config) == 0
    all_once(tmp_path / "out", 240)
    for sim in (slow, fast):
        assert refusals(sim.requests()) == 0, before_each_refusal(sim.requests())
    assert rate(sorted([entry.time for entry in slow.requests()])) <= 10.5
    assert rate(sorted([entry.time for entry in fast.requests()])) <= 31.5
    shares = len(slow.requests()), len(fast.requests())
    assert sum(shares) == 240 and min(shares) >= 40
    if engine == "local":  # fast enough to keep both at their limits: rows go about 1 to 3
        assert 2 <= shares[1] / shares[0] <= 4.5


def the_limit_the_provider_states_lowers_ours(engine: str, faulty_sim: Callable[..., Any], tmp_path: Path,
                                              images: Callable[..., list[str]]) -> None:
    sim = faulty_sim(requests_per_minute=600)  # 10/s, stated in every answer's x-ratelimit-limit-requests
    manifest = write_manifest(tmp_path, named(images(80)))
    config = write_config(tmp_path, sim.url, manifest, prompt=NAMED, engine=engine,
                          ray={"http_actors": 4, "block_rows": 4},
                          limits={"requests_per_minute": 2400, "concurrency": 8})  # a config that says 40/s
    assert _run(config) == 0
    log = sim.requests()
    assert sum(entry.status == 429 for entry in log) <= 2
    assert rate(sorted([entry.time for entry in log])) <= 10.5
