"""P9 data in a bucket: `annotate run` over 5,000 small images read from an S3 API server on
127.0.0.1 (moto's), beside the same images on local disk.

Setup (not timed): 5,000 distinct 64x48 PNGs and a CSV manifest naming them relatively, written
to a local folder and uploaded to a bucket of moto's server (a process of its own).

Measured, each as `annotate run CONFIG -q` in a subprocess against the simulator (a thread of
this process, latency 0, concurrency 64, as P1): the manifest and images on local disk; the
manifest and images in the bucket, output local; all three in the bucket (parts and _run.json
uploaded, the lease held). Rows/s is rows over the wall time from spawn to exit; the moto
server's CPU over each run is reported beside it: moto is a Python server, and on a 2-core box
it, not the client, sets the pace of reads (a real S3 serves a prefix 5,500 GETs/s). Checked:
every row written once and ok.

Run it with `.venv/bin/python tests/benchmarks/buckets.py` (`--smoke`: 100 images).
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml
from common import ANNOTATE, KEY_ENV, Figure, Finished, child_env, run_to_exit, standalone
from PIL import Image
from s3_process import S3Server

from pipeline import simulator
from pipeline.config import SimulatorSettings

MODEL = "gpt-4o"
CONCURRENCY = 64


@dataclass(frozen=True)
class Scale:
    images: int


FULL = Scale(5_000)
SMOKE = Scale(100)


@dataclass
class Run:
    name: str
    finished: Finished
    rows: int
    ok: int
    moto_cpu_s: float

    @property
    def rate(self) -> float:
        return self.rows / self.finished.wall_s if self.finished.wall_s else 0.0


@dataclass
class Measured:
    scale: Scale
    runs: list[Run]
    problems: list[str]


def write_images(folder: Path, n: int) -> Path:
    """n distinct one-colour PNGs under folder/images and folder/manifest.csv naming them."""
    (folder / "images").mkdir(parents=True)
    names = []
    for i in range(n):
        name = f"images/img{i:05d}.png"
        Image.new("RGB", (64, 48), (i & 0xFF, (i >> 8) * 20 % 256, 128)).save(folder / name)
        names.append(name)
    pl.DataFrame({"image": names}).write_csv(folder / "manifest.csv")
    return folder / "manifest.csv"


def upload(server: S3Server, folder: Path, bucket: str) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: server.put(f"s3://{bucket}/{p.relative_to(folder)}", p.read_bytes()), files))


def run(server: S3Server, sim: simulator.Simulator, work: Path, name: str, manifest: str, out: str) -> Run:
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"manifest": manifest},
        "endpoint": {"base_url": sim.url, "api_key_env": KEY_ENV},
        "request": {"model": MODEL, "max_tokens": 50},
        "limits": {"concurrency": CONCURRENCY},
        "output": {"dir": out},
    }), encoding="utf-8")
    env = {**child_env(), **server.env, "XDG_CACHE_HOME": str(work / "cache")}
    moto = server.cpu_s()
    finished = run_to_exit([ANNOTATE, "run", str(config), "-q"], work / f"{name}.log", env=env)
    moto = server.cpu_s() - moto
    saved = dict(os.environ)
    os.environ.update(server.env)  # Polars reads the bucket with the environment a user sets
    try:
        frame = pl.read_parquet(f"{out}/*.parquet")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Run(name, finished, frame.height, frame.filter(pl.col("status") == "ok").height, moto)


def measure(work: Path, scale: Scale = FULL) -> Measured:
    server = S3Server()
    try:
        manifest = write_images(work / "data", scale.images)
        bucket = server.new_bucket()
        upload(server, work / "data", bucket)
        with simulator.running(SimulatorSettings()) as sim:
            runs = [run(server, sim, work, "local disk", str(manifest), str(work / "out-local")),
                    run(server, sim, work, "bucket in", f"s3://{bucket}/manifest.csv", str(work / "out-bucket-in")),
                    run(server, sim, work, "bucket in and out", f"s3://{bucket}/manifest.csv", f"s3://{bucket}/out")]
    finally:
        server.stop()
    problems = [f"{r.name}: {r.rows} rows, {r.ok} ok of {scale.images}: {r.finished.output[-300:]}"
                for r in runs if r.rows != scale.images or r.ok != scale.images]
    return Measured(scale, runs, problems)


def to_figures(m: Measured) -> list[Figure]:
    local = m.runs[0]

    def described(r: Run) -> str:
        moto = f"; moto's server used {r.moto_cpu_s:.1f} s CPU ({r.moto_cpu_s / r.finished.wall_s:.2f} of a core)"
        return (f"{r.rate:.0f} rows/s ({r.rows:,} rows in {r.finished.wall_s:.1f} s, client CPU "
                f"{r.finished.cpu_s:.1f} s, peak {r.finished.peak_rss_mb:.0f} MB"
                + (moto if r is not local else "") + ")")

    setting = f"{m.scale.images:,} 64x48 PNGs, latency 0, C={CONCURRENCY}"
    figures = [Figure("P9 data in a bucket: local disk", f"the baseline ({setting})", described(local))]
    for r in m.runs[1:]:
        figures.append(Figure(f"P9 … {r.name} (S3 API on 127.0.0.1)", f"rows/s beside local disk ({setting})",
                              described(r), baseline=f"{local.rate:.0f} rows/s",
                              ratio=f"{r.rate / local.rate:.2f}×" if local.rate else "-",
                              note="; ".join(m.problems)))
    return figures


def figures(work: Path, scale: Scale = FULL) -> list[Figure]:
    return to_figures(measure(work / "buckets", scale))


def main() -> int:
    return standalone(measure, to_figures, lambda measured: measured.problems, FULL, SMOKE)


if __name__ == "__main__":
    sys.exit(main())
