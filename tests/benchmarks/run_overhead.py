"""How much the pipeline itself costs, measured in one run and printed as one Markdown table.

Three figures, all against 127.0.0.1 only:

1. Throughput at zero latency: `annotate run` (a subprocess) against `annotate simulate
   --latency-s 0` (another subprocess) on N small PNGs. Rows/s, and CPU seconds per 1000 rows
   of the client and of the simulator. On a small machine both compete for the same cores.
2. Latency-bound: the same with --latency-s 0.3 and concurrency 256, compared with the
   Little's-law ceiling C/L = 256/0.3 = 853 rows/s.
3. The image stage: `pipeline.images.to_parts` on large JPEGs against a naive Pillow loop
   (open, thumbnail, save JPEG q90, base64).

The timings are figures to report, not assertions: they move with the machine and its load.
The script fails (exit code 1) only when a run does not produce N rows all `ok`.

Run it with `make bench`, or `.venv/bin/python tests/benchmarks/run_overhead.py`.
The file name does not start with test_, so pytest does not collect it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import os
import platform
import re
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import PIL
import polars as pl
import yaml
from PIL import Image, ImageChops, ImageFilter

from common import ANNOTATE, HOST, KEY_ENV, Row, child_env, markdown
from pipeline.images import to_parts

SMALL_ROWS = 3000
SMALL_SIZE = (64, 48)
PHOTO_COUNT = 200
PHOTO_SIZE = (2000, 1500)
MAX_SIDE = 768
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until_listening(proc: subprocess.Popen[bytes], port: int, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the simulator exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the simulator did not accept connections on port {port} within {deadline_s:.0f} s")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a running process, all threads, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)"; fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15: utime, stime


@dataclass
class Simulator:
    pid: int
    url: str


@contextlib.contextmanager
def simulator(latency_s: float, log_path: Path) -> Iterator[Simulator]:
    """`annotate simulate` as a separate process on a free loopback port; killed on exit."""
    port = free_port()
    command = [ANNOTATE, "simulate", "--host", HOST, "--port", str(port), "--latency-s", str(latency_s)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            wait_until_listening(proc, port)
            yield Simulator(proc.pid, f"http://{HOST}:{port}/v1")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class RunResult:
    wall_s: float  # wall clock of the subprocess, interpreter start included
    in_run_s: float | None  # the run's own elapsed time, from its summary line (0.1 s resolution)
    client_cpu_s: float
    simulator_cpu_s: float
    returncode: int
    output: str


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_annotate(config: Path, sim: Simulator) -> RunResult:
    """`annotate run CONFIG -q`, timed by wall clock and by the CPU of both processes."""
    sim_before, client_before = cpu_seconds(sim.pid), children_cpu_seconds()
    started = time.perf_counter()
    done = subprocess.run([ANNOTATE, "run", str(config), "-q"], capture_output=True, text=True,
                          env=child_env(), timeout=150)
    wall = time.perf_counter() - started
    client_cpu, sim_cpu = children_cpu_seconds() - client_before, cpu_seconds(sim.pid) - sim_before
    found = re.search(r"finished in ([\d.]+) s", done.stdout)
    return RunResult(wall, float(found.group(1)) if found else None, client_cpu, sim_cpu,
                     done.returncode, (done.stdout + done.stderr).strip())


def startup_seconds() -> tuple[float, float]:
    """Wall clock and CPU of `annotate run --help`: interpreter start plus every import the run
    makes. Both are part of the client figures below."""
    cpu_before, started = children_cpu_seconds(), time.perf_counter()
    subprocess.run([ANNOTATE, "run", "--help"], capture_output=True, check=True, env=child_env())
    return time.perf_counter() - started, children_cpu_seconds() - cpu_before


# --- inputs ---------------------------------------------------------------------------------


def small_images(folder: Path, n: int) -> Path:
    """n distinct small PNGs (one colour each) and a CSV manifest naming them."""
    folder.mkdir(parents=True)
    names = []
    for i in range(n):
        colour = (i & 0xFF, (i >> 8) * 20, 128)  # distinct for i < 3328
        name = f"img{i:05d}.png"
        Image.new("RGB", SMALL_SIZE, colour).save(folder / name)
        names.append(name)
    manifest = folder / "manifest.csv"
    pl.DataFrame({"image": names}).write_csv(manifest)
    return manifest


def write_config(path: Path, manifest: Path, base_url: str, concurrency: int, out: Path, journal: bool) -> Path:
    data = {
        "input": {"manifest": str(manifest)},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "request": {"model": "gpt-4o", "max_tokens": 50},
        "limits": {"concurrency": concurrency},
        "output": {"dir": str(out), "journal": journal},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def photos(folder: Path, n: int) -> list[Path]:
    """n photo-like JPEGs: gradients and blurred noise, shifted per image so no two are alike
    and none compresses to nothing."""
    folder.mkdir(parents=True)
    vertical = Image.linear_gradient("L").resize(PHOTO_SIZE)
    horizontal = Image.linear_gradient("L").rotate(90).resize(PHOTO_SIZE)
    noise = Image.effect_noise(PHOTO_SIZE, 48).filter(ImageFilter.GaussianBlur(1))
    paths = []
    for i in range(n):
        bands = (ImageChops.add(vertical, ImageChops.offset(noise, 37 * i, 11 * i), scale=2),
                 ImageChops.offset(horizontal, 53 * i, 0),
                 ImageChops.offset(noise, 0, 71 * i))
        path = folder / f"photo{i:03d}.jpg"
        Image.merge("RGB", bands).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


# --- the figures ----------------------------------------------------------------------------


def check_output(out: Path, n: int) -> tuple[bool, str]:
    frame = pl.read_parquet(out / "*.parquet")
    ok = frame.filter(pl.col("status") == "ok").height
    good = frame.height == n and ok == n and frame["id"].n_unique() == n
    return good, f"{'OK' if good else 'FAILED'}: {frame.height} rows, {ok} ok, {frame['id'].n_unique()} ids (expected {n})"


def throughput(work: Path, manifest: Path, n: int, latency_s: float, concurrency: int,
               journal: bool = True) -> tuple[RunResult, bool, str]:
    name = f"latency{latency_s:g}-c{concurrency}-journal{'on' if journal else 'off'}"
    out = work / f"out-{name}"
    with simulator(latency_s, work / f"simulator-{name}.log") as sim:
        config = write_config(work / f"{name}.yaml", manifest, sim.url, concurrency, out, journal)
        result = run_annotate(config, sim)
    if result.returncode != 0:
        return result, False, f"FAILED: exit code {result.returncode}: {result.output[-300:]}"
    good, verdict = check_output(out, n)
    return result, good, verdict


def throughput_rows(label: str, setting: str, n: int, result: RunResult, verdict: str) -> list[Row]:
    rows: list[Row] = [(f"{label}: rows/s, wall clock", setting, f"{n / result.wall_s:.0f} rows/s ({result.wall_s:.1f} s)")]
    if result.in_run_s:
        rows.append((f"{label}: rows/s, the run's own clock", setting,
                     f"{n / result.in_run_s:.0f} rows/s ({result.in_run_s:.1f} s, from the summary line)"))
    rows += [
        (f"{label}: client CPU (startup included)", setting, f"{result.client_cpu_s / n * 1000:.2f} s per 1000 rows"),
        (f"{label}: simulator CPU", setting, f"{result.simulator_cpu_s / n * 1000:.2f} s per 1000 rows"),
        (f"{label}: output", setting, verdict),
    ]
    return rows


def naive(path: Path) -> str:
    with Image.open(path) as image:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_stage(paths: list[Path]) -> tuple[float, float, float, float]:
    """Seconds for to_parts and for the naive loop over all paths, interleaved image by image
    (and alternating which goes first) so machine noise falls on both alike; and the mean
    base64 length each produced."""
    ours = theirs = 0.0
    ours_chars = theirs_chars = 0
    for i, path in enumerate(paths):
        for which in ((0, 1) if i % 2 else (1, 0)):
            started = time.perf_counter()
            if which == 0:
                part = to_parts([str(path)], path.parent, max_side=MAX_SIDE)[0]
                ours += time.perf_counter() - started
                ours_chars += len(part.url.partition(",")[2])
            else:
                theirs_chars += len(naive(path))
                theirs += time.perf_counter() - started
    return ours, theirs, ours_chars / len(paths), theirs_chars / len(paths)


def image_rows(paths: list[Path]) -> list[Row]:
    ours, theirs, ours_chars, theirs_chars = image_stage(paths)
    n = len(paths)
    mean_mb = sum(p.stat().st_size for p in paths) / n / 1e6
    setting = f"{n} JPEG {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (mean {mean_mb:.2f} MB) -> max_side {MAX_SIDE}"
    return [
        ("image stage: `to_parts`", setting, f"{n / ours:.1f} images/s (base64 {ours_chars / 1000:.0f} kB each)"),
        ("image stage: naive Pillow loop", setting,
         f"{n / theirs:.1f} images/s (base64 {theirs_chars / 1000:.0f} kB each)"),
        ("image stage: `to_parts` / naive", setting, f"{theirs / ours:.2f}x the naive loop's speed"),
    ]


def main() -> int:
    started = time.perf_counter()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    rows: list[Row] = []
    all_good = True
    with tempfile.TemporaryDirectory(prefix="annotate-bench-") as tmp:
        work = Path(tmp)
        manifest = small_images(work / "small", SMALL_ROWS)
        wall, cpu = startup_seconds()
        rows.append(("`annotate` startup", "`annotate run --help`", f"{wall:.2f} s wall, {cpu:.2f} s CPU"))

        setting = f"N={SMALL_ROWS} PNG {SMALL_SIZE[0]}x{SMALL_SIZE[1]}, C=64, latency 0"
        result, good, verdict = throughput(work, manifest, SMALL_ROWS, 0.0, 64)
        rows += throughput_rows("zero latency", setting, SMALL_ROWS, result, verdict)
        all_good &= good
        unjournalled, good, verdict = throughput(work, manifest, SMALL_ROWS, 0.0, 64, journal=False)
        rows += throughput_rows("zero latency, journal off", setting, SMALL_ROWS, unjournalled, verdict)
        all_good &= good
        on, off = (SMALL_ROWS / (r.in_run_s or r.wall_s) for r in (result, unjournalled))
        rows.append(("journal on / journal off", setting, f"{on / off:.2f} (rows/s {on:.0f} vs {off:.0f})"))

        concurrency, latency = 256, 0.3
        ceiling = concurrency / latency
        setting = f"N={SMALL_ROWS} PNG {SMALL_SIZE[0]}x{SMALL_SIZE[1]}, C={concurrency}, latency {latency} s"
        result, good, verdict = throughput(work, manifest, SMALL_ROWS, latency, concurrency)
        rows += throughput_rows("latency-bound", setting, SMALL_ROWS, result, verdict)
        all_good &= good
        rate = SMALL_ROWS / (result.in_run_s or result.wall_s)
        rows.append(("latency-bound: share of C/L", setting,
                     f"{rate / ceiling:.2f} of {ceiling:.0f} rows/s (the run's own clock"
                     f"{'' if result.in_run_s else ' unavailable: wall clock'})"))

        rows += image_rows(photos(work / "photos", PHOTO_COUNT))
    total = time.perf_counter() - started
    rows.append(("whole script", f"{os.cpu_count()} CPUs, Python {platform.python_version()}, Pillow {PIL.__version__}",
                 f"{total:.0f} s"))

    print(f"command: {shlex.join([sys.executable, *sys.argv])}  (cwd {Path.cwd()})")
    print(f"date: {when}\n")
    print(markdown(rows))
    return 0 if all_good else 1


if __name__ == "__main__":
    sys.exit(main())
