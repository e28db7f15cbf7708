"""The session's local Ray cluster of 3 nodes (1 CPU each), for the tests of either engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from ..conftest import KEY, KEY_ENV
from ..s3_server import S3Server


@pytest.fixture(scope="session")
def cluster(s3_server: S3Server) -> Iterator[Any]:
    """Nodes read the API key and the bucket's settings from their own environment, so they are
    set before the nodes start."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    saved = dict(os.environ)
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", KEY_ENV: KEY, **s3_server.env})
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
