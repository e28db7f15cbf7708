"""P8, image preparation on Ray: the Ray engine's preparation stage with 1, 2 and 4 tasks at once.

The stage as `engine: ray` runs it (`pipeline.engines.ray.stages._prepare` in Ray Data tasks, one
block of 4 photos, each block first asking the run's coordinator actor whether the run is
stopping) on 12-megapixel JPEGs downscaled to 1024 px, on a one-machine Ray that offers
4 CPUs whatever the machine has, so 4 tasks can run at once. Each setting runs once to warm up
the workers, then is timed from the dataset's start to its last block. The same photos through
`payload.prepare` in a plain loop in this process are the one-core reference.

Run it standalone with `.venv/bin/python tests/benchmarks/ray_prep.py [--smoke]`.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import image_stage
import pyarrow as pa
from common import HOST, Figure, standalone
from image_stage import MAX_SIDE, photos

from pipeline import config, payload
from pipeline.manifest import ManifestRow

BLOCK_ROWS = 4  # photos per block (and per task)
RAY_CPUS = 4


@dataclass(frozen=True)
class Scale:
    photos: int
    size: tuple[int, int]  # of each photo, in pixels
    workers: tuple[int, ...]  # tasks at once, one setting each, fewest first


FULL = Scale(48, image_stage.FULL.size, (1, 2, 4))
SMOKE = Scale(BLOCK_ROWS, image_stage.SMOKE.size, (1,))  # one block, one setting: Ray's start-up is most of it


@dataclass
class Measured:
    scale: Scale
    rates: dict[str, tuple[float, float]]  # "in-process" or "ray-{workers}": images/s, how busy the cores were


def _config(folder: Path) -> config.RunConfig:
    return config.parse({"input": {"manifest": str(folder)}, "request": {"model": "gpt-4o"},
                         "prompt": {"max_side": MAX_SIDE}})


def _rows(paths: list[Path]) -> list[ManifestRow]:
    return [ManifestRow(id=str(i), images=(path.name,), prompt="Describe this image.", keep={})
            for i, path in enumerate(paths)]


def _cpu_ticks() -> tuple[int, int]:
    """Busy and total ticks of all this machine's cores so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _timed(work: Callable[[], int]) -> tuple[float, float]:
    """Items per second of `work`, and how busy the machine's cores were meanwhile (0..1)."""
    busy, total = _cpu_ticks()
    started = time.perf_counter()
    items = work()
    rate = items / (time.perf_counter() - started)
    busy_after, total_after = _cpu_ticks()
    return rate, (busy_after - busy) / max(1, total_after - total)


def in_process(cfg: config.RunConfig, rows: list[ManifestRow], root: Path) -> tuple[float, float]:
    def work() -> int:
        for row in rows:
            payload.prepare(row, root, cfg.request, cfg.prompt)
        return len(rows)

    return _timed(work)


def start_coordinator(cfg: config.RunConfig) -> Any:
    """The run's coordinator actor, started as `engine: ray` starts it (no budget)."""
    from pipeline.engines.ray.coordinator import CoordinatorActor

    limits = [target.limits(cfg.limits) for target in cfg.targets]
    return CoordinatorActor.options(num_cpus=0, max_concurrency=10_000).remote(limits, None, 0.0)


def on_ray(cfg: config.RunConfig, rows: list[ManifestRow], root: Path, workers: int,
           coordinator: Any) -> tuple[float, float]:
    import ray

    from pipeline.engines.ray.stages import _prepare

    blocks = [pa.table({"row": pa.array([pickle.dumps(row) for row in rows[i:i + BLOCK_ROWS]], pa.binary())})
              for i in range(0, len(rows), BLOCK_ROWS)]

    def once() -> int:
        dataset = ray.data.from_arrow(blocks).map_batches(
            functools.partial(_prepare, cfg, root, coordinator), batch_format="pyarrow", batch_size=None, num_cpus=1,
            concurrency=workers)
        prepared: int = sum(cast(pa.Table, batch).num_rows
                            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        assert prepared == len(rows)
        return prepared

    once()  # workers started and imports done
    return _timed(once)


def measure(work: Path, scale: Scale = FULL) -> Measured:
    import ray

    paths = photos(work / "p8-photos", scale.photos, scale.size)
    cfg, rows = _config(work), _rows(paths)
    rates = {"in-process": in_process(cfg, rows, paths[0].parent)}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a Ray of its own, never a cluster already running here, whose CPUs could not be set;
    # its processes talk to each other on 127.0.0.1
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, _node_ip_address=HOST)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        coordinator = start_coordinator(cfg)
        for workers in scale.workers:
            rates[f"ray-{workers}"] = on_ray(cfg, rows, paths[0].parent, workers, coordinator)
    finally:
        ray.shutdown()
    return Measured(scale, rates)


def to_figures(measured: Measured) -> list[Figure]:
    scale, rates = measured.scale, measured.rates
    one = rates["ray-1"][0]
    alone, alone_busy = rates["in-process"]
    setting = f"{scale.photos} JPEG {scale.size[0]}x{scale.size[1]} -> max_side {MAX_SIDE}, {BLOCK_ROWS} a block"
    figures = []
    for workers in scale.workers:
        rate, busy = rates[f"ray-{workers}"]
        figures.append(Figure(
            f"P8 image preparation on Ray, {workers} task{'s' if workers > 1 else ''}",
            "scales with tasks up to the machine's cores",
            f"{rate:.1f} images/s, cores {busy:.0%} busy ({setting})",
            f"{alone:.1f} images/s in one process, one thread (cores {alone_busy:.0%} busy)",
            f"{rate / one:.2f}× one task"))
    if len(scale.workers) > 1:
        fewer, most = scale.workers[-2:]
        (most_rate, most_busy), fewer_rate = rates[f"ray-{most}"], rates[f"ray-{fewer}"][0]
        figures.append(Figure(
            "P8: what limits it", "-",
            f"this machine's {os.cpu_count()} cores: {most} tasks kept them {most_busy:.0%} busy, for "
            f"{most_rate / fewer_rate:.2f}× {fewer} tasks. Each task also waits on Ray (scheduling, the object "
            f"store, the driver reading results), so {fewer} tasks leave the cores idle part of the time; each "
            "added node adds its own cores"))
    return figures


if __name__ == "__main__":
    sys.exit(standalone(measure, to_figures, lambda measured: [], FULL, SMOKE))
