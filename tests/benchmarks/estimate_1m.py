"""P7 estimate at scale: `annotate estimate --json` on a 1,000,000-row manifest whose rows
share 10,000 image files. Everything is local; nothing is sent.

Setup (not timed, a few seconds): 10,000 image files of 8 shapes, from 64x48 to 2048x1536,
PNG and JPEG (each shape encoded once, its bytes written under 1,250 names); a CSV manifest
of 1,000,000 rows, row i showing file (i * 7919) mod 10,000 (so the rows sharing a file are
spread through the manifest) and asking "Describe item {i}." (so no two rows are the same
question, and all 1,000,000 are counted); a config with detail auto, max_side 1024, gpt-4o.

Measured: `annotate estimate CONFIG --json` as a subprocess, wall seconds from spawn to exit
and the child's peak RSS (os.wait4 in a bare launcher: see common.LAUNCHER), three
times. Checked: exit 0 and the JSON's rows, images and tokens against figures computed here
from the shapes and prompt lengths (the same token rules, applied per shape and per length).
The timings are figures to report, not assertions.

Run it with `.venv/bin/python tests/benchmarks/estimate_1m.py` (`--smoke`: 2,000 rows sharing
100 files, run once, to check that it runs to its end). The file name does not start with
test_, so pytest does not collect it.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from common import ANNOTATE, HOST, KEY_ENV, Figure, Finished, run_to_exit, standalone
from PIL import Image

from pipeline.cost.tokens import Detail, input_tokens

STEP = 7919  # prime, so row i -> file (i * STEP) % files visits every file before repeating
SHAPES = ((64, 48, "PNG"), (300, 200, "JPEG"), (640, 480, "PNG"), (800, 600, "JPEG"),
          (1280, 720, "JPEG"), (1600, 900, "PNG"), (900, 1600, "JPEG"), (2048, 1536, "PNG"))
MAX_SIDE = 1024
MODEL = "gpt-4o"
DETAIL: Detail = "auto"
PROMPT = "Describe {item}."
MAX_TOKENS = 50
TARGET_S = 60.0
TARGET_MB = 500.0
TARGET = "< 60 s and ≤ 500 MB for 1M rows sharing 10k files"


@dataclass(frozen=True)
class Scale:
    rows: int
    files: int  # image files the rows share
    repeats: int  # runs of the estimate


FULL = Scale(1_000_000, 10_000, 3)
SMOKE = Scale(2_000, 100, 1)


def write_images(folder: Path, files: int) -> list[str]:
    """`files` image files cycling through SHAPES; their names relative to `folder`'s parent."""
    folder.mkdir(parents=True)
    encoded = []
    for w, h, fmt in SHAPES:
        buffer = io.BytesIO()
        Image.new("RGB", (w, h), (w % 256, h % 256, 99)).save(buffer, fmt)
        encoded.append((buffer.getvalue(), "png" if fmt == "PNG" else "jpg"))
    names = []
    for i in range(files):
        data, suffix = encoded[i % len(SHAPES)]
        name = f"img{i:05d}.{suffix}"
        (folder / name).write_bytes(data)
        names.append(f"{folder.name}/{name}")
    return names


def write_manifest(path: Path, names: list[str], rows: int) -> Path:
    i = pl.int_range(rows, dtype=pl.Int64, eager=True)
    frame = pl.DataFrame({"image": pl.Series(names).gather(i * STEP % len(names)), "item": "item " + i.cast(pl.String)})
    frame.write_csv(path)
    return path


def write_config(path: Path, manifest: Path, out: Path) -> Path:
    data = {
        "input": {"manifest": str(manifest)},
        "prompt": {"user": PROMPT, "detail": DETAIL, "max_side": MAX_SIDE},
        "endpoint": {"base_url": f"http://{HOST}:9/v1", "api_key_env": KEY_ENV},
        "request": {"model": MODEL, "max_tokens": MAX_TOKENS},
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def expected(scale: Scale) -> dict[str, int]:
    """What the estimate must say, worked out per shape and per prompt length."""
    rows = scale.rows

    def fitted(w: int, h: int) -> tuple[int, int]:
        scale = min(1.0, MAX_SIDE / max(w, h))
        return max(1, round(w * scale)), max(1, round(h * scale))

    rows_per_file = pl.select(f=(pl.int_range(rows, dtype=pl.Int64) * STEP) % scale.files)["f"].value_counts()
    per_shape = rows_per_file.group_by(shape=pl.col("f") % len(SHAPES)).agg(pl.col("count").sum())
    image = sum(count * input_tokens(MODEL, [], [fitted(*SHAPES[shape][:2])], DETAIL)
                for shape, count in per_shape.iter_rows())
    lengths = pl.select(n=pl.format(PROMPT.replace("{item}", "item {}"), pl.int_range(rows)).str.len_chars())
    text = sum(count * input_tokens(MODEL, ["x" * n], [], DETAIL)
               for n, count in lengths["n"].value_counts().iter_rows())
    return {"rows": rows, "images": rows, "unreadable_rows": 0, "image": image, "text": text}


@dataclass
class Setup:
    scale: Scale
    config: Path
    want: dict[str, int]
    seconds: float
    manifest_mb: float
    images_mb: float


def prepare(work: Path, scale: Scale) -> Setup:
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    names = write_images(work / "images", scale.files)
    manifest = write_manifest(work / "manifest.csv", names, scale.rows)
    config = write_config(work / "estimate.yaml", manifest, work / "out")
    images_mb = sum(p.stat().st_size for p in (work / "images").iterdir()) / 1e6
    return Setup(scale, config, expected(scale), time.perf_counter() - started, manifest.stat().st_size / 1e6,
                 images_mb)


def check(run: Finished, want: dict[str, int]) -> str | None:
    """None when the run exited 0 and printed the expected figures; else what is wrong."""
    if run.returncode != 0:
        return f"exit {run.returncode}: {run.output[-300:]!r}"
    try:
        got: dict[str, Any] = json.loads(run.output)
        seen = {"rows": got["rows"], "images": got["images"], "unreadable_rows": got["unreadable_rows"],
                "image": got["input_tokens"]["image"], "text": got["input_tokens"]["text"]}
    except (ValueError, KeyError, TypeError):
        return f"not the estimate's JSON: {run.output[-300:]!r}"
    return None if seen == want else f"expected {want}, got {seen}"


@dataclass
class Measured:
    setup: Setup
    runs: list[Finished]
    problems: list[str]

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def peak_mb(self) -> float:
        return max(r.peak_rss_mb for r in self.runs)


def measure(work: Path, scale: Scale = FULL) -> Measured:
    setup = prepare(work, scale)
    runs = [run_to_exit([ANNOTATE, "estimate", str(setup.config), "--json"], work / f"estimate-{i}.log")
            for i in range(scale.repeats)]
    problems = [problem for run in runs if (problem := check(run, setup.want))]
    return Measured(setup, runs, problems)


def to_figures(m: Measured) -> list[Figure]:
    walls = ", ".join(f"{r.wall_s:.1f}" for r in m.runs)
    peaks = ", ".join(f"{r.peak_rss_mb:.0f}" for r in m.runs)
    ours = (f"{m.wall_s:.1f} s, {m.peak_mb:.0f} MB peak (median wall, spawn to exit, of {len(m.runs)}: {walls} s; "
            f"peak RSS from wait4: {peaks} MB)")
    met = not m.problems and m.wall_s < TARGET_S and m.peak_mb <= TARGET_MB
    notes = []
    if m.problems:
        notes.append(f"check FAILED: {m.problems[0]}")
    if m.wall_s >= TARGET_S:
        notes.append(f"median {m.wall_s:.1f} s is not under {TARGET_S:.0f} s")
    if m.peak_mb > TARGET_MB:
        notes.append(f"peak {m.peak_mb:.0f} MB is over {TARGET_MB:.0f} MB")
    s = m.setup
    return [
        Figure("P7 estimate at scale", TARGET, ours, met=met, note="; ".join(notes)),
        Figure("P7 setup (not timed)",
               f"{s.scale.rows:,}-row CSV ({s.manifest_mb:.0f} MB), {s.scale.files:,} files of {len(SHAPES)} shapes "
               f"({s.images_mb:.0f} MB), `annotate estimate CONFIG --json`",
               f"{s.seconds:.1f} s; the JSON checked: {s.scale.rows:,} rows and images, image and text tokens "
               f"as worked out per shape and prompt length" + ("" if not m.problems else " (FAILED)")),
    ]


def figures(work: Path, scale: Scale = FULL) -> list[Figure]:
    return to_figures(measure(work / "estimate_1m", scale))


def main() -> int:
    return standalone(measure, to_figures, lambda measured: measured.problems, FULL, SMOKE)


if __name__ == "__main__":
    sys.exit(main())
