"""P5 resume: what resuming costs when the output directory already holds 1,000,000 done
rows, measured in one run. `figures(work)` returns the rows of the results table
(common.results_table); run standalone, the script prints that table. Everything talks to
127.0.0.1 only.

Setup (not timed): 8 small PNGs; a CSV manifest of 1,000,000 rows, each with its own id
(prompt "Describe {item}."); the ids computed with `Manifest.batches`; an output directory
as a finished run leaves it: 200 Parquet parts of 5,000 `ok` rows with the full output
schema, `_run.json` with the config's fingerprint, and an empty `_journal.sqlite`.

1. Nothing to do: `annotate run CONFIG -q` (a subprocess) on that directory. Wall seconds
   from spawn to exit and the child's peak RSS (from `os.wait4`, in a bare launcher process:
   see common.LAUNCHER); the run must exit 0, say it answered 0 rows, and write no part.
2. To the first request: the same manifest with 1 undone row appended at the end, against
   a TCP listener that accepts and never answers. Wall seconds from spawn to the first
   accepted connection, and the child's peak RSS (VmHWM) just before it is killed. The
   request it sent must ask about that one new row. (A fresh address space starts VmHWM at
   zero, so it needs no launcher.)
3. Interpreter + imports alone: `python -c "import pipeline.cli"`, shown beside 1 and 2.
4. Compaction, last (it rewrites the directory): `annotate compact DIR` once, wall seconds and
   peak RSS (wait4), beside the size of the whole dataset as one Arrow table in memory. It must
   exit 0 and leave every id once, in the manifest's order, in parts of at most 1,000,000 rows.

The P5 target (≤ 2 s) is held against the medians of 1 and 2 as they are: the whole
process, interpreter start and imports included, nothing subtracted. The run's own clock
(from its summary line) is shown too. 1, 2 and 3 run three times each. The timings are
figures to report, not assertions: they move with the machine and its load. The script
fails (exit code 1) only when a check above does not hold.

Run it with `.venv/bin/python tests/benchmarks/resume_1m.py` (about 35 s on 2 cores; `--smoke`:
2,000 rows, each run once, to check that it runs to its end).
The file name does not start with test_, so pytest does not collect it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from common import (
    ANNOTATE,
    HOST,
    KEY_ENV,
    Figure,
    Finished,
    child_env,
    run_to_exit,
    standalone,
)
from PIL import Image

from pipeline import config
from pipeline.manifest import Manifest
from pipeline.store import columns
from pipeline.store.journal import Journal
from pipeline.store.parts import PARTS, RUN_FILE

IMAGES = 8
IMAGE_SIZE = (64, 48)
PROMPT = "Describe {item}."
MODEL = "gpt-4o"
FIRST_REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Scale:
    rows: int  # done rows in the output directory
    part_rows: int
    repeats: int  # runs of each kind


FULL = Scale(1_000_000, 5_000, 3)
SMOKE = Scale(2_000, 500, 1)

# --- processes ------------------------------------------------------------------------------


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set of a running process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmHWM for PID {pid}")


@dataclass
class Listener:
    """A TCP server on 127.0.0.1 that accepts and never answers. Records when the first
    connection was accepted and the first request (headers and body) it carried."""

    sock: socket.socket
    first_accept: float | None = None
    accepted: threading.Event = field(default_factory=threading.Event)
    request_read: threading.Event = field(default_factory=threading.Event)
    request: bytes = b""
    connections: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.sock.getsockname()[1]}/v1"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            if self.first_accept is None:
                self.first_accept = time.perf_counter()
                self.accepted.set()
                threading.Thread(target=self._read_request, args=(conn,), daemon=True).start()
            self.connections.append(conn)  # held open, never answered

    def _read_request(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                if not (chunk := conn.recv(65536)):
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length:
                if not (chunk := conn.recv(65536)):
                    break
                body += chunk
            self.request = head + b"\r\n\r\n" + body
        except OSError:
            pass
        finally:
            self.request_read.set()


@contextlib.contextmanager
def listener() -> Iterator[Listener]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(64)
    server = Listener(sock)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        thread.join(timeout=5)
        for conn in server.connections:
            conn.close()


@dataclass
class FirstRequest:
    to_accept_s: float | None  # None: no connection within the timeout
    peak_rss_mb: float
    request: bytes
    output: str


def run_to_first_request(command: list[str], log_path: Path) -> FirstRequest:
    """Spawn against a listener that never answers; time spawn to the first accept; read the
    request it sent; then the child's VmHWM, SIGKILL, wait."""
    with listener() as server, log_path.open("wb") as log:
        command = [*command, "--set", f"endpoint.base_url={server.url}"]
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            deadline = time.monotonic() + FIRST_REQUEST_TIMEOUT_S
            while not server.accepted.wait(0.05) and proc.poll() is None and time.monotonic() < deadline:
                pass
            if server.accepted.is_set():
                server.request_read.wait(10)
            rss = vm_hwm_mb(proc.pid) if proc.poll() is None else float("nan")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        to_accept = server.first_accept - started if server.first_accept is not None else None
        return FirstRequest(to_accept, rss, server.request, log_path.read_text(errors="replace").strip())


def import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipeline.cli"], check=True, env=child_env())
    return time.perf_counter() - started


# --- inputs ---------------------------------------------------------------------------------


def small_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i in range(IMAGES):
        name = f"img{i}.png"
        Image.new("RGB", IMAGE_SIZE, (30 * i, 255 - 30 * i, 128)).save(folder / name)
        names.append(name)
    return names


def write_manifest(path: Path, images: list[str], rows: int) -> Path:
    """`image` cycles through the PNGs (relative to the manifest), `item` is "item {i}"."""
    frame = pl.DataFrame({"i": pl.int_range(rows, eager=True)}).select(
        image=pl.col("i").mod(len(images)).replace_strict(list(range(len(images))), images, return_dtype=pl.String),
        item=pl.format("item {}", pl.col("i")),
    )
    frame.write_csv(path)
    return path


def write_config(path: Path, manifest: Path, base_url: str, out: Path) -> tuple[Path, config.RunConfig]:
    data = {
        "input": {"manifest": str(manifest)},
        "prompt": {"user": PROMPT},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV},
        "request": {"model": MODEL, "max_tokens": 50},
        "limits": {"concurrency": 16},
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path, config.load(path)


def manifest_ids(cfg: config.RunConfig) -> tuple[list[str], pa.Schema]:
    manifest = Manifest(cfg.input, cfg.prompt)
    ids = [row.id for batch in manifest.batches() for row in batch]  # 1,000-row slices: 5.5 s here, 100,000: 8.5 s
    return ids, columns.schema(manifest.keep_schema)


def done_rows(ids: list[str], schema: pa.Schema) -> pa.Table:
    """Every id answered `ok`, with the columns a real answer fills."""
    n = len(ids)
    prompt_tokens, completion_tokens = 110, 30  # a low-detail image (85) and the prompt's text
    frame = pl.DataFrame({"id": ids, "i": pl.int_range(n, eager=True)}).select(
        "id",
        status=pl.lit("ok"),
        answer=pl.format("[simulated] A small image, mostly one flat colour with no visible objects, "
                         "text or people; the row asks about item {}.", pl.col("i")),
        finish_reason=pl.lit("stop"),
        refusal=pl.lit(None, pl.String),
        flags=pl.lit([], pl.List(pl.String)),
        model=pl.lit("gpt-4o-2024-08-06"),
        response_id=pl.format("chatcmpl-bench{}", pl.col("i")),
        batch_id=pl.lit(None, pl.String),
        prompt_tokens=pl.lit(prompt_tokens, pl.Int64),
        completion_tokens=pl.lit(completion_tokens, pl.Int64),
        total_tokens=pl.lit(prompt_tokens + completion_tokens, pl.Int64),
        reasoning_tokens=pl.lit(0, pl.Int64),
        cached_tokens=pl.lit(0, pl.Int64),
        cost_usd=pl.lit((prompt_tokens * 2.50 + completion_tokens * 10.0) / 1e6),  # gpt-4o per 1M tokens
        charged_usd=pl.lit((prompt_tokens * 2.50 + completion_tokens * 10.0) / 1e6),
        earlier_cost_usd=pl.lit(None, pl.Float64),
        latency_ms=(400 + (pl.col("i") * 7919) % 900).cast(pl.Float64) + 0.5,
        attempts=pl.lit(1, pl.Int64),
        error=pl.lit(None, pl.String),
        retryable=pl.lit(None, pl.Boolean),
        images=pl.lit(1, pl.Int64),
        image_notes=pl.lit(None, pl.String),
        finished_at=pl.lit(datetime.datetime(2026, 11, 25, tzinfo=datetime.timezone.utc)),
    ).with_columns(answers=pl.concat_list("answer"))
    return frame.select(schema.names).to_arrow().cast(schema)


def write_output_dir(out: Path, table: pa.Table, cfg: config.RunConfig, manifest: Path, part_rows: int) -> int:
    """The directory as a finished run leaves it; returns the number of parts."""
    out.mkdir(parents=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    parts = 0
    for seq, start in enumerate(range(0, table.num_rows, part_rows), 1):
        pq.write_table(table.slice(start, part_rows), out / f"part-{stamp}-{seq:05d}.parquet")
        parts += 1
    info = {"fingerprint": config.fingerprint(cfg), "manifest": {"path": str(manifest.resolve()), "rows": table.num_rows},
            "runs": [], "config": {"input": cfg.input.model_dump(mode="json"), "prompt": cfg.prompt.model_dump(mode="json")}}
    (out / RUN_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    Journal(out).close()  # a finished run leaves an empty journal behind
    return parts


@dataclass
class Setup:
    scale: Scale
    out: Path
    done_config: Path  # the 1,000,000-row manifest: nothing to do
    more_config: Path  # the same plus one undone row at the end
    new_item: str
    parts: int
    seconds: float
    ids_seconds: float
    parts_mb: float
    table_mb: float  # the done rows as one Arrow table in memory
    ids: list[str]  # in the manifest's order


def prepare(work: Path, scale: Scale) -> Setup:
    started = time.perf_counter()
    rows = scale.rows
    images = small_images(work / "images")
    out = work / "out"
    manifest = write_manifest(work / "images" / "manifest.csv", images, rows)
    done_config, cfg = write_config(work / "done.yaml", manifest, f"http://{HOST}:9/v1", out)
    ids_started = time.perf_counter()
    ids, schema = manifest_ids(cfg)
    ids_seconds = time.perf_counter() - ids_started
    if len(ids) != rows or len(set(ids)) != rows:
        raise RuntimeError(f"expected {rows} distinct ids, got {len(set(ids))} of {len(ids)}")
    table = done_rows(ids, schema)
    parts = write_output_dir(out, table, cfg, manifest, scale.part_rows)
    table_mb = table.nbytes / 1e6
    del table

    more = write_manifest(work / "images" / "manifest-plus-1.csv", images, rows + 1)
    more_config, _ = write_config(work / "more.yaml", more, f"http://{HOST}:9/v1", out)
    parts_mb = sum(p.stat().st_size for p in out.glob(PARTS)) / 1e6
    return Setup(scale, out, done_config, more_config, f"item {rows}", parts, time.perf_counter() - started,
                 ids_seconds, parts_mb, table_mb, ids)


# --- the measurements -----------------------------------------------------------------------


def median_max(values: list[float], unit: str, digits: int) -> str:
    return (f"median {statistics.median(values):.{digits}f} {unit}, max {max(values):.{digits}f} {unit} "
            f"(n={len(values)}: {', '.join(f'{v:.{digits}f}' for v in values)})")


def summary_counts(output: str) -> tuple[int | None, int | None]:
    """Rows answered now and rows resumed, from the run's summary."""
    def number(pattern: str) -> int | None:
        found = re.search(pattern, output)
        return int(found.group(1)) if found else None

    return number(r"answered now: (\d+)"), number(r"resumed: (\d+)")


def own_seconds(output: str) -> float | None:
    """The run's own elapsed time from its summary (0.1 s resolution): `run` without the
    interpreter start, the imports and the exit."""
    found = re.search(r"finished in ([\d.]+) s", output)
    return float(found.group(1)) if found else None


def parts_in(out: Path) -> int:
    return len(list(out.glob(PARTS)))


def nothing_to_do(work: Path, setup: Setup) -> tuple[list[Finished], str | None]:
    """The runs, and what went wrong (None: they exited 0, answered 0 rows, wrote no part)."""
    runs = [run_to_exit([ANNOTATE, "run", str(setup.done_config), "-q"], work / f"nothing-{i}.log")
            for i in range(setup.scale.repeats)]
    parts_after = parts_in(setup.out)
    bad = [r for r in runs if r.returncode != 0 or summary_counts(r.output) != (0, setup.scale.rows)]
    if bad or parts_after != setup.parts:
        return runs, (f"nothing to do: exit {runs[0].returncode}, {parts_after} parts (expected {setup.parts}): "
                      f"{(bad or runs)[0].output[-300:]!r}")
    return runs, None


def request_item(request: bytes) -> str | None:
    """The user text of the chat-completions request the listener received."""
    head, _, body = request.partition(b"\r\n\r\n")
    if not head.startswith(b"POST ") or b"/chat/completions" not in head.split(b"\r\n", 1)[0]:
        return None
    try:
        messages = json.loads(body)["messages"]
    except (ValueError, KeyError, TypeError):
        return None
    for message in messages:
        if message.get("role") == "user":
            content = message["content"]
            parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
            return " ".join(p.get("text", "") for p in parts if p.get("type") == "text")
    return None


def to_first_request(work: Path, setup: Setup) -> tuple[list[FirstRequest], str | None]:
    """The runs, and what went wrong (None: each first request asked about the new row)."""
    runs = [run_to_first_request([ANNOTATE, "run", str(setup.more_config), "-q"], work / f"first-{i}.log")
            for i in range(setup.scale.repeats)]
    want = PROMPT.format(item=setup.new_item)
    texts = [request_item(r.request) for r in runs]
    bad = [(r, t) for r, t in zip(runs, texts, strict=True) if r.to_accept_s is None or t != want]
    parts_after = parts_in(setup.out)
    if parts_after != setup.parts:
        return runs, f"to the first request: {parts_after} parts after the killed runs (expected {setup.parts})"
    if bad:
        r, t = bad[0]
        return runs, (f"to the first request: accepted={r.to_accept_s is not None}, request text {t!r} "
                      f"(expected {want!r}); child said {r.output[-300:]!r}")
    return runs, None


def compacted(work: Path, setup: Setup) -> tuple[Finished, str | None]:
    """The compaction, and what went wrong (None: every id once, in manifest order, parts of at
    most 1,000,000 rows)."""
    done = run_to_exit([ANNOTATE, "compact", str(setup.out)], work / "compact.log")
    files = sorted(setup.out.glob(PARTS))
    ids = pl.read_parquet(files, columns=["id"])["id"].to_list()
    largest = max(pq.ParquetFile(f).metadata.num_rows for f in files)
    if done.returncode != 0 or ids != setup.ids or largest > 1_000_000 or "in manifest order" not in done.output:
        return done, (f"compact: exit {done.returncode}, {len(ids)} ids, in manifest order: {ids == setup.ids}, "
                      f"largest part {largest} rows; it said {done.output[-300:]!r}")
    return done, None


@dataclass
class Measured:
    setup: Setup
    imports_s: list[float]
    nothing: list[Finished]
    first: list[FirstRequest]
    compact: Finished
    problems: list[str]  # checks that did not hold

    @property
    def nothing_s(self) -> float:
        return statistics.median(r.wall_s for r in self.nothing)

    @property
    def first_s(self) -> float | None:
        accepted = [r.to_accept_s for r in self.first if r.to_accept_s is not None]
        return statistics.median(accepted) if accepted else None


def measure(work: Path, scale: Scale = FULL) -> Measured:
    setup = prepare(work, scale)
    imports_s = [import_seconds() for _ in range(scale.repeats)]
    nothing, nothing_problem = nothing_to_do(work, setup)
    first, first_problem = to_first_request(work, setup)
    compact, compact_problem = compacted(work, setup)
    return Measured(setup, imports_s, nothing, first, compact,
                    [p for p in (nothing_problem, first_problem, compact_problem) if p])


# --- the results table ----------------------------------------------------------------------

TARGET_S = 2.0


def listed(values: list[float]) -> str:
    return f"n={len(values)}: " + ", ".join(f"{v:.2f}" for v in values)


def to_figures(m: Measured) -> list[Figure]:
    own = [t for r in m.nothing if (t := own_seconds(r.output)) is not None]
    own_text = f"{statistics.median(own):.1f} s" if own else "not in its summary"
    nothing = f"nothing to do: {m.nothing_s:.2f} s, spawn to exit ({listed([r.wall_s for r in m.nothing])})"
    accepted = [r.to_accept_s for r in m.first if r.to_accept_s is not None]
    first = (f"to the first request: {m.first_s:.2f} s, spawn to first accept ({listed(accepted)})"
             if m.first_s is not None else "to the first request: no connection")
    ours = f"{nothing}; {first}; medians. Inside the run, by its own clock: {own_text}"
    met = not m.problems and m.first_s is not None and max(m.nothing_s, m.first_s) <= TARGET_S
    notes = [f"check FAILED: {p}" for p in m.problems]
    if not m.problems and not met:
        notes.append(f"over {TARGET_S:.0f} s; interpreter + imports alone take {statistics.median(m.imports_s):.2f} s, "
                     f"the nothing-to-do run by its own clock {own_text}")
    s = m.setup
    rows, repeats = s.scale.rows, s.scale.repeats
    return [
        Figure("P5 resume",
               f"≤ {TARGET_S:.0f} s bookkeeping for 1M done rows (bookkeeping: the whole process's wall time, "
               "spawn to exit when nothing is left to do, spawn to the first request for 1 new row; "
               "interpreter start and imports included, nothing subtracted)",
               ours, met=met, note="; ".join(notes)),
        Figure("P5 resume: peak RSS", "- (informational)",
               f"nothing to do {median_max([r.peak_rss_mb for r in m.nothing], 'MB', 0)} (wait4); "
               f"to the first request {median_max([r.peak_rss_mb for r in m.first], 'MB', 0)} (VmHWM before SIGKILL)"),
        Figure("P5 compact", f"`annotate compact` of those {s.parts} parts; the whole dataset as one Arrow table "
               f"would take {s.table_mb:.0f} MB",
               f"{m.compact.wall_s:.1f} s, peak RSS {m.compact.peak_rss_mb:.0f} MB (wait4), "
               f"{m.compact.peak_rss_mb / s.table_mb:.2f}× the whole table"),
        Figure("P5 resume: interpreter + imports", "- (informational; part of both P5 figures)",
               f"`python -c \"import pipeline.cli\"` {median_max(m.imports_s, 's', 2)}"),
        Figure("P5 setup (not timed)",
               f"{rows:,}-row CSV, {s.parts} parts of done rows ({s.parts_mb:.0f} MB), 1 listener that never answers",
               f"{s.seconds:.0f} s, of which ids via `Manifest.batches` {s.ids_seconds:.1f} s; checks "
               + ("FAILED" if m.problems else f"OK: all {repeats} nothing-to-do runs exit 0, answer 0 rows, resume "
                  f"{rows:,} and write no part; all {repeats} first requests ask about the new row")),
    ]


def figures(work: Path, scale: Scale = FULL) -> list[Figure]:
    return to_figures(measure(work / "resume_1m", scale))


def main() -> int:
    return standalone(measure, to_figures, lambda measured: measured.problems, FULL, SMOKE)


if __name__ == "__main__":
    sys.exit(main())
