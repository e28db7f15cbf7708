"""`annotate estimate`: before anything is sent, close to what the run then records."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import polars as pl
import pytest

from pipeline import cli, config
from pipeline.cost.tokens import image_tokens, input_tokens
from pipeline.errors import RowInputError
from pipeline.images import sizes_as_sent
from pipeline.manifest import Manifest
from pipeline.payload import input_texts
from pipeline.simulator import Simulator
from pipeline.structured import build_schema

from ..conftest import image_bytes, write_config, write_manifest


def estimate(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert cli.main(["estimate", *args, "--json"]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


@pytest.fixture
def mixed(tmp_path: Path, images: Callable[..., list[str]]) -> Path:
    """Images of several sizes and formats, some larger than max_side, with a templated prompt."""
    paths = images(6, size=(1600, 900)) + images(6, size=(300, 200), fmt="JPEG")
    rows = [{"image": p, "subject": f"a thing called {i} " * (i % 3 + 1)} for i, p in enumerate(paths)]
    return write_manifest(tmp_path, rows)


@pytest.mark.parametrize("detail", ["auto", "low", "high"])
def test_expected_input_is_within_5_percent_of_the_run_and_its_cost_within_the_range(
    sim: Simulator, tmp_path: Path, mixed: Path, capsys: pytest.CaptureFixture[str], detail: str
) -> None:
    cfg = write_config(tmp_path, sim.url, mixed, prompt={"user": "Describe {subject}.", "system": "Be brief.",
                                                          "detail": detail, "max_side": 1024})
    guess = estimate([str(cfg)], capsys)
    assert sim.log == []  # an estimate sends nothing

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert guess["rows"] == guess["images"] == out.height == 12
    assert guess["input_tokens"]["total"] == pytest.approx(out["prompt_tokens"].sum(), rel=0.05)
    assert guess["cost_usd"]["low"] <= out["cost_usd"].sum() <= guess["cost_usd"]["high"]
    assert guess["output_tokens"]["max"] == 12 * 50
    assert guess["detail_auto_as_high"] is (detail == "auto")


def test_sample_answers_n_rows_for_real_and_a_run_does_not_pay_for_them_again(
    sim: Simulator, tmp_path: Path, mixed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, sim.url, mixed, prompt={"user": "Describe {subject}."})
    guess = estimate([str(cfg), "--sample", "3"], capsys)

    assert guess["sampled_rows"] == 3 and len(sim.log) == 3
    sampled = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert guess["output_tokens"]["expected"] == round(cast(float, sampled["completion_tokens"].mean()) * 12)
    assert cli.main(["run", str(cfg), "-q"]) == 0
    assert len(sim.log) == 12


def test_unknown_price_gives_null_costs_and_unreadable_images_are_counted_apart(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ok.png").write_bytes(image_bytes())
    manifest = write_manifest(tmp_path, [{"image": "ok.png"}, {"image": "missing.png"},
                                         {"image": "https://example.com/a.jpg"}])
    cfg = write_config(tmp_path, sim.url, manifest, request={"model": "my-own-model", "max_tokens": 10},
                       input={"remote": "pass"})  # the URL's image is not fetched: of unknown size
    guess = estimate([str(cfg)], capsys)
    assert guess["cost_usd"] == {"low": None, "expected": None, "high": None}
    assert (guess["rows"], guess["unreadable_rows"]) == (2, 1)
    assert guess["input_tokens"]["max"] > guess["input_tokens"]["total"]  # the URL's size is unknown


def row_by_row(cfg_path: Path) -> dict[str, int]:
    """The estimate's counts worked out the plain way: every row, every image read again."""
    cfg = config.load(cfg_path)
    manifest = Manifest(cfg.input, cfg.prompt)
    schema = build_schema(cfg.output_schema, cfg.request.structured)
    model, detail = cfg.request.model, cfg.prompt.detail
    got = dict.fromkeys(["rows", "images", "unreadable_rows", "image", "text", "low", "max"], 0)
    for batch in manifest.batches():
        for row in batch:
            try:
                if not row.images:
                    raise RowInputError("no image")
                sizes = [size for ref in row.images for size in sizes_as_sent(ref, manifest.root, cfg.prompt) or [None]]
            except RowInputError:
                got["unreadable_rows"] += 1
                continue
            texts = input_texts(row, cfg.prompt, schema)
            text = input_tokens(model, texts, [], detail)
            got["rows"] += 1
            got["images"] += len(sizes)
            got["text"] += text
            got["image"] += input_tokens(model, [], sizes, detail)
            got["low"] += text + input_tokens(model, [], sizes, "low" if detail == "auto" else detail)
            got["max"] += input_tokens(model, texts, sizes, detail, worst=True)
    return got


def counts(guess: dict[str, Any]) -> dict[str, int]:
    tokens = guess["input_tokens"]
    return {"rows": guess["rows"], "images": guess["images"], "unreadable_rows": guess["unreadable_rows"],
            "image": tokens["image"], "text": tokens["text"], "low": tokens["low"], "max": tokens["max"]}


@pytest.mark.parametrize("structured", [None, "json_schema", "prompt"])
def test_rows_sharing_files_count_as_if_each_row_were_read_on_its_own(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], capsys: pytest.CaptureFixture[str],
    structured: str | None,
) -> None:
    paths = images(2, size=(1600, 900)) + images(1, size=(300, 200), fmt="JPEG")
    shared = [[paths[0]], [paths[1], paths[2]], [paths[2]], ["images/missing.png"],
              ["https://example.com/a.jpg", paths[0]], []]
    # Subjects as long in characters but not in bytes (é), or in neither; a row repeated whole.
    subjects = ["a cat", "a cät", "a cäté", "a dog and a cat", "é" * 40, "a cat"]
    rows = [{"images": shared[i % len(shared)], "subject": subjects[i % len(subjects)]} for i in range(90)]
    manifest = write_manifest(tmp_path, rows, name="manifest.parquet")
    schema = {"output_schema": {"colour": "str"}, "request": {"structured": structured}} if structured else {}
    cfg = write_config(tmp_path, sim.url, manifest, input={"image_column": "images", "remote": "pass"},
                       prompt={"user": "Describe {subject}.", "system": "Be brief.", "max_side": 1024}, **schema)

    guess = estimate([str(cfg)], capsys)

    assert counts(guess) == row_by_row(cfg)
    assert guess["unreadable_rows"] > 0 and guess["rows"] > 0


def test_a_file_rewritten_between_two_estimates_is_read_again(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "a.png"
    picture.write_bytes(image_bytes((64, 48)))
    manifest = write_manifest(tmp_path, [{"image": "a.png", "n": str(i)} for i in range(3)])
    cfg = write_config(tmp_path, sim.url, manifest, prompt={"user": "Image {n}.", "detail": "high"})
    assert estimate([str(cfg)], capsys)["input_tokens"]["image"] == 3 * image_tokens("gpt-4o", 64, 48, "high")

    picture.write_bytes(image_bytes((1600, 900)))  # at once: maybe within the same mtime tick

    assert estimate([str(cfg)], capsys)["input_tokens"]["image"] == 3 * image_tokens("gpt-4o", 1600, 900, "high")


def test_a_file_rewritten_with_as_many_bytes_is_read_again_when_its_mtime_moves(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "a.jpg"
    before, after = image_bytes((512, 512), fmt="JPEG"), image_bytes((1024, 256), fmt="JPEG")
    assert len(before) == len(after) and image_tokens("gpt-4o", 512, 512) != image_tokens("gpt-4o", 1024, 256)
    picture.write_bytes(before)
    manifest = write_manifest(tmp_path, [{"image": "a.jpg"}])
    cfg = write_config(tmp_path, sim.url, manifest)
    assert estimate([str(cfg)], capsys)["input_tokens"]["image"] == image_tokens("gpt-4o", 512, 512)

    stat = picture.stat()
    picture.write_bytes(after)  # the same inode and size: only the mtime tells
    os.utime(picture, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # as an edit a second later

    assert estimate([str(cfg)], capsys)["input_tokens"]["image"] == image_tokens("gpt-4o", 1024, 256)


def test_a_missing_file_that_appears_between_two_estimates_is_counted(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, [{"image": "later.png"}])
    cfg = write_config(tmp_path, sim.url, manifest)
    assert estimate([str(cfg)], capsys)["unreadable_rows"] == 1

    (tmp_path / "later.png").write_bytes(image_bytes())

    guess = estimate([str(cfg)], capsys)
    assert (guess["rows"], guess["unreadable_rows"]) == (1, 0)
