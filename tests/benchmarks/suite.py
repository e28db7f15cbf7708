"""`make bench`: every target of the performance issue, measured in one run against the bundled
simulator on 127.0.0.1, side by side with what users would otherwise run; one table, printed
and written to benchmarks/RESULTS.md.

P1-P4 are here; P5 (resume), P6 (image preparation), P7 (estimate at scale) and P8 (image
preparation on Ray) come from resume_1m.py, image_stage.py, estimate_1m.py and ray_prep.py. The simulator runs in a thread of this
process, so its log times every request: rates are counted from its first request to its
last answer, alike for every client. Each client is a subprocess spawned through the
launcher in common.py, which reports its CPU and peak RSS alone.

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
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml
from PIL import Image

import baselines
import estimate_1m
import image_stage
import ray_prep
import resume_1m
from common import ANNOTATE, KEY_ENV, Figure, Finished, child_env, machine, results_table, run_to_exit
from pipeline import simulator
from pipeline.config import SimulatorSettings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BASELINES = HERE / "baselines.py"
MODEL = "gpt-4o"
MAX_TOKENS = 50


@dataclass
class Sizes:
    overhead_rows: int = 5000  # P1
    limit_rows: int = 3000  # P2, requests per minute
    token_rows: int = 1500  # P2, tokens per minute
    latency_rows: int = 5000  # P3
    memory_rows: tuple[int, int] = (100_000, 1_000_000)  # P4 manifests
    memory_answered: int = 2000  # P4: rows answered in both
    resume: resume_1m.Scale = resume_1m.FULL  # P5
    images: image_stage.Scale = image_stage.FULL  # P6
    estimate: estimate_1m.Scale = estimate_1m.FULL  # P7
    ray: ray_prep.Scale = ray_prep.FULL  # P8


QUICK = Sizes(1000, 600, 300, 1000, (10_000, 100_000), 500)

SMOKE = Sizes(overhead_rows=20, limit_rows=20, token_rows=10, latency_rows=20, memory_rows=(200, 2_000),
              memory_answered=10, resume=resume_1m.SMOKE, images=image_stage.SMOKE, estimate=estimate_1m.SMOKE,
              ray=ray_prep.SMOKE)


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
    simulator_cpu_s: float
    skipped: str = ""  # why this client did not run, if it did not

    @property
    def rate(self) -> float:
        return self.answered / self.span_s if self.span_s else 0.0

    def cpu_ms_per_row(self) -> float:
        return self.finished.cpu_s / max(self.rows, 1) * 1000


def served(sim: simulator.Simulator, client: str, rows: int, ok: int, finished: Finished,
           simulator_cpu_s: float) -> Outcome:
    log = sim.requests()
    answered = [e for e in log if e.status == 200]
    span = max(e.answered_at for e in answered) - min(e.time for e in log) if answered else 0.0
    tokens = sum(e.usage["prompt_tokens"] + MAX_TOKENS * (e.body or {}).get("n", 1) for e in answered if e.usage)
    return Outcome(client, rows, ok, finished, span, len(answered), sum(e.status == 429 for e in log), tokens,
                   simulator_cpu_s)


def ours(sim: simulator.Simulator, work: Path, name: str, manifest: Path, *extra: str, journal: bool = True,
         **limits: int) -> Outcome:
    sim.reset()
    out = work / f"out-{name}"
    config = write_config(work / f"{name}.yaml", manifest, sim.url, out, journal, **limits)
    cpu = time.process_time()  # this process only waits: its CPU is the simulator's
    finished = run_to_exit([ANNOTATE, "run", str(config), "-q", *extra], work / f"{name}.log")
    cpu = time.process_time() - cpu
    frame = pl.read_parquet(out / "*.parquet")
    return served(sim, "annotate", frame.height, frame.filter(pl.col("status") == "ok").height, finished, cpu)


def baseline(sim: simulator.Simulator, work: Path, client: str, manifest: Path, concurrency: int) -> Outcome:
    if missing := baselines.not_installed(client):
        print(f"bench: the {client} baseline is skipped: {missing} is not installed (the bench extra)",
              file=sys.stderr)
        return Outcome(client, 0, 0, Finished(0.0, 0.0, 0.0, 0, ""), 0.0, 0, 0, 0, 0.0,
                       skipped=f"{client}: skipped, {missing} is not installed")
    sim.reset()
    out = work / f"{client}-{concurrency}.parquet"
    env = {**child_env(), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cpu = time.process_time()
    finished = run_to_exit([sys.executable, str(BASELINES), client, "--base-url", sim.url, "--manifest",
                            str(manifest), "--concurrency", str(concurrency), "--out", str(out),
                            "--model", MODEL, "--max-tokens", str(MAX_TOKENS)],
                           work / f"{client}-{concurrency}.log", env=env, timeout_s=600)
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


def fidelity(work: Path, sizes: Sizes, checks: Checks) -> list[Figure]:
    n = sizes.limit_rows
    manifest = small_images(work / "small", sizes.overhead_rows)
    limited = write_manifest_like(manifest, n, work / "small" / f"first-{n}.csv")
    with simulated(requests_per_minute=6000) as sim:
        mine = ours(sim, work, "p2-rpm", limited, requests_per_minute=6000)
        theirs = baseline(sim, work, "openai", limited, 64)
    flag = checks.complete(mine, n)
    share = mine.rate / 100
    figures = [Figure(
        "P2 rate-limit fidelity, requests", "≥ 97% of 6,000 RPM and 0 429s (simulator: 100/s; 3,000 rows)",
        f"{share:.1%} of the limit ({mine.rate:.1f}/s), {mine.rate_limited} 429s{flag}",
        f"`AsyncOpenAI` loop: {theirs.rate / 100:.1%}, {theirs.rate_limited} 429s, {theirs.ok} of {n} ok",
        "-", share >= 0.97 and mine.rate_limited == 0)]

    t = sizes.token_rows
    heavy = small_images(work / "heavy", t, size=(512, 512))
    per_request = 255 + 9 + MAX_TOKENS  # gpt-4o, one 512x512 tile + base, the prompt, max_tokens
    tpm = per_request * 100 * 60  # about 100 requests a second
    with simulated(tokens_per_minute=tpm) as sim:
        mine = ours(sim, work, "p2-tpm", heavy, tokens_per_minute=tpm)
    flag = checks.complete(mine, t)
    share = mine.tokens / mine.span_s / (tpm / 60) if mine.span_s else 0.0
    figures.append(Figure(
        "P2 rate-limit fidelity, tokens", f"≥ 97% of {tpm:,} TPM and 0 429s (512×512 images, {t} rows)",
        f"{share:.1%} of the limit, {mine.rate_limited} 429s{flag}", "-", "-",
        share >= 0.97 and mine.rate_limited == 0))
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
        measures = [lambda: overhead(work, sizes, checks), lambda: fidelity(work, sizes, checks),
                    lambda: latency_bound(work, sizes, checks), lambda: memory(work, sizes, checks),
                    lambda: resume_1m.figures(work / "resume", sizes.resume),
                    lambda: image_stage.figures(work / "images", sizes.images),
                    lambda: estimate_1m.figures(work / "estimate", sizes.estimate),
                    lambda: ray_prep.to_figures(ray_prep.measure(work / "ray", sizes.ray))]
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
