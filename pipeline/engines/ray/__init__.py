"""The Ray engine (the `ray` extra): `stages` (Ray Data preparation, the HTTP actors, the waves)
and `coordinator` (the cluster's limits and budget). The only package that imports ray.
"""

import ray  # noqa: F401 - first, so that a missing Ray is an ImportError here, however much is cached

from .stages import run

__all__ = ["run"]
