"""What the benchmark scripts share: where `annotate` is, the environment its processes get,
and the tables they print. (Not collected by pytest: no test_ prefix.)"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
S = TypeVar("S")  # a script's scale: the sizes it measures at

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent  # .venv/bin: `annotate` sits next to this interpreter
ANNOTATE = str(BIN / "annotate")
KEY_ENV = "ANNOTATE_BENCH_KEY"

Row = tuple[str, str, str]  # figure | setting | value


def child_env() -> dict[str, str]:
    """The environment for the subprocesses: a key, and no proxy, so nothing leaves 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    # Importing Polars here set its allocator settings in this process's environment; a run
    # started from a shell has none of them, so neither do the runs measured.
    env.pop("_RJEM_MALLOC_CONF", None)
    env[KEY_ENV] = "sk-bench-not-a-real-key"
    env["NO_PROXY"] = env["no_proxy"] = f"{HOST},localhost"
    return env


# A bare interpreter (-S) that spawns the command, prints its pid, waits for it with wait4 and
# prints the child's wall time, CPU and ru_maxrss. Why not wait4 from the benchmark itself: on
# Linux a child's ru_maxrss starts at the peak RSS of the process it was spawned from (the pre-exec
# high-water mark carries over), and a benchmark holding a large setup would inflate every
# child's figure. The launcher's own peak (about 10 MB) is the floor of what it reports.
LAUNCHER = r"""
import json, os, sys, time
command, log = json.loads(sys.argv[1]), sys.argv[2]
files = [(os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), (os.POSIX_SPAWN_DUP2, 1, 2)]
started = time.perf_counter()
pid = os.posix_spawn(command[0], command, os.environ, file_actions=files)
print(json.dumps({"pid": pid}), flush=True)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
print(json.dumps({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "returncode": os.waitstatus_to_exitcode(status)}))
"""


@dataclass
class Finished:
    wall_s: float  # spawn to exit, timed by the launcher
    peak_rss_mb: float  # ru_maxrss of this child alone
    cpu_s: float  # user + system CPU of this child
    returncode: int
    output: str  # stdout and stderr together


def run_to_exit(command: list[str], log_path: Path, env: dict[str, str] | None = None,
                timeout_s: float = 300, started: Callable[[int], object] | None = None) -> Finished:
    """Run a command to its end through the launcher: wall time, peak RSS and CPU of it alone.
    `started`, if given, is called with the command's pid once it runs (to signal it)."""
    launch = [sys.executable, "-S", "-c", LAUNCHER, json.dumps(command), str(log_path)]
    with subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env or child_env()) as launcher:
        try:
            pid = json.loads(launcher.stdout.readline())["pid"]  # type: ignore[union-attr]
            if started is not None:
                started(pid)
            out, err = launcher.communicate(timeout=timeout_s)
        except BaseException:
            launcher.kill()
            raise
    if launcher.returncode:
        raise subprocess.CalledProcessError(launcher.returncode, launcher.args, out, err)
    got = json.loads(out)
    return Finished(got["wall_s"], got["maxrss_kb"] / 1024, got["cpu_s"], got["returncode"],
                    log_path.read_text(errors="replace").strip())


def markdown(rows: list[Row]) -> str:
    lines = ["| figure | setting | value |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Figure:
    """One row of the results table: a target of the performance issue and how it went.
    `met` is None for a figure that has no target of its own (a ceiling, a breakdown);
    `note` says, with figures, what limits a target that is not met."""

    figure: str  # "P6 image preparation"
    target: str  # "≥ 2× naive Pillow per core; PSNR ≥ 35 dB"
    ours: str
    baseline: str = "-"
    ratio: str = "-"
    met: bool | None = None
    note: str = ""


def results_table(figures: list[Figure]) -> str:
    """The Markdown table of figures: figure, target, ours, baseline, ratio, met."""
    verdict = {True: "yes", False: "**no**", None: "-"}
    lines = ["| figure | target | ours | baseline | ratio | met |", "| --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        ours = f"{f.ours}<br>{f.note}" if f.note else f.ours
        lines.append(f"| {f.figure} | {f.target} | {ours} | {f.baseline} | {f.ratio} | {verdict[f.met]} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} CPUs ({cpu}), {mem / 1024:.1f} GB RAM, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}"


def standalone(measure: Callable[[Path, S], T], to_figures: Callable[[T], list[Figure]],
               problems: Callable[[T], list[str]], full: S, smoke: S) -> int:
    """One benchmark script run on its own: measure in a temporary directory, print the command,
    the date, the machine and the table; exit 1 when one of its checks failed. With --smoke it
    measures at the tiny scale `smoke`: the checks still hold, the figures mean nothing."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: does the script run to its end?")
    scale = smoke if parser.parse_args().smoke else full
    started = time.perf_counter()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    with tempfile.TemporaryDirectory(prefix="annotate-bench-") as tmp:
        measured = measure(Path(tmp), scale)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}  (cwd {Path.cwd()})")
    print(f"date: {when}; {machine()}; whole script {time.perf_counter() - started:.0f} s\n")
    print(results_table(to_figures(measured)))
    return 1 if problems(measured) else 0
