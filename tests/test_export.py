"""`annotate export`: each format read back by what reads it (a plain loop, tarfile and the
webdataset library, datasets.load_from_disk), the filter, and rows whose image is gone."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from pipeline import cli
from pipeline.simulator import Simulator

from .conftest import image_bytes, write_config, write_manifest
from .s3_server import S3Server

ROWS = 12


@pytest.fixture
def answered(sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]) -> pl.DataFrame:
    """A run over ROWS 640x480 images (sent at max_side 256) and one missing file; its output."""
    paths = images(ROWS, size=(640, 480))
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p} for p in [*paths, "images/gone.png"]]),
                       prompt={"max_side": 256}, input={"keep_columns": ["image"]})
    assert cli.main(["run", str(cfg), "-q"]) == 1  # the missing file is an error row
    return pl.read_parquet(tmp_path / "out" / "*.parquet")


def ok_answers(out: pl.DataFrame) -> dict[str, str]:
    return dict(out.filter(pl.col("status") == "ok").select("id", "answer").iter_rows())


def export(tmp_path: Path, fmt: str, *extra: str, source: str | None = None) -> Path:
    to = tmp_path / f"export-{fmt}"
    assert cli.main(["export", source or str(tmp_path / "out"), "--to", str(to), "--format", fmt, "-q", *extra]) == 0
    return to


def test_sidecar_puts_each_image_as_sent_beside_its_caption(answered: pl.DataFrame, tmp_path: Path) -> None:
    to = export(tmp_path, "sidecar")
    captions = {p.stem: p.read_text() for p in to.glob("*.txt")}
    assert captions == ok_answers(answered)
    for stem in captions:
        (picture,) = [p for p in to.glob(f"{stem}.*") if p.suffix != ".txt"]
        with Image.open(picture) as image:
            assert image.size == (256, 192)  # downscaled as the run sent it


def test_original_images_are_the_files_as_they_are(answered: pl.DataFrame, tmp_path: Path) -> None:
    to = export(tmp_path, "sidecar", "--images", "original")
    by_id = dict(answered.filter(pl.col("status") == "ok").select("id", "image").iter_rows())
    pictures = {p.stem: p.read_bytes() for p in to.glob("*.png")}
    assert pictures == {row_id: (tmp_path / path).read_bytes() for row_id, path in by_id.items()}


def test_webdataset_shards_read_back_by_tarfile_and_by_the_webdataset_library(
        answered: pl.DataFrame, tmp_path: Path) -> None:
    webdataset = pytest.importorskip("webdataset")
    to = export(tmp_path, "webdataset")
    shards = sorted(to.glob("*.tar"))
    with tarfile.open(shards[0]) as tar:
        assert len(tar.getnames()) == 3 * ROWS
    samples = list(webdataset.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert {s["__key__"]: s["txt"].decode() for s in samples} == ok_answers(answered)
    row = json.loads(samples[0]["json"])
    assert row["status"] == "ok" and row["image"].startswith("images/")
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (256, 192)  # downscaled, re-encoded as JPEG


def test_hf_is_a_datasets_dataset_with_the_image_feature(answered: pl.DataFrame, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.load_from_disk(str(export(tmp_path, "hf")))
    assert len(dataset) == ROWS
    assert {r["id"]: r["text"] for r in dataset} == ok_answers(answered)
    assert dataset.features["image"] == datasets.Image()
    assert dataset[0]["image"].size == (256, 192) and dataset[0]["prompt_tokens"] > 0


def test_jsonl_takes_the_filter_and_needs_no_image(answered: pl.DataFrame, tmp_path: Path) -> None:
    to = export(tmp_path, "jsonl", "--where", "status = 'error'")
    rows = [json.loads(line) for line in to.read_text().splitlines()]
    assert [(r["status"], r["image"]) for r in rows] == [("error", "images/gone.png")]


def test_a_row_whose_image_is_gone_is_left_out_and_named(answered: pl.DataFrame, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "images" / "img0003.png").unlink()
    to = export(tmp_path, "sidecar")
    assert len(list(to.glob("*.txt"))) == ROWS - 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"annotate: {ROWS - 1} of {ROWS} selected rows exported to {to} (sidecar); 1 left out, their image unreadable now")
    assert "left out 1 rows whose image cannot be read now" in caplog.text
    assert f"missing file {tmp_path / 'images' / 'img0003.png'}" in caplog.text


def test_a_bad_filter_or_a_used_destination_is_exit_2(answered: pl.DataFrame, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["export", out, "--to", str(tmp_path / "x"), "--format", "jsonl", "--where", "no_such > 1"]) == 2
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert cli.main(["export", out, "--to", str(tmp_path / "used"), "--format", "sidecar"]) == 2
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


def test_an_output_and_images_in_a_bucket_export_alike(s3: str, s3_server: S3Server, sim: Simulator,
                                                       tmp_path: Path) -> None:
    for i in range(3):
        s3_server.put(f"{s3}/data/i{i}.png", image_bytes((300, 200), (i * 80, 20, 20)))
    s3_server.put(f"{s3}/data/manifest.csv", b"image\ni0.png\ni1.png\ni2.png\n")
    cfg = write_config(tmp_path, sim.url, f"{s3}/data/manifest.csv", output={"dir": f"{s3}/out"})
    assert cli.main(["run", str(cfg), "-q"]) == 0

    to = export(tmp_path, "sidecar", "--images", "original", source=f"{s3}/out")

    pictures = sorted(to.glob("*.png"))
    assert len(pictures) == 3 and {Image.open(p).size for p in pictures} == {(300, 200)}
