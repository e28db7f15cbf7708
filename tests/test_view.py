"""`annotate view` in a real browser: Debian's Chromium driven by Playwright, against the viewer
served on 127.0.0.1 over outputs of real runs (and one of 100,000 rows made here). Screenshots
are kept under tests/artifacts/ (not committed)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import random
import re
import shutil
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from pipeline import cli
from pipeline.config import RunConfig
from pipeline.simulator import Simulator
from pipeline.store.columns import COLUMNS
from pipeline.view.app import running
from pipeline.view.dataset import Output, Query

from .conftest import write_config, write_manifest
from .image_host import ImageHost

ARTIFACTS = Path(__file__).parent / "artifacts"
# As root on a machine without network: no sandbox, and none of Chromium's own connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
BIG = 100_000


def annotate(*args: str) -> int:
    """`annotate ARGS` from a thread of its own: Playwright's sync API keeps an event loop
    running in this one, and a run starts its own."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(cli.main, list(args)).result()


def chromium() -> str:
    found = os.environ.get("ANNOTATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("the viewer's tests need Chromium: apt-get install chromium (.ci/run does), "
                    "or set ANNOTATE_CHROMIUM to its path")
    return found


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Chromium for one test: Playwright's sync API runs an event loop in this thread while it
    is open, which would stop any later test that starts one here."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


def opened(browser: Browser, bypass_csp: bool) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=bypass_csp)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    yield page
    context.close()
    assert not problems, problems


@pytest.fixture
def page(browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Page]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # thumbnails of this test only
    # bypass_csp: Playwright's own waits evaluate script text, which the viewer's policy forbids
    yield from opened(browser, bypass_csp=True)


def shown_ids(page: Page) -> list[str]:
    return [str(i) for i in page.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.id)")]


def wait_for_thumbnails(page: Page) -> list[int]:
    """Every card's thumbnail loaded; their widths."""
    page.wait_for_function("[...document.querySelectorAll('.card .thumb img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    widths: list[int] = page.locator(".card .thumb img").evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    return widths


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


@pytest.fixture
def captioned(tmp_path: Path, faulty_sim: Callable[..., Simulator], images: Callable[..., list[str]]) -> pl.DataFrame:
    """A run over 30 images of 640x480 (sent at max_side 256): some answers empty or refusals, one row a 400."""
    sim = faulty_sim(rate_empty=0.12, rate_refusal=0.12, seed=5)
    sim.plan("img0007", [400])
    paths = images(30, size=(640, 480))
    manifest = write_manifest(tmp_path, [{"image": p, "name": Path(p).stem} for p in paths])
    cfg = write_config(tmp_path, sim.url, manifest, prompt={"user": "Describe {name}.", "max_side": 256})
    assert annotate("run", str(cfg), "-q") == 1  # the 400 row
    return pl.read_parquet(tmp_path / "out" / "*.parquet")


def test_the_grid_shows_every_image_and_answer_and_filters_and_sorting_narrow_it(
        captioned: pl.DataFrame, tmp_path: Path, page: Page) -> None:
    by_id = {row["id"]: row for row in captioned.iter_rows(named=True)}
    with running(tmp_path / "out") as url:
        page.goto(url)
        expect(page.locator("#range")).to_have_text("1–30 of 30 rows")
        assert sorted(shown_ids(page)) == sorted(by_id)
        for card in page.locator(".card").all():
            row = by_id[card.get_attribute("data-id") or ""]
            expected = (row["answer"] or "(empty answer)") if row["status"] == "ok" else row["error"]
            assert card.locator(".answer").text_content() == expected
        assert set(wait_for_thumbnails(page)) == {256}  # the images as sent, 256x192
        expect(page.locator("#summary-line")).to_contain_text("30 rows (1 error, 29 ok), 30 images")
        screenshot(page, "viewer-grid.png")

        refusals = captioned.filter(pl.col("flags").list.contains("refusal"))
        assert refusals.height >= 2
        page.select_option("select[name=flag]", "refusal")
        expect(page.locator("#range")).to_have_text(f"1–{refusals.height} of {refusals.height} rows")
        assert sorted(shown_ids(page)) == sorted(refusals["id"])
        expect(page.locator(".card .chip.flag").first).to_have_text("refusal")

        page.select_option("select[name=flag]", "")
        page.select_option("select[name=status]", "error")
        expect(page.locator("#range")).to_have_text("1–1 of 1 rows")
        expect(page.locator(".card .chip.error")).to_have_text("request")

        page.select_option("select[name=status]", "")
        named = next(row for row in by_id.values() if row["answer"] and "img00" in row["answer"])
        name = re.search(r"img\d{4}", named["answer"]).group(0)  # type: ignore[union-attr]
        page.fill("input[name=text]", name.upper())  # any case
        expect(page.locator(".card .answer")).to_have_text([named["answer"]])
        expect(page.locator("#range")).to_have_text("1–1 of 1 rows")

        page.fill("input[name=text]", "")
        page.select_option("select[name=sort]", "-cost")
        expect(page.locator("#range")).to_have_text("1–30 of 30 rows")
        costs = [by_id[i]["cost_usd"] for i in shown_ids(page)]
        answered = [c for c in costs if c is not None]
        assert answered == sorted(answered, reverse=True) and costs[-1] is None  # the error row last


def test_the_demo_output_shows_its_images_answers_and_flags(tmp_path: Path, page: Page) -> None:
    """`make demo`'s first run (its bundled images and in-process simulator) as a person sees it."""
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    assert annotate("run", str(demo), "-q", "--output", str(tmp_path / "out")) == 0
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    with running(tmp_path / "out") as url:
        page.goto(url)
        expect(page.locator("#range")).to_have_text("1–24 of 24 rows")
        answers = dict(zip(shown_ids(page), page.locator(".card .answer").all_text_contents()))
        assert answers == {row["id"]: row["answer"] or "(empty answer)" for row in out.iter_rows(named=True)}
        assert len(wait_for_thumbnails(page)) == 24
        flagged = out.filter(pl.col("flags").list.len() > 0)
        assert flagged.height > 0  # the demo's simulator spoils a few answers on purpose
        expect(page.locator(".card .chip.flag")).to_have_count(flagged.height)
        screenshot(page, "viewer-demo.png")


def test_the_detail_pane_shows_the_row_whole_and_its_image_at_full_size(
        captioned: pl.DataFrame, tmp_path: Path, page: Page) -> None:
    with running(tmp_path / "out") as url:
        page.goto(url)
        card = page.locator(".card").nth(2)
        row = captioned.filter(pl.col("id") == card.get_attribute("data-id")).row(0, named=True)
        card.click()
        pane = page.locator("#detail")
        expect(pane).to_be_visible()
        expect(pane.locator("#detail-answer")).to_have_text(row["answer"])
        cells = dict(zip(pane.locator("#detail-row th").all_text_contents(),
                         pane.locator("#detail-row td").all_text_contents()))
        assert list(cells) == list(row)  # every column
        assert cells["finish_reason"] == row["finish_reason"]
        for column in ("prompt_tokens", "cost_usd", "attempts", "latency_ms"):
            assert float(cells[column]) == row[column]
        page.wait_for_function("document.getElementById('detail-image').naturalWidth > 0")
        size = page.locator("#detail-image").evaluate("i => [i.naturalWidth, i.naturalHeight]")
        assert size == [256, 192]
        screenshot(page, "viewer-detail.png")
        page.keyboard.press("Escape")
        expect(pane).to_be_hidden()


def test_label_columns_show_as_chips_and_filter_by_value(
        tmp_path: Path, sim: Simulator, images: Callable[..., list[str]], page: Page) -> None:
    paths = images(12)
    manifest = write_manifest(tmp_path, [{"image": p} for p in paths])
    cfg = write_config(tmp_path, sim.url, manifest,
                       output_schema={"colour": "enum[red, green, blue, grey, black, white, other]", "photo": "bool"})
    assert annotate("run", str(cfg), "-q") == 0
    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    common = out.group_by("colour").len().sort(["len", "colour"], descending=[True, False]).row(0)
    with running(tmp_path / "out") as url:
        page.goto(url)
        expect(page.locator(".card")).to_have_count(12)
        chips = page.locator(".card .chip.label").all_text_contents()
        assert sorted(c for c in chips if c.startswith("colour: ")) == sorted(f"colour: {v}" for v in out["colour"])
        page.select_option("select[name=label]", f"colour={common[0]}")
        expect(page.locator("#range")).to_have_text(f"1–{common[1]} of {common[1]} rows")
        expect(page.locator("#summary-facts")).to_contain_text("colour")


def _big_output(tmp_path: Path) -> pl.DataFrame:
    """An output directory of BIG rows in 20 parts, its manifest over 8 image files, and its _run.json."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(8):
        Image.new("RGB", (96, 64), (k * 30, 90, 200 - k * 20)).save(folder / f"{k}.png")
    ids = [f"row{n:06d}" for n in range(BIG)]
    write_manifest(tmp_path, [{"id": i, "image": f"images/{n % 8}.png"} for n, i in enumerate(ids)], "big.parquet")
    spread = random.Random(7)
    rows = pl.DataFrame({
        "id": ids,
        "status": ["error" if n % 97 == 0 else "ok" for n in range(BIG)],
        "answer": [f"caption number {n}" for n in range(BIG)],
        "cost_usd": [round(spread.uniform(0.0001, 0.01), 6) for _ in range(BIG)],
        "latency_ms": [spread.uniform(100, 3000) for _ in range(BIG)],
        "total_tokens": [spread.randint(100, 3000) for _ in range(BIG)],
        "error": ["request: HTTP 400" if n % 97 == 0 else None for n in range(BIG)],
        "flags": [["short"] if n % 50 == 0 else [] for n in range(BIG)],
        "finished_at": [datetime(2026, 12, 1, tzinfo=timezone.utc)] * BIG,
    })
    full = pl.DataFrame(COLUMNS.empty_table()).clear(BIG).with_columns(rows)
    out = tmp_path / "out"
    out.mkdir()
    for k in range(20):
        full.slice(k * 5_000, 5_000).write_parquet(out / f"part-20261201T000000Z-big-{k:05d}.parquet")
    config = RunConfig.model_validate({"input": {"manifest": str(tmp_path / "big.parquet"), "id_column": "id"},
                                       "request": {"model": "gpt-4o"}, "output": {"dir": str(out)}})
    (out / "_run.json").write_text(json.dumps({"manifest": {"path": str(tmp_path / "big.parquet"), "rows": BIG},
                                               "config": config.model_dump(mode="json"), "runs": []}))
    return rows


def test_paging_a_100000_row_directory(tmp_path: Path, page: Page) -> None:
    rows = _big_output(tmp_path)
    with running(tmp_path / "out") as url:
        page.goto(url)
        expect(page.locator("#range")).to_have_text("1–48 of 100,000 rows", timeout=30_000)
        assert shown_ids(page) == rows["id"].head(48).to_list()
        page.click("text=last »")
        expect(page.locator("#range")).to_have_text("99,985–100,000 of 100,000 rows")  # pages of 48
        assert shown_ids(page) == rows["id"].tail(16).to_list()
        assert set(wait_for_thumbnails(page)) == {96}  # found through the 100,000-row manifest
        page.click("text=‹ previous")
        expect(page.locator("#range")).to_have_text("99,937–99,984 of 100,000 rows")
        assert shown_ids(page) == rows["id"].slice(99_936, 48).to_list()

        page.select_option("select[name=sort]", "-latency")
        expect(page.locator("#range")).to_have_text("1–48 of 100,000 rows")
        assert shown_ids(page) == rows.sort("latency_ms", descending=True)["id"].head(48).to_list()
        page.select_option("select[name=flag]", "short")
        expect(page.locator("#range")).to_have_text("1–48 of 2,000 rows")
        page.select_option("select[name=status]", "error")
        both = rows.filter((pl.col("status") == "error") & pl.col("flags").list.contains("short"))
        expect(page.locator("#range")).to_have_text(f"1–{both.height} of {both.height} rows")
        screenshot(page, "viewer-100000.png")


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_a_directory_a_run_is_writing_shows_each_new_part(captioned: pl.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (first,) = out.glob("part-*.parquet")
    with running(out) as url:
        assert json.loads(_get(url + "api/rows")[1])["total"] == 30
        more = captioned.with_columns(pl.col("id") + "-more")
        more.write_parquet(out / "part-29991231T000000Z-later-00001.parquet")  # published as a run does: whole
        page = json.loads(_get(url + "api/rows?sort=-cost&limit=200")[1])
        assert page["total"] == 60 and len(page["rows"]) == 60
        assert json.loads(_get(url + "api/summary")[1])["report"]["rows"] == 60
        first.unlink()  # a compaction took a part away
        assert json.loads(_get(url + "api/rows")[1])["total"] == 30


def test_remote_images_show_as_the_run_fetched_them(tmp_path: Path, sim: Simulator, image_host: ImageHost,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    refs = [f"{image_host.url}/ok/{k}.jpg" for k in range(3)]
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": r} for r in refs]),
                       input={"remote": "pass"})
    assert annotate("run", str(cfg), "-q") == 0
    with running(tmp_path / "out") as url:
        page = json.loads(_get(url + "api/rows")[1])
        for row in page["rows"]:
            status, data, headers = _get(url + "thumb/" + row["id"])
            assert status == 200 and headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(data)).size == (64, 48)
        seen = sum(len(image_host.times(f"/ok/{k}.jpg")) for k in range(3))
        _get(url + "thumb/" + page["rows"][0]["id"])  # from the cache now
        assert sum(len(image_host.times(f"/ok/{k}.jpg")) for k in range(3)) == seen


def test_the_page_loads_nothing_from_elsewhere_and_a_missing_image_is_named(
        captioned: pl.DataFrame, tmp_path: Path) -> None:
    gone = captioned.filter(pl.col("status") == "ok")["id"][0]
    with running(tmp_path / "out") as url:
        status, body, headers = _get(url)
        assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
        static = body + _get(url + "static/view.js")[1] + _get(url + "static/view.css")[1]
        assert b"http://" not in static and b"https://" not in static
        for path in (tmp_path / "images").iterdir():
            path.unlink()
        status, body, _ = _get(url + "image/" + gone)
        assert status == 404 and body.startswith(b"missing file ") and body.endswith(b".png"), body
        assert _get(url + "api/row/no-such-id")[0] == 404


def test_the_page_works_under_its_own_policy(captioned: pl.DataFrame, tmp_path: Path, browser: Browser,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The Content-Security-Policy as a browser enforces it: the grid, thumbnails and detail
    pane work, and nothing is refused (a refusal is a console error, which fails the test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with running(tmp_path / "out") as url:
        for page in opened(browser, bypass_csp=False):
            page.goto(url)
            expect(page.locator(".card")).to_have_count(30)
            expect(page.locator(".card .thumb img").first).to_have_js_property("naturalWidth", 256)
            page.locator(".card").first.click()
            expect(page.locator("#detail-image")).to_have_js_property("naturalWidth", 256)


def test_a_part_rewritten_while_a_page_is_read_is_read_again(captioned: pl.DataFrame, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A store rewrites a part in place when one of its error rows is answered again; a page
    found before the rewrite and read after it is found again."""
    out = tmp_path / "out"
    viewer = Output(out)
    (part,) = out.glob("part-*.parquet")
    located = Output._read_part
    rewrites: list[str] = []

    def rewritten_first(self: Output, file: str, files: list[str]) -> pl.LazyFrame:
        if not rewrites:  # as Store._without does: the part without one row, under its name
            table = pl.read_parquet(part)
            rewrites.append(table["id"][0])
            table.slice(1).write_parquet(part)
        return located(self, file, files)

    monkeypatch.setattr(Output, "_read_part", rewritten_first)
    page = viewer.page(Query(limit=200))
    assert page["total"] == 29 and [row["id"] for row in page["rows"]] == pl.read_parquet(part)["id"].to_list()


def test_the_error_kind_and_finish_reason_filters(captioned: pl.DataFrame, tmp_path: Path) -> None:
    with running(tmp_path / "out") as url:
        errors = json.loads(_get(url + "api/rows?error=request")[1])
        assert [row["id"] for row in errors["rows"]] == captioned.filter(pl.col("status") == "error")["id"].to_list()
        assert json.loads(_get(url + "api/rows?error=image")[1])["total"] == 0
        stopped = json.loads(_get(url + "api/rows?finish=stop&limit=200")[1])
        assert sorted(row["id"] for row in stopped["rows"]) == sorted(
            captioned.filter(pl.col("finish_reason") == "stop")["id"])
        facets = json.loads(_get(url + "api/summary")[1])["facets"]
        assert facets["error"] == [{"value": "request", "rows": 1}]


def test_a_request_naming_another_host_is_refused(captioned: pl.DataFrame, tmp_path: Path) -> None:
    """A page elsewhere whose name points at 127.0.0.1 (DNS rebinding) reads nothing."""
    with running(tmp_path / "out") as url:
        request = urllib.request.Request(url + "api/rows", headers={"Host": "attacker.example:8765"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400
        assert json.loads(_get(url + "api/rows")[1])["total"] == 30


def test_view_of_a_folder_that_is_no_output_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["view", str(tmp_path)]) == 2
    assert "not an output directory" in capsys.readouterr().err
