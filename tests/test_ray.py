"""engine: ray, on one local cluster of 3 nodes (1 CPU each) shared by the session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import cli, simulator

from .conftest import KEY, KEY_ENV, NAMED, named, write_config, write_manifest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.ray

TOKEN_COLUMNS = ["prompt_tokens", "completion_tokens", "total_tokens"]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Nodes read the API key from their own environment, so it is set before they start."""
    saved = dict(os.environ)
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", KEY_ENV: KEY})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _run(config: Path, *args: str) -> int:
    return cli.main(["run", str(config), "-q", *args])


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
                          engine="ray", ray={"http_actors": 2, "block_rows": 8})
    assert _run(on_ray) == 1
    columns = ["id", "status", "answer", "error", *TOKEN_COLUMNS]
    a, b = _read(tmp_path / "local").select(columns), _read(tmp_path / "ray").select(columns)
    assert a.height == 61 and a["id"].n_unique() == 61
    assert a.equals(b)
    assert b.filter(pl.col("status") == "error")["error"].to_list() == [a.filter(pl.col("status") == "error")["error"][0]]
