"""P10 the viewer at scale: `annotate view` over an output directory of 1,000,000 rows (200
parts of 5,000), beside a notebook's way of looking at it (Polars reading every part, then
sorting and slicing).

Setup (not timed): 100 small PNGs; a Parquet manifest of 1,000,000 rows showing them in turn;
the output directory written directly (every output column, captions of about 100 characters,
costs, latencies and tokens drawn at random, 1% error rows, 2% flagged short) with its
_run.json.

Measured: `annotate view DIR` as a subprocess (its peak RSS and CPU from the launcher); from
here, the wall time of each request a person's first steps make: the summary (cold, then
cached), the first page, the last page, the first page sorted by cost, a text filter, a flag
filter, and one page's 48 thumbnails (made, then cached). Checked: each page holds the rows
Polars finds for the same query. The baseline is a script reading the whole directory with
`pl.read_parquet` and printing its 48 costliest rows, from spawn to exit.

Run it with `.venv/bin/python tests/benchmarks/view_1m.py` (`--smoke`: 5,000 rows).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
from common import ANNOTATE, Figure, Finished, run_to_exit, standalone
from PIL import Image

from pipeline.config import RunConfig
from pipeline.store.columns import COLUMNS

PART_ROWS = 5_000
IMAGES = 100
TARGET = "summary and first page of 1,000,000 rows in seconds (< 5 s)"


@dataclass(frozen=True)
class Scale:
    rows: int


FULL = Scale(1_000_000)
SMOKE = Scale(5_000)


@dataclass
class Measured:
    rows: int
    viewer: Finished | None = None
    timings: dict[str, float] = field(default_factory=dict)
    baseline: Finished | None = None
    problems: list[str] = field(default_factory=list)


def write_output(work: Path, rows: int) -> tuple[Path, pl.DataFrame]:
    images = work / "images"
    images.mkdir(parents=True)
    for k in range(IMAGES):
        Image.new("RGB", (640, 480), (k * 2 % 256, 120, 255 - k * 2 % 256)).save(images / f"{k}.png")
    ids = [f"row{n:07d}" for n in range(rows)]
    manifest = work / "manifest.parquet"
    pl.DataFrame({"id": ids, "image": [f"images/{n % IMAGES}.png" for n in range(rows)]}).write_parquet(manifest)
    draw = random.Random(10)
    frame = pl.DataFrame({
        "id": ids,
        "status": ["error" if n % 100 == 7 else "ok" for n in range(rows)],
        "answer": [f"A photograph of item {n}: a small object on a plain background, lit from the left." for n in
                   range(rows)],
        "cost_usd": [draw.uniform(0.0001, 0.01) for _ in range(rows)],
        "latency_ms": [draw.uniform(200, 4000) for _ in range(rows)],
        "total_tokens": [draw.randint(300, 3000) for _ in range(rows)],
        "flags": [["short"] if n % 50 == 3 else [] for n in range(rows)],
        "error": ["request: HTTP 400" if n % 100 == 7 else None for n in range(rows)],
        "images": [1] * rows,
        "finished_at": [datetime(2026, 12, 1, tzinfo=timezone.utc)] * rows,
    })
    full = pl.DataFrame(COLUMNS.empty_table()).clear(rows).with_columns(frame)
    out = work / "out"
    out.mkdir()
    for k in range(0, rows, PART_ROWS):
        full.slice(k, PART_ROWS).write_parquet(out / f"part-20261201T000000Z-bench-{k // PART_ROWS:05d}.parquet")
    config = RunConfig.model_validate({"input": {"manifest": str(manifest), "id_column": "id"},
                                       "request": {"model": "gpt-4o"}, "output": {"dir": str(out)}})
    (out / "_run.json").write_text(json.dumps({"manifest": {"path": str(manifest), "rows": rows},
                                               "config": config.model_dump(mode="json"), "runs": []}))
    return out, frame


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as response:
        body = response.read()
    return time.perf_counter() - started, body


def _browse(base: str, frame: pl.DataFrame, measured: Measured) -> None:
    """A person's first steps, timed; each page checked against Polars."""
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(base)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    t = measured.timings
    t["summary, cold"], _ = _get(base + "api/summary")
    t["summary, cached"], _ = _get(base + "api/summary")
    steps = {
        "first page": ("api/rows", frame.head(48)),
        "last page": (f"api/rows?offset={(len(frame) - 1) // 48 * 48}", frame.tail(len(frame) - (len(frame) - 1) // 48 * 48)),
        "sorted by cost": ("api/rows?sort=-cost", frame.sort("cost_usd", descending=True).head(48)),
        "text filter": ("api/rows?text=ITEM%20123", frame.filter(pl.col("answer").str.contains("item 123")).head(48)),
        "flag filter": ("api/rows?flag=short&offset=48",
                        frame.filter(pl.col("flags").list.contains("short")).slice(48, 48)),
    }
    for name, (path, want) in steps.items():
        t[name], body = _get(base + path)
        got = [row["id"] for row in json.loads(body)["rows"]]
        if got != want["id"].to_list():
            measured.problems.append(f"{name}: the page is not the rows Polars finds")
    page = json.loads(_get(base + "api/rows")[1])["rows"]
    for name in ("48 thumbnails, made", "48 thumbnails, cached"):
        started = time.perf_counter()
        for row in page:
            _get(base + "thumb/" + row["id"])
        t[name] = time.perf_counter() - started


def measure(work: Path, scale: Scale = FULL) -> Measured:
    out, frame = write_output(work, scale.rows)
    measured = Measured(scale.rows)
    port = _free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}

    def browse_then_stop(pid: int) -> None:
        def run() -> None:
            try:
                _browse(f"http://127.0.0.1:{port}/", frame, measured)
            except Exception as exc:  # reported, and the viewer still stopped
                measured.problems.append(f"browsing failed: {exc!r}")
            finally:
                os.kill(pid, signal.SIGINT)
        threading.Thread(target=run, daemon=True).start()

    measured.viewer = run_to_exit([ANNOTATE, "view", str(out), "--port", str(port)], work / "view.log", env=env,
                                  timeout_s=900, started=browse_then_stop)
    notebook = (f"import polars as pl; f = pl.read_parquet({str(out / '*.parquet')!r}); "
                "print(f.sort('cost_usd', descending=True).head(48).select('id', 'cost_usd'))")
    measured.baseline = run_to_exit([sys.executable, "-c", notebook], work / "notebook.log", env=env, timeout_s=900)
    return measured


def to_figures(m: Measured) -> list[Figure]:
    if m.viewer is None or m.baseline is None or not m.timings:
        return [Figure("P10 viewer at scale", TARGET, "not measured", note="; ".join(m.problems))]
    t = m.timings
    opened = t["summary, cold"] + t["first page"]
    pages = ", ".join(f"{name} {t[name]:.2f} s" for name in ("last page", "sorted by cost", "text filter", "flag filter"))
    return [
        Figure("P10 viewer at scale", TARGET,
               f"{m.rows:,} rows: summary {t['summary, cold']:.2f} s (cached {t['summary, cached']:.3f} s) + first "
               f"page {t['first page']:.2f} s = {opened:.2f} s; viewer peak RSS {m.viewer.peak_rss_mb:.0f} MB",
               f"read it all with Polars, then sort: {m.baseline.wall_s:.2f} s, {m.baseline.peak_rss_mb:.0f} MB",
               f"{opened / m.baseline.wall_s:.2f}× its time (then each page in well under a second), "
               f"{m.baseline.peak_rss_mb / m.viewer.peak_rss_mb:.1f}× less memory",
               met=opened < 5 and not m.problems, note="; ".join(m.problems)),
        Figure("P10 pages and thumbnails", "-", f"{pages}; 48 thumbnails {t['48 thumbnails, made']:.2f} s made, "
               f"{t['48 thumbnails, cached']:.2f} s cached"),
    ]


def figures(work: Path, scale: Scale = FULL) -> list[Figure]:
    return to_figures(measure(work, scale))


def main() -> int:
    return standalone(measure, to_figures, lambda measured: measured.problems, FULL, SMOKE)


if __name__ == "__main__":
    sys.exit(main())
