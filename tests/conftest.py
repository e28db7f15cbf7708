"""Shared fixtures: a simulator on 127.0.0.1, generated images, configs in tmp_path."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from PIL import Image

from pipeline import simulator
from pipeline.config import SimulatorSettings
from pipeline.simulator import LogEntry

from .image_host import ImageHost, serving
from .s3_server import S3Server

if TYPE_CHECKING:
    # mypy knows tests/benchmarks/*.py by the bare names the benchmark scripts import them by
    # (pyproject.toml [tool.mypy]); one file may not be two modules to it
    from sim_process import SimulatorProcess
else:
    from .benchmarks.sim_process import SimulatorProcess

KEY_ENV = "ANNOTATE_TEST_KEY"
KEY = "sk-test-0123456789abcdef-secret"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture(scope="session")
def sim_server() -> Iterator[simulator.Simulator]:
    with simulator.running() as server:
        yield server


@pytest.fixture
def sim(sim_server: simulator.Simulator) -> simulator.Simulator:
    sim_server.reset()
    return sim_server


@pytest.fixture
def faulty_sim() -> Iterator[Callable[..., simulator.Simulator]]:
    """A simulator of its own with the given settings, stopped after the test."""
    stack: list[Any] = []

    def start(**settings: Any) -> simulator.Simulator:
        context = simulator.running(SimulatorSettings(**settings))
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def image_bytes(size: tuple[int, int] = (64, 48), colour: str | tuple[int, int, int] = "red",
                fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def images(tmp_path: Path) -> Callable[..., list[str]]:
    """Writes n distinct images under tmp_path/images and returns their relative paths."""

    def make(n: int, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> list[str]:
        folder = tmp_path / "images"
        folder.mkdir(exist_ok=True)
        names = []
        for i in range(n):
            name = f"img{i:04d}.{fmt.lower()}"
            (folder / name).write_bytes(image_bytes(size, (i * 7 % 256, i * 13 % 256, i * 29 % 256), fmt))
            names.append(f"images/{name}")
        return names

    return make


def body_of(entry: LogEntry) -> dict[str, Any]:
    """The body of a request the simulator logged; only one it could not read has none."""
    assert entry.body is not None, entry
    return entry.body


def usage_of(entry: LogEntry) -> dict[str, Any]:
    """The usage the simulator answered a request with; one it did not answer has none."""
    assert entry.usage is not None, entry
    return entry.usage


NAMED = {"user": "Describe {name}."}  # a prompt that carries each image's name, so sim.plan() can find it


def named(paths: list[str]) -> list[dict[str, str]]:
    """Manifest rows whose prompt (with NAMED) names the image: img0003 for images/img0003.png."""
    return [{"image": p, "name": Path(p).stem} for p in paths]


def write_manifest(tmp_path: Path, rows: list[dict[str, Any]], name: str = "manifest.csv") -> Path:
    import polars as pl

    path = tmp_path / name
    frame = pl.DataFrame(rows)
    writers: dict[str, Callable[[Path], object]] = {
        ".csv": frame.write_csv, ".parquet": frame.write_parquet, ".jsonl": frame.write_ndjson}
    writers[path.suffix](path)
    return path


def write_config(tmp_path: Path, base_url: str, manifest: Path | str, **sections: Any) -> Path:
    """A config file for a run against `base_url`; mappings are merged over the defaults, other
    values (a list of endpoints) replace them, and None drops a section."""
    data: dict[str, Any] = {
        "input": {"manifest": str(manifest)},
        "endpoint": {"base_url": base_url, "api_key_env": KEY_ENV, "timeout_s": 5},
        "request": {"model": "gpt-4o", "max_tokens": 50},
        "limits": {"concurrency": 8, "max_attempts": 4},
        "output": {"dir": str(tmp_path / "out")},
    }
    for name, values in sections.items():
        if values is None:
            data.pop(name, None)
        else:
            data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def serve() -> Iterator[Any]:
    """Starts a simulator process with the given settings; stopped after the test."""
    started: list[SimulatorProcess] = []

    def start(**settings: Any) -> SimulatorProcess:
        started.append(SimulatorProcess(**settings))
        return started[-1]

    yield start
    for sim in started:
        sim.__exit__(None, None, None)


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    """An image host on 127.0.0.1 that misbehaves as real ones do (tests/image_host.py)."""
    with serving() as host:
        yield host


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API server on 127.0.0.1 (tests/s3_server.py), one for the session."""
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A new bucket's URL, with the environment a user sets for an S3-compatible endpoint, and a
    cache folder (where an output's journal in a bucket lives) of the test's own."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return f"s3://{s3_server.new_bucket()}"
