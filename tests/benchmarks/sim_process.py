"""The bundled simulator in a process of its own, for the tests and benchmarks that count what it
let through and when: in their process, a pause of its garbage collector (tens of ms, over a
heap of pytest or the benchmark suite, Polars and earlier runs) holds arrivals back and then
times them as one burst, which a provider's gateway would not. The child keeps its collector
off while clients run: its heap only grows by its log, and a reset (between runs) clears the
log and collects. Here rather than beside the tests so that both tests/request/test_rate_fidelity.py
and tests/benchmarks/suite.py import it."""

from __future__ import annotations

import gc
import multiprocessing
import threading
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from pipeline import simulator
from pipeline.config import SimulatorSettings
from pipeline.simulator import LogEntry


def _serve(conn: Connection, settings: dict[str, Any]) -> None:
    gc.disable()
    with simulator.running(SimulatorSettings(**settings)) as sim:
        conn.send(sim.url)
        while True:
            command, argument = conn.recv()
            if command == "log":
                conn.send(sim.requests())
            elif command == "count":
                conn.send(len(sim.log))
            elif command == "set":
                sim.settings = sim.settings.model_copy(update=argument)
                conn.send(True)
            elif command == "reset":
                sim.reset()
                gc.collect()  # no client runs now: a pause here times nothing
                conn.send(True)
            else:
                return


class SimulatorProcess:
    """`with SimulatorProcess(requests_per_minute=6000) as sim:` serves on 127.0.0.1 until the
    block ends; `sim.url`, `sim.requests()` (the log), `sim.seen()` (its length), `sim.update(...)`,
    `sim.reset()` (log, meters and plans cleared). Its methods may be called from any thread."""

    def __init__(self, **settings: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._lock = threading.Lock()  # one question and its answer at a time on the pipe
        self._process = context.Process(target=_serve, args=(child, settings), daemon=True)
        self._process.start()
        if not self._conn.poll(60):
            self._process.kill()
            raise RuntimeError("the simulator process did not start")
        self.url: str = self._conn.recv()

    def _ask(self, command: str, argument: Any = None) -> Any:
        with self._lock:
            self._conn.send((command, argument))
            return self._conn.recv()

    def requests(self) -> list[LogEntry]:
        return list(self._ask("log"))

    def seen(self) -> int:
        return int(self._ask("count"))

    def update(self, **changes: Any) -> None:
        self._ask("set", changes)

    def reset(self) -> None:
        self._ask("reset")

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._conn.send(("stop", None))
        self._process.join(timeout=15)
        if self._process.is_alive():
            self._process.kill()
