"""P8, image preparation on Ray: the Ray engine's preparation stage with 1, 2 and 4 tasks at once.

The stage as `engine: ray` runs it (`pipeline.ray_engine._prepare` in Ray Data tasks, one
block per photo) on 12-megapixel JPEGs downscaled to 1024 px, on a one-machine Ray that offers
4 CPUs whatever the machine has, so 4 tasks can run at once. Each setting runs once to warm up
the workers, then is timed from the dataset's start to its last block. The same photos through
`payload.prepare` in a plain loop in this process are the one-core reference.

Run it standalone with `.venv/bin/python tests/benchmarks/ray_prep.py`.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import time
from pathlib import Path

import pyarrow as pa

from common import Figure, standalone
from image_stage import MAX_SIDE, PHOTO_SIZE, photos
from pipeline import config, payload
from pipeline.manifest import ManifestRow

PHOTO_COUNT = 24
WORKERS = (1, 2, 4)
RAY_CPUS = 4


def _config(folder: Path) -> config.RunConfig:
    return config.parse({"input": {"manifest": str(folder)}, "request": {"model": "gpt-4o"},
                         "prompt": {"max_side": MAX_SIDE}})


def _rows(paths: list[Path]) -> list[ManifestRow]:
    return [ManifestRow(id=str(i), images=(path.name,), prompt="Describe this image.", keep={})
            for i, path in enumerate(paths)]


def in_process(cfg: config.RunConfig, rows: list[ManifestRow], root: Path) -> float:
    started = time.perf_counter()
    for row in rows:
        payload.prepare(row, root, cfg.request, cfg.prompt)
    return len(rows) / (time.perf_counter() - started)


def on_ray(cfg: config.RunConfig, rows: list[ManifestRow], root: Path, workers: int) -> float:
    import ray

    from pipeline.ray_engine import _prepare

    blocks = [pa.table({"row": pa.array([pickle.dumps(row)], pa.binary())}) for row in rows]

    def once() -> float:
        started = time.perf_counter()
        dataset = ray.data.from_arrow(blocks).map_batches(
            functools.partial(_prepare, cfg, root), batch_format="pyarrow", batch_size=None, num_cpus=1,
            concurrency=workers)
        prepared = sum(batch.num_rows for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        assert prepared == len(rows)
        return len(rows) / (time.perf_counter() - started)

    once()  # workers started and imports done
    return once()


def measure(work: Path) -> dict[str, float]:
    import ray

    paths = photos(work / "p8-photos", PHOTO_COUNT)
    cfg, rows = _config(work), _rows(paths)
    rates = {"in-process": in_process(cfg, rows, paths[0].parent)}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for workers in WORKERS:
            rates[f"ray-{workers}"] = on_ray(cfg, rows, paths[0].parent, workers)
    finally:
        ray.shutdown()
    return rates


def to_figures(rates: dict[str, float]) -> list[Figure]:
    one = rates["ray-1"]
    setting = f"{PHOTO_COUNT} JPEG {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} -> max_side {MAX_SIDE}"
    cores = os.cpu_count() or 1
    figures = [Figure(f"P8 image preparation on Ray, {workers} task{'s' if workers > 1 else ''}",
                      "scales with tasks up to the machine's cores",
                      f"{rates[f'ray-{workers}']:.1f} images/s ({setting})",
                      f"{rates['in-process']:.1f} images/s in one process, one thread",
                      f"{rates[f'ray-{workers}'] / one:.2f}× one task")
               for workers in WORKERS]
    figures.append(Figure(
        "P8: what limits it", "-", f"this machine has {cores} cores: tasks beyond {cores} share them, so "
        f"4 tasks run at {rates['ray-4'] / rates['ray-2']:.2f}× 2 tasks; each added node adds its own cores"))
    return figures


if __name__ == "__main__":
    sys.exit(standalone(measure, to_figures, lambda rates: []))
