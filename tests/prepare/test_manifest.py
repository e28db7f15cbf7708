"""Manifest formats, image column shapes, prompts, row ids, slices, and config/column errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.config import InputConfig, PromptConfig
from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, ManifestRow

ROWS = [
    {"image": "imgs/a.png", "label": "cat", "score": 1},
    {"image": "imgs/b.jpg", "label": "dog", "score": 2},
    {"image": "https://example.com/c.webp", "label": "owl", "score": 3},
]
TEMPLATE = "Is this a {label}?"


def write(path: Path, rows: list[dict[str, Any]] | pl.DataFrame) -> Path:
    frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.write_csv(path)
    elif suffix == ".tsv":
        frame.write_csv(path, separator="\t")
    elif suffix == ".parquet":
        frame.write_parquet(path)
    elif suffix in (".jsonl", ".ndjson"):
        frame.write_ndjson(path)
    else:
        raise AssertionError(suffix)
    return path


def open_manifest(path: Path, template: str = "Describe this image.", **source: Any) -> Manifest:
    return Manifest(InputConfig(manifest=path, **source), PromptConfig(user=template))


def all_rows(manifest: Manifest, rows: int = 1000) -> list[ManifestRow]:
    return [row for batch in manifest.batches(rows=rows) for row in batch]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl", ".ndjson"])
def test_every_format_gives_the_same_rows(tmp_path: Path, suffix: str) -> None:
    reference = all_rows(open_manifest(write(tmp_path / "ref.csv", ROWS), TEMPLATE, keep_columns=("score",)))
    rows = all_rows(open_manifest(write(tmp_path / f"m{suffix}", ROWS), TEMPLATE, keep_columns=("score",)))
    assert [(r.id, r.images, r.prompt) for r in rows] == [(r.id, r.images, r.prompt) for r in reference]
    assert [(r.images, r.prompt) for r in rows] == [
        (("imgs/a.png",), "Is this a cat?"),
        (("imgs/b.jpg",), "Is this a dog?"),
        (("https://example.com/c.webp",), "Is this a owl?"),
    ]
    # CSV is untyped text and stays text; typed formats keep their types
    assert [r.keep["score"] for r in rows] == (["1", "2", "3"] if suffix in (".csv", ".tsv") else [1, 2, 3])


def test_folder_of_images_is_read_recursively(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name in ("a.png", "D.JPEG", "sub/b.jpg", "sub/deeper/c.webp", "sub/e.gif", "notes.txt", "sub/readme.md",
                 "sub/deeper/data.csv"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    manifest = open_manifest(folder)
    rows = all_rows(manifest)
    expected = ["D.JPEG", "a.png", "sub/b.jpg", "sub/deeper/c.webp", "sub/e.gif"]
    assert [r.images for r in rows] == [(p,) for p in expected]
    assert manifest.root == folder
    assert manifest.count() == 5
    # the same paths written in a CSV next to the images are the same rows, ids included
    listed = all_rows(open_manifest(write(folder / "list.csv", [{"image": p} for p in expected])))
    assert rows == listed


def test_a_folder_lists_every_image_pillow_reads_by_suffix_or_content_and_names_what_it_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "scans"
    odd = Path(__file__).parents[1] / "data" / "odd"
    for name in ("hopper.tif", "hopper.bmp", "hopper.qoi", "hopper.avif", "12in16bit.tif"):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        (folder / "sub" / name).write_bytes((odd / name).read_bytes())
    (folder / "no_suffix").write_bytes((odd / "hopper.psd").read_bytes())  # found by its header
    (folder / "notes.txt").write_text("a caption file")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4 not read by Pillow")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: left out without a word
    with caplog.at_level(logging.WARNING):
        rows = all_rows(open_manifest(folder))
    assert [r.images[0] for r in rows] == ["no_suffix", "sub/12in16bit.tif", "sub/hopper.avif", "sub/hopper.bmp",
                                           "sub/hopper.qoi", "sub/hopper.tif"]
    assert "skipped 2 files in" in caplog.text and "notes.txt, report.pdf" in caplog.text
    assert ".DS_Store" not in caplog.text


def test_list_of_paths_column(tmp_path: Path) -> None:
    path = write(tmp_path / "m.parquet", [{"image": ["a.png", "b.png"]}, {"image": ["c.png"]}, {"image": []}])
    assert [r.images for r in all_rows(open_manifest(path))] == [("a.png", "b.png"), ("c.png",), ()]


def test_list_of_paths_in_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": ["a.png", "b.png"]}\n{"image": ["c.png"]}\n', encoding="utf-8")
    assert [r.images for r in all_rows(open_manifest(path))] == [("a.png", "b.png"), ("c.png",)]


def test_binary_column(tmp_path: Path) -> None:
    frame = pl.DataFrame({"image": [b"\x89PNG one", b"\xff\xd8\xff two"]}, schema={"image": pl.Binary})
    rows = all_rows(open_manifest(write(tmp_path / "m.parquet", frame)))
    assert [r.images for r in rows] == [(b"\x89PNG one",), (b"\xff\xd8\xff two",)]
    assert rows[0].id != rows[1].id


def test_hugging_face_struct_column_prefers_bytes(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {"image": [{"bytes": b"raw one", "path": "one.png"}, {"bytes": None, "path": "two.png"}]},
        schema={"image": pl.Struct({"bytes": pl.Binary, "path": pl.String})},
    )
    rows = all_rows(open_manifest(write(tmp_path / "m.parquet", frame)))
    assert [r.images for r in rows] == [(b"raw one",), ("two.png",)]


def test_list_of_hugging_face_structs(tmp_path: Path) -> None:
    struct = pl.Struct({"bytes": pl.Binary, "path": pl.String})
    frame = pl.DataFrame(
        {"image": [[{"bytes": b"first", "path": "1.png"}, {"bytes": None, "path": "2.png"}],
                   [{"bytes": None, "path": "3.png"}]]},
        schema={"image": pl.List(struct)},
    )
    rows = all_rows(open_manifest(write(tmp_path / "m.parquet", frame)))
    assert [r.images for r in rows] == [(b"first", "2.png"), ("3.png",)]


def test_prompt_is_filled_from_columns_and_null_renders_empty(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"image": "a.png", "label": "cat", "n": 3},
                                  {"image": "b.png", "label": None, "n": 4}]
    path = write(tmp_path / "m.parquet", rows)
    got = all_rows(open_manifest(path, "Count the {label}s ({n} expected). {{literal}}"))
    assert [r.prompt for r in got] == ["Count the cats (3 expected). {literal}", "Count the s (4 expected). {literal}"]


def test_ids_are_stable_across_manifest_objects(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", ROWS)
    first = [r.id for r in all_rows(open_manifest(path, TEMPLATE))]
    second = [r.id for r in all_rows(open_manifest(path, TEMPLATE))]
    assert first == second
    assert len(set(first)) == 3
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in first)  # 12-byte hex digest


def test_same_image_with_different_prompts_has_different_ids(tmp_path: Path) -> None:
    rows = [{"image": "a.png", "label": "cat"}, {"image": "a.png", "label": "dog"}]
    ids = [r.id for r in all_rows(open_manifest(write(tmp_path / "m.csv", rows), TEMPLATE))]
    assert ids[0] != ids[1]
    plain = all_rows(open_manifest(write(tmp_path / "p.csv", rows)))
    assert len(plain) == 1  # same image, same rendered prompt: the same question, asked once


def test_id_column_value_becomes_str(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", [{"image": "a.png", "uid": 7}, {"image": "b.png", "uid": 12}])
    assert [r.id for r in all_rows(open_manifest(path, id_column="uid"))] == ["7", "12"]


@pytest.mark.parametrize("size", [1, 3, 7, 50])
def test_batches_are_bounded_slices_in_order(tmp_path: Path, size: int) -> None:
    rows = [{"image": f"img{i:03d}.png", "k": i} for i in range(23)]
    manifest = open_manifest(write(tmp_path / "m.parquet", rows), keep_columns=("k",))
    batches = list(manifest.batches(rows=size))
    assert all(1 <= len(b) <= size for b in batches)
    flat = [r for b in batches for r in b]
    assert [r.keep["k"] for r in flat] == list(range(23))
    assert flat == all_rows(manifest)
    assert manifest.count() == 23


@pytest.mark.parametrize(
    ("source", "template", "key", "column"),
    [
        ({"image_column": "photo"}, "Describe.", "input.image_column", "photo"),
        ({"id_column": "uid"}, "Describe.", "input.id_column", "uid"),
        ({"keep_columns": ("score", "nope")}, "Describe.", "input.keep_columns", "nope"),
        ({}, "Is it a {species}?", "prompt.user", "species"),
    ],
)
def test_missing_columns_name_the_key_and_list_the_columns(
    tmp_path: Path, source: dict[str, Any], template: str, key: str, column: str
) -> None:
    path = write(tmp_path / "m.csv", ROWS)
    with pytest.raises(ManifestError) as info:
        open_manifest(path, template, **source)
    message = str(info.value)
    assert message.startswith(f"{key}: column {column!r} is not in")
    assert "columns: image, label, score" in message


def test_image_column_of_ints_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "m.parquet", [{"image": 1}, {"image": 2}])
    with pytest.raises(ManifestError, match=r"input.image_column: column 'image' has type Int64"):
        open_manifest(path)


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", [{"image": "a.png", "uid": "x"}, {"image": "b.png", "uid": "y"},
                                      {"image": "c.png", "uid": "x"}])
    with pytest.raises(ManifestError, match=r"input.id_column: column 'uid' has duplicate ids, e.g. 'x'"):
        open_manifest(path, id_column="uid")


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(ManifestError, match=r"input.manifest: .*m.xlsx is not one of .csv"):
        open_manifest(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"input.manifest: .*gone.csv does not exist"):
        open_manifest(tmp_path / "gone.csv")


def test_unreadable_file_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="input.manifest: cannot read"):
        open_manifest(path)


def test_keep_schema_holds_the_kept_dtypes(tmp_path: Path) -> None:
    frame = pl.DataFrame({"image": ["a.png"], "score": [1.5], "n": [3], "tags": [["x", "y"]], "extra": ["z"]})
    manifest = open_manifest(write(tmp_path / "m.parquet", frame), keep_columns=("tags", "score", "n"))
    kept: dict[str, pl.DataType | pl.datatypes.DataTypeClass] = {
        "tags": pl.List(pl.String), "score": pl.Float64, "n": pl.Int64}
    assert manifest.keep_schema == pl.Schema(kept)
    (row,) = all_rows(manifest)
    assert dict(row.keep) == {"tags": ["x", "y"], "score": 1.5, "n": 3}


def test_relative_image_root_defaults_to_the_manifest_folder(tmp_path: Path) -> None:
    path = write(tmp_path / "m.csv", ROWS)
    assert open_manifest(path).root == tmp_path
    assert open_manifest(path, image_root=tmp_path / "elsewhere").root == tmp_path / "elsewhere"


def test_a_value_far_down_that_changes_a_columns_type_is_read_not_fatal(tmp_path: Path) -> None:
    rows = [{"image": f"{i}.png", "n": str(i)} for i in range(300)] + [{"image": "x.png", "n": "abc"}]
    manifest = open_manifest(write(tmp_path / "m.csv", rows), keep_columns=("n",))
    kept = [row.keep["n"] for row in all_rows(manifest)]
    assert kept[-1] == "abc" and kept[:2] == ["0", "1"]

def test_ids_are_sha256_of_image_refs_and_prompt_so_any_tool_can_recompute_them(tmp_path: Path) -> None:
    import hashlib

    rows = [{"image": "a.png", "label": "cat"}]
    (row,) = all_rows(open_manifest(write(tmp_path / "m.csv", rows), TEMPLATE))
    assert row.id == hashlib.sha256(f"a.png\0{row.prompt}".encode()).hexdigest()[:24]


def test_skip_and_limit_drop_done_ids_before_rows_are_built(tmp_path: Path) -> None:
    rows = [{"image": f"{i}.png", "label": f"l{i}"} for i in range(10)]
    manifest = open_manifest(write(tmp_path / "m.csv", rows), TEMPLATE)
    every = all_rows(manifest)
    done = pl.LazyFrame({"id": [r.id for r in every[::2]]}, schema={"id": pl.String})
    rest = [r for batch in manifest.batches(rows=3, skip=done, limit=4) for r in batch]
    assert [r.id for r in rest] == [r.id for r in every[1::2]][:4]


def test_format_specs_in_the_template_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="prompt.user: placeholders are plain"):
        open_manifest(write(tmp_path / "m.csv", [{"image": "a.png", "x": 1.5}]), "Value {x:.1f}")
