"""What the benchmark scripts share: where `annotate` is, the environment its processes get,
and the table they print. (Not collected by pytest: no test_ prefix.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def markdown(rows: list[Row]) -> str:
    lines = ["| figure | setting | value |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)
