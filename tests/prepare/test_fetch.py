"""Remote images fetched from a real HTTP server on 127.0.0.1 that misbehaves as image hosts do:
slow, flaky with Retry-After, redirecting, missing, serving HTML, hanging, huge, and saying
X-Robots-Tag: noai."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import cli
from pipeline.config import FetchConfig
from pipeline.cost import tokens
from pipeline.errors import RowInputError
from pipeline.fetch import Fetcher
from pipeline.simulator import Simulator

from ..conftest import body_of, write_config, write_manifest
from ..image_host import HUGE, PHOTO, ImageHost, jpeg


def fetch(url: str, **settings: Any) -> bytes:
    async def once() -> bytes:
        fetcher = Fetcher(FetchConfig(**settings))
        try:
            return await fetcher.fetch(url)
        finally:
            await fetcher.aclose()
    return asyncio.run(once())


def test_no_more_than_per_host_requests_at_once(image_host: ImageHost) -> None:
    async def many() -> None:
        fetcher = Fetcher(FetchConfig(per_host=3))
        try:
            found = await fetcher.fetch_all([f"{image_host.url}/ok/{k}.jpg?sleep=0.2" for k in range(12)])
        finally:
            await fetcher.aclose()
        assert len(found) == 12 and all(data == jpeg() for data in found.values())
    asyncio.run(many())
    assert 2 <= image_host.most_in_flight <= 3


@pytest.mark.parametrize("status", [503, 429])
def test_a_refusal_with_retry_after_is_asked_again_after_waiting_as_told(image_host: ImageHost, status: int) -> None:
    assert fetch(f"{image_host.url}/flaky/a.jpg?status={status}") == jpeg()
    first, second = image_host.times("/flaky/a.jpg")
    assert second - first >= 0.95  # Retry-After: 1


def test_a_host_that_stays_down_is_a_retryable_error_after_max_attempts(image_host: ImageHost) -> None:
    with pytest.raises(RowInputError, match=r"down/a.jpg: HTTP 503 Service Unavailable \(2 attempts\)") as caught:
        fetch(f"{image_host.url}/down/a.jpg", max_attempts=2)
    assert caught.value.retryable and len(image_host.times("/down/a.jpg")) == 2


def test_a_url_with_its_scheme_in_capitals_is_fetched_too(image_host: ImageHost) -> None:
    async def fetched() -> dict[str, bytes]:
        fetcher = Fetcher(FetchConfig())
        try:
            return dict(await fetcher.fetch_all([image_host.url.replace("http://", "HTTP://") + "/ok/caps.jpg"]))
        finally:
            await fetcher.aclose()
    assert list(asyncio.run(fetched()).values()) == [jpeg()]


def test_a_redirect_is_followed(image_host: ImageHost) -> None:
    assert fetch(f"{image_host.url}/moved/a.jpg") == jpeg()
    assert image_host.times("/ok/moved.jpg")


def test_a_404_is_final_and_asked_once(image_host: ImageHost) -> None:
    with pytest.raises(RowInputError, match="HTTP 404 Not Found") as caught:
        fetch(f"{image_host.url}/nowhere/a.jpg")
    assert not caught.value.retryable and len(image_host.times("/nowhere/a.jpg")) == 1


def test_a_hanging_host_times_out_as_a_retryable_error(image_host: ImageHost) -> None:
    started = time.monotonic()
    with pytest.raises(RowInputError, match=r"no answer within input.fetch.timeout_s \(0.3 s\) \(2 attempts\)") as caught:
        fetch(f"{image_host.url}/hang/a.jpg", timeout_s=0.3, max_attempts=2)
    assert caught.value.retryable and time.monotonic() - started < 10


def test_a_huge_body_is_not_downloaded_past_max_bytes(image_host: ImageHost) -> None:
    with pytest.raises(RowInputError, match=r"longer than input.fetch.max_bytes \(1000000\); stopped reading"):
        fetch(f"{image_host.url}/huge/a.jpg", max_bytes=1_000_000)
    assert image_host.huge_sent < HUGE // 4  # the server was stopped early, not read to the end
    with pytest.raises(RowInputError, match=f"{HUGE} bytes, over input.fetch.max_bytes"):
        fetch(f"{image_host.url}/huge/b.jpg?length=1", max_bytes=1_000_000)  # refused by its Content-Length


def test_noai_is_respected_unless_turned_off_and_the_user_agent_names_the_tool(image_host: ImageHost) -> None:
    with pytest.raises(RowInputError, match="X-Robots-Tag says noai") as caught:
        fetch(f"{image_host.url}/noai/a.jpg", user_agent="mailto:data@example.org")
    assert not caught.value.retryable
    assert fetch(f"{image_host.url}/noai/a.jpg", respect_robots=False) == jpeg()
    assert image_host.agents[0].startswith("annotate-pipeline/") and "(+mailto:data@example.org)" in image_host.agents[0]


def test_a_run_inlines_remote_images_and_names_each_failure(sim: Simulator, image_host: ImageHost,
                                                             tmp_path: Path) -> None:
    urls = {name: f"{image_host.url}/{name}/x.jpg" for name in ("ok", "moved", "nowhere", "html", "noai", "down")}
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": url} for url in urls.values()]),
                       input={"keep_columns": ["image"], "fetch": {"max_attempts": 2}})
    assert cli.main(["run", str(cfg), "-q"]) == 1
    out = {row["image"]: row for row in pl.read_parquet(tmp_path / "out" / "*.parquet").iter_rows(named=True)}
    assert [out[urls[k]]["status"] for k in ("ok", "moved")] == ["ok", "ok"]
    sent = [body_of(e)["messages"][0]["content"][1]["image_url"]["url"] for e in sim.log]
    assert len(sent) == 2 and all(url.startswith("data:image/jpeg;base64,") for url in sent)  # inlined
    expected = {"nowhere": ("HTTP 404 Not Found", False), "html": ("is not an image (it is HTML or XML text)", False),
                "noai": ("X-Robots-Tag says noai", False), "down": ("HTTP 503 Service Unavailable (2 attempts)", True)}
    for name, (cause, retryable) in expected.items():
        row = out[urls[name]]
        assert row["error"].startswith(f"image: {urls[name]}") and cause in row["error"], row["error"]
        assert row["retryable"] is retryable


def test_the_estimate_reads_remote_headers_only_and_agrees_with_the_run(sim: Simulator, image_host: ImageHost,
                                                                        tmp_path: Path,
                                                                        capfd: pytest.CaptureFixture[str]) -> None:
    names = ("photo", "ok", "moved", "nowhere", "html", "noai", "huge")
    rows = [{"image": f"{image_host.url}/{name}/x.jpg"} for name in names]
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, rows), prompt={"max_side": 500})
    assert cli.main(["estimate", str(cfg), "--json"]) == 0
    estimate = json.loads(capfd.readouterr().out)
    assert (estimate["rows"], estimate["images"], estimate["unreadable_rows"]) == (3, 3, 4)
    assert image_host.huge_sent < 4 * 1024 * 1024 and len(PHOTO) > 65_536  # only first bytes were read
    assert set(image_host.ranges) == {"bytes=0-65535"}

    local = tmp_path / "photo.jpg"
    local.write_bytes(PHOTO)
    same = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": str(local)}]), prompt={"max_side": 500})
    assert cli.main(["estimate", str(same), "--json"]) == 0
    alone = json.loads(capfd.readouterr().out)["input_tokens"]["image"]
    assert alone == tokens.image_tokens("gpt-4o", 500, 250, "auto")
    assert estimate["input_tokens"]["image"] == alone + 2 * tokens.image_tokens("gpt-4o", 64, 48, "auto")


def test_with_remote_pass_an_image_the_provider_cannot_download_is_asked_again_inlined(
        faulty_sim: Callable[..., Simulator], image_host: ImageHost, tmp_path: Path) -> None:
    sim = faulty_sim(download_urls=True)  # fetches image URLs as OpenAI does, 400 when it cannot
    urls = {name: f"{image_host.url}/{name}/x.jpg" for name in ("ok", "hotlink", "nowhere")}
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": url} for url in urls.values()]),
                       input={"keep_columns": ["image"], "remote": "pass"})
    assert cli.main(["run", str(cfg), "-q"]) == 1
    out = {row["image"]: row for row in pl.read_parquet(tmp_path / "out" / "*.parquet").iter_rows(named=True)}
    assert out[urls["ok"]]["status"] == out[urls["hotlink"]]["status"] == "ok"
    answered = sorted(body_of(e)["messages"][0]["content"][1]["image_url"]["url"][:23]
                      for e in sim.log if e.status == 200)
    assert answered == ["data:image/jpeg;base64,", urls["ok"][:23]]  # hotlink inlined once refused; ok fetched there
    assert sorted(e.status for e in sim.log) == [200, 200, 400, 400]  # hotlink and nowhere could not be downloaded
    assert out[urls["nowhere"]]["error"] == f"image: {urls['nowhere']}: HTTP 404 Not Found"
