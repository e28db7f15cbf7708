"""`make bench`: every target of the performance issue, measured in one run against the bundled
simulator on 127.0.0.1, side by side with what users would otherwise run; one table, printed
and written to benchmarks/RESULTS.md.

P1-P4 are here; P5 (resume), P6 (image preparation), P7 (estimate at scale), P8 (image
preparation on Ray), P9 (data in a bucket) and P10 (the viewer at scale) come from resume_1m.py,
image_stage.py, estimate_1m.py, ray_prep.py, buckets.py and view_1m.py. The
simulator's log times every request: rates are counted from its first request to its last
answer, alike for every client. Each client is a subprocess spawned through the launcher in
common.py, which reports its CPU and peak RSS alone.

P1, P3 and P4 run the simulator in a thread of this process (its CPU is this process's). P2 runs
it in a process of its own with its garbage collector off (sim_process.py, as the rate-fidelity
tests do): a collector pause here would hold arrivals back and time them as a burst, a 429 that
no provider would send. P2 has a row per way a provider enforces a limit on requests, our client
beside the `AsyncOpenAI` loop (the SDK's own retries) in each and LiteLLM's Router in two: a
sliding 1-s window, a sliding 10-s window (Azure), whole-minute windows (at 3,000 RPM, for a run
over 70 s), a bucket; every client stopped 3 × 0.3 s mid-run (SIGSTOP from a thread; the share
counts the time it was not stopped); a limit lower than the config's and not stated (no
x-ratelimit-* headers, no Retry-After) and a key shared with a neighbour, both measured once
settled (SETTLE_S after the first request let through, 429s as a share of the requests after
it). Its last row is our client on tokens under a sliding 1-s window.

The timings are figures to report, not assertions: they move with the machine and its load.
The script exits 1 only when a client's output is wrong (rows missing or not ok). A baseline
whose client is not installed (the bench extra) is skipped, and the table says so.
Run it with `make bench`, or `.venv/bin/python tests/benchmarks/suite.py [--quick | --smoke] [--out PATH]`;
--smoke runs every measurement at a tiny size, to check that the script runs to its end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import baselines
import buckets
import estimate_1m
import image_stage
import polars as pl
import ray_prep
import resume_1m
import view_1m
import yaml
from common import (
    ANNOTATE,
    KEY_ENV,
    Figure,
    Finished,
    child_env,
    machine,
    results_table,
    run_to_exit,
)
from PIL import Image
from sim_process import SimulatorProcess

from pipeline import simulator
from pipeline.config import SimulatorSettings
from pipeline.simulator import LogEntry

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BASELINES = HERE / "baselines.py"
MODEL = "gpt-4o"
MAX_TOKENS = 50


@dataclass
class Sizes:
    overhead_rows: int = 5000  # P1 (and the images P2's requests rows draw from: no more rows than these)
    limit_rows: int = 3000  # P2, requests: a sliding 1-s window at 6,000 RPM (30 s)
    mode_rows: int = 1200  # P2, requests: a 10-s window (past its 1,000), a bucket, a stalled client (12 s each)
    fixed_rows: int = 3500  # P2, requests: whole-minute windows at 3,000 RPM (over 70 s)
    found_rows: int = 1200  # P2, requests: an unstated limit (24 s at 3,000 RPM), a shared key (16 s at 4,500)
    token_rows: int = 1500  # P2, tokens per minute
    latency_rows: int = 5000  # P3
    memory_rows: tuple[int, int] = (100_000, 1_000_000)  # P4 manifests
    memory_answered: int = 2000  # P4: rows answered in both
    resume: resume_1m.Scale = resume_1m.FULL  # P5
    images: image_stage.Scale = image_stage.FULL  # P6
    estimate: estimate_1m.Scale = estimate_1m.FULL  # P7
    ray: ray_prep.Scale = ray_prep.FULL  # P8
    buckets: buckets.Scale = buckets.FULL  # P9
    view: view_1m.Scale = view_1m.FULL  # P10


QUICK = Sizes(overhead_rows=1000, limit_rows=600, mode_rows=300, fixed_rows=600, found_rows=400, token_rows=300,
              latency_rows=1000, memory_rows=(10_000, 100_000), memory_answered=500)

SMOKE = Sizes(overhead_rows=20, limit_rows=20, mode_rows=10, fixed_rows=10, found_rows=10, token_rows=10,
              latency_rows=20, memory_rows=(200, 2_000), memory_answered=10, resume=resume_1m.SMOKE,
              images=image_stage.SMOKE, estimate=estimate_1m.SMOKE, ray=ray_prep.SMOKE, buckets=buckets.SMOKE,
              view=view_1m.SMOKE)


# --- inputs -----------------------------------------------------------------------------------


def small_images(folder: Path, n: int, size: tuple[int, int] = (64, 48)) -> Path:
    """n distinct one-colour PNGs and a CSV manifest naming them (made once per folder)."""
    manifest = folder / "manifest.csv"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i:05d}.png"
        Image.new("RGB", size, (i & 0xFF, (i >> 8) * 20 % 256, 128)).save(folder / name)
        names.append(name)
    pl.DataFrame({"image": names}).write_csv(manifest)
    return manifest


def shared_images_manifest(folder: Path, rows: int) -> Path:
    """`rows` rows over 8 image files, each row its own prompt (so its own id)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        Image.new("RGB", (64, 48), (30 * i, 60, 90)).save(folder / f"shared{i}.png")
    frame = pl.DataFrame({"item": pl.int_range(rows, eager=True)}).with_columns(
        image=pl.format("shared{}.png", pl.col("item") % 8))
    manifest = folder / f"manifest-{rows}.csv"
    frame.write_csv(manifest)
    return manifest


def write_config(path: Path, manifest: Path, url: str, out: Path, journal: bool = True, **limits: int) -> Path:
    data = {
        "input": {"manifest": str(manifest)},
        "endpoint": {"base_url": url, "api_key_env": KEY_ENV},
        "request": {"model": MODEL, "max_tokens": MAX_TOKENS},
        "limits": {"concurrency": 64, **limits},
        "output": {"dir": str(out), "journal": journal},
    }
    if "item" in pl.read_csv(manifest, n_rows=1).columns:
        data["prompt"] = {"user": "Describe {item}."}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# --- clients ----------------------------------------------------------------------------------


class Server(Protocol):
    """A simulator as the runs use it: in a thread of this process (simulator.running) or in a
    process of its own (SimulatorProcess)."""

    url: str

    def reset(self) -> None: ...

    def requests(self) -> list[LogEntry]: ...


Started = Callable[[int], object]  # told a client's pid once it runs


@dataclass
class Outcome:
    client: str
    rows: int  # rows written
    ok: int
    finished: Finished
    span_s: float  # the simulator's first request to its last answer
    answered: int  # 200s the simulator sent
    rate_limited: int  # 429s the simulator sent
    tokens: int  # what the simulator's token limit counted over the 200s
    simulator_cpu_s: float  # this process's CPU over the run: the simulator's where it runs in a thread here
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # each request's arrival and status
    skipped: str = ""  # why this client did not run, if it did not

    @property
    def rate(self) -> float:
        return self.answered / self.span_s if self.span_s else 0.0

    def cpu_ms_per_row(self) -> float:
        return self.finished.cpu_s / max(self.rows, 1) * 1000


def served(sim: Server, client: str, rows: int, ok: int, finished: Finished, simulator_cpu_s: float) -> Outcome:
    log = sim.requests()
    answered = [e for e in log if e.status == 200]
    span = max(e.answered_at for e in answered) - min(e.time for e in log) if answered else 0.0
    tokens = sum(e.usage["prompt_tokens"] + MAX_TOKENS * (e.body or {}).get("n", 1) for e in answered if e.usage)
    return Outcome(client, rows, ok, finished, span, len(answered), sum(e.status == 429 for e in log), tokens,
                   simulator_cpu_s, arrivals=[(e.time, e.status) for e in log])


def ours(sim: Server, work: Path, name: str, manifest: Path, *extra: str, journal: bool = True,
         started: Started | None = None, **limits: int) -> Outcome:
    sim.reset()
    out = work / f"out-{name}"
    config = write_config(work / f"{name}.yaml", manifest, sim.url, out, journal, **limits)
    cpu = time.process_time()  # this process only waits: its CPU is the simulator's, where it runs here
    finished = run_to_exit([ANNOTATE, "run", str(config), "-q", *extra], work / f"{name}.log", started=started)
    cpu = time.process_time() - cpu
    frame = pl.read_parquet(out / "*.parquet")
    return served(sim, "annotate", frame.height, frame.filter(pl.col("status") == "ok").height, finished, cpu)


def baseline(sim: Server, work: Path, client: str, manifest: Path, concurrency: int, started: Started | None = None,
             rpm: int | None = None) -> Outcome:
    """A client of baselines.py; `rpm`: the limit stated to it, where it takes one (litellm-router)."""
    if missing := baselines.not_installed(client):
        print(f"bench: the {client} baseline is skipped: {missing} is not installed (the bench extra)",
              file=sys.stderr)
        return Outcome(client, 0, 0, Finished(0.0, 0.0, 0.0, 0, ""), 0.0, 0, 0, 0, 0.0,
                       skipped=f"{client}: skipped, {missing} is not installed")
    sim.reset()
    out = work / f"{client}-{concurrency}.parquet"
    env = {**child_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cpu = time.process_time()
    stated = [] if rpm is None else ["--rpm", str(rpm)]
    finished = run_to_exit([sys.executable, str(BASELINES), client, "--base-url", sim.url, "--manifest",
                            str(manifest), "--concurrency", str(concurrency), "--out", str(out),
                            "--model", MODEL, "--max-tokens", str(MAX_TOKENS), *stated],
                           work / f"{client}-{concurrency}.log", env=env, timeout_s=600, started=started)
    cpu = time.process_time() - cpu
    # the summary is the last JSON line: a client may log after it (its output and errors share the log)
    lines = [line for line in finished.output.splitlines() if line.startswith('{"rows"')]
    summary = json.loads(lines[-1]) if lines else {}
    return served(sim, client, summary.get("rows", 0), summary.get("ok", 0), finished, cpu)


@contextlib.contextmanager
def simulated(**settings: float) -> Iterator[simulator.Simulator]:
    with simulator.running(SimulatorSettings.model_validate(settings)) as sim:
        yield sim


# --- the figures ------------------------------------------------------------------------------


class Checks:
    """Collects what went wrong with a client's output; the script exits 1 if anything did."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def complete(self, outcome: Outcome, n: int) -> str:
        if outcome.skipped:
            return ""
        if outcome.rows != n or outcome.ok != n:
            self.problems.append(f"{outcome.client}: {outcome.rows} rows, {outcome.ok} ok, expected {n}: "
                                 f"{outcome.finished.output[-300:]}")
            return f" ({outcome.ok} of {n} ok)"
        return ""


def described(o: Outcome) -> str:
    if o.skipped:
        return o.skipped
    return (f"{o.rate:.0f} rows/s; CPU {o.cpu_ms_per_row():.2f} ms/row, simulator "
            f"{o.simulator_cpu_s / max(o.rows, 1) * 1000:.2f}; wall {o.finished.wall_s:.1f} s incl. start-up")


def overhead(work: Path, sizes: Sizes, checks: Checks) -> list[Figure]:
    n = sizes.overhead_rows
    manifest = small_images(work / "small", n)
    with simulated() as sim:
        mine = ours(sim, work, "p1", manifest)
        unjournalled = ours(sim, work, "p1-no-journal", manifest, journal=False)
        runs = {c: baseline(sim, work, c, manifest, 64) for c in ("openai", "litellm", "httpx")}
    flags = {o.client: checks.complete(o, n) for o in (mine, *runs.values())}
    checks.complete(unjournalled, n)
    openai, litellm, bare = runs["openai"], runs["litellm"], runs["httpx"]
    ratio = mine.rate / openai.rate if openai.rate else None
    met = None if ratio is None else ratio >= 2
    setting = f"latency 0, {n} rows, C=64"
    return [
        Figure("P1 overhead vs the `AsyncOpenAI` loop", f"≥ 2× its rows/s ({setting}; journal on, images encoded)",
               described(mine) + flags[mine.client], described(openai) + flags["openai"],
               "-" if ratio is None else f"{ratio:.2f}×", met, _cpu_bound_note(mine, bare) if met is False else ""),
        Figure("P1 … what the journal costs", "(same settings; `output.journal: false` is for measuring only)",
               described(mine), "journal off: " + described(unjournalled), f"{mine.rate / unjournalled.rate:.2f}× "
               "the rate without it" if unjournalled.rate else "-"),
        Figure("P1 … vs the LiteLLM `acompletion` loop", "(same settings)", described(mine),
               described(litellm) + flags["litellm"],
               f"{mine.rate / litellm.rate:.2f}×" if litellm.rate else "-"),
        Figure("P1 … the simulator's ceiling: a bare httpx + aiohttp loop", "(same settings)", described(mine),
               described(bare) + flags["httpx"], f"{mine.rate / bare.rate:.2f} of it" if bare.rate else "-"),
    ]


def _cpu_bound_note(mine: Outcome, bare: Outcome) -> str:
    return (f"limited by CPU: {mine.cpu_ms_per_row():.2f} ms per row on one event loop, while the simulator "
            f"shares the 2 cores; the bare loop needs {bare.cpu_ms_per_row():.2f} ms")


# --- P2: rate-limit fidelity -------------------------------------------------------------------

RPM = 6000  # 100 requests a second
SETTLE_S = 5.0  # an unstated or shared limit is measured from this long after the first request let through
STALL_S = 0.3  # each of the three stops of a stalled client
BASELINE_NAMES = {"openai": "`AsyncOpenAI` loop", "litellm-router": "LiteLLM Router (usage-based-routing-v2)"}


@dataclass(frozen=True)
class Kept:
    """How a client kept to a case's limit, counted from the simulator's log."""

    per_s: float  # requests a second let through
    share: float  # of what the case allows
    refused: int  # 429s
    requests: int  # requests counted (those after the settle time, where the case has one)


@dataclass(frozen=True)
class Case:
    """One P2 row on requests: the limit as the simulator enforces it and as the config states it."""

    key: str  # names its files
    name: str  # the end of the figure's name
    setting: str  # the simulator's side, in words
    simulator: dict[str, Any]  # SimulatorSettings
    rows: int
    allowed_rpm: int  # what a client can have: the limit enforced, less a neighbour's share
    configured_rpm: int = RPM  # what our config and the router's deployment state
    settles: bool = False  # an unstated or shared limit: measured once settled, 429s as a share
    stalled: bool = False  # every client is stopped 3 × STALL_S mid-run
    router: bool = False  # LiteLLM's Router runs too

    def target(self) -> str:
        if self.settles:
            return f"≥ 90% of {self.allowed_rpm:,} RPM once settled, ≤ 2% 429s"
        return f"≥ 97% of {self.allowed_rpm:,} RPM and 0 429s"

    def met(self, got: Kept) -> bool:
        if self.settles:
            return got.share >= 0.9 and got.refused <= 0.02 * got.requests
        return got.share >= 0.97 and got.refused == 0

    def stall_points(self) -> list[int]:
        """Requests the simulator has seen when the client is stopped: a quarter, half, three quarters of the rows."""
        return [self.rows * k // 4 for k in (1, 2, 3)] if self.stalled else []


def request_cases(sizes: Sizes) -> list[Case]:
    return [
        Case("window-1s", "sliding 1-s window", "simulator: at most 100 in any 1 s", {"requests_per_minute": RPM},
             sizes.limit_rows, RPM, router=True),
        Case("window-10s", "sliding 10-s window (as Azure)", "simulator: at most 1,000 in any 10 s",
             {"requests_per_minute": RPM, "window_s": 10}, sizes.mode_rows, RPM),
        Case("fixed-minute", "whole-minute windows",
             "simulator: 3,000 a minute, counted from each whole minute of the clock; half the others' limit, "
             "for a run of over a minute from fewer rows",
             {"requests_per_minute": 3000, "limit_mode": "fixed_minute"}, sizes.fixed_rows, 3000,
             configured_rpm=3000),
        Case("bucket", "bucket", "simulator: a bucket holding 1 s of allowance, refilled at 100/s",
             {"requests_per_minute": RPM, "limit_mode": "bucket"}, sizes.mode_rows, RPM),
        Case("stalled", "a stalled client",
             f"simulator: 1-s window; every client stopped (SIGSTOP) 3 × {STALL_S} s, at 1/4, 1/2 and 3/4 of its "
             "rows; the share counts the time it was not stopped", {"requests_per_minute": RPM}, sizes.mode_rows,
             RPM, stalled=True),
        Case("unstated", "an unstated lower limit",
             f"simulator: 3,000 RPM in a 1-s window, no x-ratelimit-* headers, 429s without Retry-After; the "
             f"config says 6,000; from {SETTLE_S:.0f} s after the first request let through",
             {"requests_per_minute": 3000, "state_limits": False}, sizes.found_rows, 3000, settles=True,
             router=True),
        Case("shared", "a key shared with a neighbour",
             f"simulator: 6,000 RPM in a 1-s window, of which a neighbour on the key takes 1,500; from "
             f"{SETTLE_S:.0f} s after the first request let through",
             {"requests_per_minute": RPM, "neighbour_rpm": 1500}, sizes.found_rows, 4500, settles=True),
    ]


class Stalls:
    """Stops a client for STALL_S (SIGSTOP, then SIGCONT) as the simulator reaches each of the
    points (requests seen), from a thread, as a busy machine or a GC pause would. Its `start` is
    run_to_exit's `started`; the block's end waits for the thread."""

    def __init__(self, sim: SimulatorProcess, points: list[int]) -> None:
        self._sim, self._points = sim, points
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stops: list[tuple[float, float]] = []  # when the client was stopped and went on (monotonic)

    def start(self, pid: int) -> None:
        if self._points:
            self._threads.append(threading.Thread(target=self._stall, args=(pid,), name="stalls", daemon=True))
            self._threads[-1].start()

    def _stall(self, pid: int) -> None:
        for point in self._points:
            while self._sim.seen() < point:
                if self._done.wait(0.01):
                    return
            stopped = time.monotonic()
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # the client has ended meanwhile
                return
            time.sleep(STALL_S)
            os.kill(pid, signal.SIGCONT)
            self.stops.append((stopped, time.monotonic()))

    def __enter__(self) -> Stalls:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join()


def configure(sim: SimulatorProcess, settings: dict[str, Any]) -> None:
    """The simulator's settings replaced by these (every field, so none is left from the case before)."""
    sim.update(**SimulatorSettings.model_validate(settings).model_dump())


def settled(arrivals: list[tuple[float, int]], since_s: float) -> tuple[float, int, int]:
    """(requests a second let through, 429s, requests) from since_s after the first request let
    through: a client told a limit above the real one overshoots once, before its first 429 comes back."""
    let_through = sorted(t for t, status in arrivals if status == 200)
    since = let_through[0] + since_s if let_through else math.inf
    after = [status for t, status in arrivals if t >= since]
    times = [t for t in let_through if t >= since]
    per_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    return per_s, after.count(429), len(after)


def stopped_within(stops: list[tuple[float, float]], outcome: Outcome) -> float:
    """Seconds the client was stopped between the simulator's first request and its last answer."""
    if not outcome.arrivals:
        return 0.0
    start = outcome.arrivals[0][0]
    end = start + outcome.span_s
    return sum(max(0.0, min(went_on, end) - max(stopped, start)) for stopped, went_on in stops)


def kept(case: Case, outcome: Outcome, stops: list[tuple[float, float]]) -> Kept:
    if case.settles:
        per_s, refused, requests = settled(outcome.arrivals, SETTLE_S)
    else:
        running_s = outcome.span_s - stopped_within(stops, outcome)
        per_s = outcome.answered / running_s if running_s > 0 else 0.0
        refused, requests = outcome.rate_limited, len(outcome.arrivals)
    return Kept(per_s, per_s / (case.allowed_rpm / 60), refused, requests)


def under(case: Case, sim: SimulatorProcess, run: Callable[..., Outcome]) -> tuple[Outcome, Kept]:
    """One client's run (`run(started=...)`) under the case: stalled if it says so, and how it kept to the limit."""
    with Stalls(sim, case.stall_points()) as stalls:
        outcome = run(started=stalls.start)
    return outcome, kept(case, outcome, stalls.stops)


def kept_text(case: Case, got: Kept) -> str:
    if case.settles:
        return (f"{got.share:.1%} of the limit once settled ({got.per_s:.1f}/s), "
                f"{got.refused / max(got.requests, 1):.1%} 429s ({got.refused} of {got.requests})")
    return f"{got.share:.1%} of the limit ({got.per_s:.1f}/s), {got.refused} 429s"


def minutes_crossed(outcome: Outcome) -> int:
    """Whole minutes of the clock begun between the run's first request and its last (the
    simulator's fixed windows reset at each); its log times are monotonic, on this machine's clock."""
    to_wall = time.time() - time.monotonic()
    times = [t for t, _ in outcome.arrivals]
    return math.floor((max(times) + to_wall) / 60) - math.floor((min(times) + to_wall) / 60) if times else 0


def requests_figure(sim: SimulatorProcess, work: Path, case: Case, manifest: Path, checks: Checks) -> Figure:
    configure(sim, case.simulator)
    mine, got = under(case, sim, functools.partial(ours, sim, work, f"p2-{case.key}", manifest,
                                                   requests_per_minute=case.configured_rpm))
    said = kept_text(case, got) + checks.complete(mine, case.rows)
    if case.simulator.get("limit_mode") == "fixed_minute":
        said += f"; the run took {mine.span_s:.0f} s, minute boundaries crossed: {minutes_crossed(mine)}"
    theirs = [baseline_text(sim, work, case, client, manifest)
              for client in (["openai", "litellm-router"] if case.router else ["openai"])]
    return Figure(f"P2 rate-limit fidelity, requests, {case.name}",
                  f"{case.target()} ({case.setting}; {case.rows:,} rows)", said, "; ".join(theirs), "-",
                  case.met(got))


def baseline_text(sim: SimulatorProcess, work: Path, case: Case, client: str, manifest: Path) -> str:
    """A baseline's run under the case, in words (or why it was skipped)."""
    outcome, got = under(case, sim, functools.partial(baseline, sim, work, client, manifest, 64,
                                                      rpm=case.configured_rpm))
    return outcome.skipped or f"{BASELINE_NAMES[client]}: {kept_text(case, got)}, {outcome.ok} of {case.rows} ok"


def tokens_figure(sim: SimulatorProcess, work: Path, rows: int, checks: Checks) -> Figure:
    heavy = small_images(work / "heavy", rows, size=(512, 512))
    per_request = 255 + 9 + MAX_TOKENS  # gpt-4o, one 512x512 tile + base, the prompt, max_tokens
    tpm = per_request * 100 * 60  # about 100 requests a second
    configure(sim, {"tokens_per_minute": tpm})
    mine = ours(sim, work, "p2-tpm", heavy, tokens_per_minute=tpm)
    flag = checks.complete(mine, rows)
    share = mine.tokens / mine.span_s / (tpm / 60) if mine.span_s else 0.0
    return Figure(
        "P2 rate-limit fidelity, tokens", f"≥ 97% of {tpm:,} TPM and 0 429s (512×512 images, {rows} rows)",
        f"{share:.1%} of the limit, {mine.rate_limited} 429s{flag}", "-", "-",
        share >= 0.97 and mine.rate_limited == 0)


def fidelity(work: Path, sizes: Sizes, checks: Checks) -> list[Figure]:
    images = small_images(work / "small", sizes.overhead_rows)
    with SimulatorProcess() as sim:
        figures = [requests_figure(sim, work, case, write_manifest_like(images, case.rows, work / "small" /
                                                                        f"first-{case.rows}.csv"), checks)
                   for case in request_cases(sizes)]
        figures.append(tokens_figure(sim, work, sizes.token_rows, checks))
    return figures


def write_manifest_like(manifest: Path, n: int, path: Path) -> Path:
    pl.read_csv(manifest).head(n).write_csv(path)
    return path


def latency_bound(work: Path, sizes: Sizes, checks: Checks) -> list[Figure]:
    n, concurrency, latency = sizes.latency_rows, 256, 0.3
    manifest = write_manifest_like(small_images(work / "small", sizes.overhead_rows), n,
                                   work / "small" / f"first-{n}.csv")
    ceiling = concurrency / latency
    with simulated(latency_s=latency) as sim:
        mine = ours(sim, work, "p3", manifest, concurrency=concurrency)
        runs = [baseline(sim, work, c, manifest, concurrency) for c in ("openai", "litellm")]
    flag = checks.complete(mine, n)
    share = mine.rate / ceiling
    theirs = "; ".join(o.skipped or f"{o.client}: {o.rate / ceiling:.0%} ({o.rate:.0f} rows/s)" for o in runs)
    best = max(o.rate for o in runs)
    cores = (mine.finished.cpu_s + mine.simulator_cpu_s) / mine.span_s if mine.span_s else 0.0
    return [Figure(
        "P3 latency-bound", f"≥ 90% of C/L = {ceiling:.0f} rows/s (latency 0.3 s, C=256, {n} rows)",
        f"{share:.0%} ({mine.rate:.0f} rows/s; CPU {mine.cpu_ms_per_row():.2f} ms/row, simulator "
        f"{mine.simulator_cpu_s / max(mine.rows, 1) * 1000:.2f}){flag}", theirs,
        f"{mine.rate / best:.2f}× the best" if best else "-", share >= 0.9,
        "" if share >= 0.9 else f"limited by CPU: client and simulator together kept {cores:.2f} of the 2 cores "
                                "busy for the whole run; every row costs both a request's CPU here")]


MANIFEST_PASS = """
import sys
from pathlib import Path
from pipeline import config
from pipeline.manifest import Manifest
cfg = config.load(sys.argv[1])
manifest = Manifest(cfg.input, cfg.prompt)
manifest.count()
sum(len(batch) for batch in manifest.batches(limit=int(sys.argv[2])))
"""


def memory(work: Path, sizes: Sizes, checks: Checks) -> list[Figure]:
    small_rows, big_rows = sizes.memory_rows
    answered = sizes.memory_answered
    peaks, passes = {}, {}
    with simulated() as sim:
        for rows in (small_rows, big_rows):
            manifest = shared_images_manifest(work / "shared", rows)
            outcome = ours(sim, work, f"p4-{rows}", manifest, "--limit", str(answered))
            checks.complete(outcome, answered)
            peaks[rows] = outcome.finished.peak_rss_mb
            alone = run_to_exit([sys.executable, "-c", MANIFEST_PASS, str(work / f"p4-{rows}.yaml"), str(answered)],
                                work / f"p4-pass-{rows}.log")
            passes[rows] = alone.peak_rss_mb
    growth = peaks[big_rows] / peaks[small_rows]
    met = growth <= 1.2 and peaks[big_rows] <= 300
    return [Figure(
        "P4 memory", f"peak RSS grows ≤ 1.2× from {small_rows:,} to {big_rows:,} manifest rows, ≤ 300 MB "
                     f"({answered} rows answered in both)",
        f"{peaks[small_rows]:.0f} MB → {peaks[big_rows]:.0f} MB", "-", f"{growth:.2f}×", met,
        "" if met else f"the growth is Polars' one pass over the manifest (counting it, hashing every row's id, "
                       f"dropping repeated ids): that pass alone peaks at {passes[small_rows]:.0f} → "
                       f"{passes[big_rows]:.0f} MB")]


# --- the table --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes_given = parser.add_mutually_exclusive_group()
    sizes_given.add_argument("--quick", action="store_true", help="small sizes, to try the script")
    sizes_given.add_argument("--smoke", action="store_true", help="tiny sizes: does every measurement run to its end?")
    parser.add_argument("--out", type=Path, help=f"write the table here (default: {RESULTS.relative_to(REPO)}, "
                                                 "but not with --quick or --smoke)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else QUICK if args.quick else Sizes()
    out = args.out or (None if args.quick or args.smoke else RESULTS)
    started = time.perf_counter()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    checks = Checks()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="annotate-bench-") as tmp:
        work = Path(tmp)
        measures: list[Callable[[], list[Figure]]] = [
            lambda: overhead(work, sizes, checks), lambda: fidelity(work, sizes, checks),
            lambda: latency_bound(work, sizes, checks), lambda: memory(work, sizes, checks),
            lambda: resume_1m.figures(work / "resume", sizes.resume),
            lambda: image_stage.figures(work / "images", sizes.images),
            lambda: estimate_1m.figures(work / "estimate", sizes.estimate),
            lambda: ray_prep.to_figures(ray_prep.measure(work / "ray", sizes.ray)),
            lambda: buckets.figures(work / "buckets", sizes.buckets),
            lambda: view_1m.figures(work / "view", sizes.view)]
        for i, measure in enumerate(measures, 1):
            try:
                done = measure()
            except Exception as exc:  # one broken measurement must not lose the others
                checks.problems.append(f"measurement {i} failed: {exc!r}")
                done = []
            figures += done
            print(f"bench: {i} of {len(measures)} done at {time.perf_counter() - started:.0f} s\n"
                  f"{results_table(done)}", file=sys.stderr)
    command = shlex.join(["make", "bench"] if os.environ.get("MAKELEVEL") else [sys.executable, *sys.argv])
    text = (f"# Benchmark results\n\nMachine: {machine()}  \nDate: {when}  \nCommand: `{command}` "
            f"({time.perf_counter() - started:.0f} s in all)\n\nEvery figure against the bundled simulator on "
            "127.0.0.1, measured in this one run; rates count from the simulator's first request to its last "
            "answer. See `tests/benchmarks/suite.py` for how each is measured.\n\n" + results_table(figures) + "\n")
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"written to {out}", file=sys.stderr)
    for problem in checks.problems:
        print(f"bench: WRONG OUTPUT: {problem}", file=sys.stderr)
    return 1 if checks.problems else 0


if __name__ == "__main__":
    sys.exit(main())
