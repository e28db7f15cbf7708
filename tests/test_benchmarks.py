"""Every benchmark script runs to its end at a tiny size (--smoke), started as `make bench` or a
person starts it. Only that is checked: exit 0, which a script gives only when its own checks of
its output held (every row answered and ok, the estimate's counts, the resumed run's first
request). Their timings mean nothing at this size and are not looked at."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "tests" / "benchmarks"
SCRIPTS = ("suite.py", "resume_1m.py", "image_stage.py", "estimate_1m.py", "ray_prep.py", "buckets.py", "view_1m.py")
ON_RAY = {"suite.py", "ray_prep.py"}  # P8 runs on a one-machine Ray of its own
DEADLINE_S = 600  # far beyond a run on a slow machine: only a hung script meets it


@dataclass
class Ran:
    returncode: int
    output: str  # stdout and stderr together


@dataclass
class Smoke:
    runs: dict[str, Ran]
    results: Path  # where the suite was told to write its table


def _start(script: str, work: Path, results: Path) -> subprocess.Popen[bytes]:
    extra = ["--out", str(results)] if script == "suite.py" else []
    # this checkout's pipeline, in the scripts and in every process they start, even when the
    # venv was installed from another checkout (a git worktree sharing it)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(work / f"{script}.log", "wb") as log:
        return subprocess.Popen([sys.executable, str(BENCHMARKS / script), "--smoke", *extra], stdout=log,
                                stderr=subprocess.STDOUT, cwd=work, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Smoke:
    """The scripts run all at once: they mostly wait, on the processes they start and on Ray,
    so side by side they take little longer than the slowest alone."""
    work = tmp_path_factory.mktemp("bench")
    results = work / "RESULTS.md"
    ray = importlib.util.find_spec("ray") is not None
    started = {script: _start(script, work, results) for script in SCRIPTS if ray or script not in ON_RAY}
    try:
        codes = {script: proc.wait(timeout=DEADLINE_S) for script, proc in started.items()}
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    runs = {script: Ran(code, (work / f"{script}.log").read_text(errors="replace")) for script, code in codes.items()}
    return Smoke(runs, results)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_benchmark_script_runs_to_its_end_at_a_tiny_size(smoke: Smoke, script: str) -> None:
    if script not in smoke.runs:
        pytest.skip("needs ray (the ray extra)")
    ran = smoke.runs[script]
    assert ran.returncode == 0, ran.output[-4000:]


def test_the_suite_writes_a_row_of_every_measurement_where_it_is_told(smoke: Smoke) -> None:
    if "suite.py" not in smoke.runs:
        pytest.skip("needs ray (the ray extra)")
    table = smoke.results.read_text(encoding="utf-8")
    assert [n for n in range(1, 11) if f"\n| P{n} " not in table] == []
