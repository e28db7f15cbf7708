"""Real odd image files (tests/data/odd, from Pillow's own test images): each ends sent in a
form OpenAI takes or as a row error named by its cause; the estimate decides as the run does;
a run over all of them against the simulator (which refuses what OpenAI refuses) finishes."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import cast

import polars as pl
import pytest
from PIL import Image

from pipeline import cli
from pipeline.config import PromptConfig
from pipeline.errors import RowInputError
from pipeline.images import ImagePart, sizes_as_sent, to_parts
from pipeline.simulator import Simulator

from ..conftest import KEY, KEY_ENV, NAMED, named, write_config, write_manifest

ODD = Path(__file__).parents[1] / "data" / "odd"

# file -> (format sent, mode sent, what image_notes says); a note of None: sent as it is
SENT = {
    "hopper.bmp": ("JPEG", "RGB", "converted from BMP"),
    "hopper.tif": ("JPEG", "RGB", "converted from TIFF"),
    "hopper.ico": ("PNG", "RGBA", "converted from ICO"),
    "hopper.psd": ("JPEG", "RGB", "converted from PSD"),
    "hopper.qoi": ("JPEG", "RGB", "converted from QOI"),
    "hopper.xpm": ("PNG", "P", "converted from XPM"),
    "hopper.dds": ("JPEG", "RGB", "converted from DDS"),
    "hopper.avif": ("JPEG", "RGB", "converted from AVIF"),
    "16bit.cropped.jp2": ("JPEG", "L", "converted from JPEG2000, I;16 to 8-bit, values 291-694 scaled to 0-255"),
    "16bit.cropped.tif": ("JPEG", "L", "converted from TIFF, I;16 to 8-bit, values 291-694 scaled to 0-255"),
    "12in16bit.tif": ("JPEG", "L", "converted from TIFF, I;16 to 8-bit"),
    "pil_sample_cmyk.jpg": ("JPEG", "RGB", "CMYK to RGB"),
    "tiff_strip_cmyk_jpeg.tif": ("JPEG", "RGB", "converted from TIFF, CMYK to RGB"),
    "dispose_bgnd.gif": ("PNG", "P", "first of 5 frames"),
    "apng_delay.png": ("PNG", "RGBA", "first of 5 frames"),
    "apng_mode_16bit.png": ("PNG", "RGBA", "first of 3 frames"),
    "apng_syntax_num_frames_invalid.png": ("PNG", "RGBA", "Invalid APNG, will use default PNG image if possible"),
    "hopper_orientation_6.webp": ("JPEG", "RGB", "turned upright (EXIF orientation 6)"),
    "hopper_orientation_6.jpg": ("JPEG", "RGB", None),
    "1_trns.png": ("PNG", "1", None),
}
REFUSED = {
    "unimplemented_dxgi_format.dds": "uses a variant of its format Pillow cannot read (Unimplemented DXGI format 93)",
    "unimplemented_pfflags.dds": "uses a variant of its format Pillow cannot read (Unknown pixel format flags 8)",
    "unimplemented_pixel_format.dds": "uses a variant of its format Pillow cannot read (Unimplemented pixel format 0)",
    "gfs.t06z.rassda.tm00.bufr_d": "is BUFR, which Pillow can name but not decode",
    "hdf5.h5": "is HDF5, which Pillow can name but not decode",
    "truncated_jpeg.jpg": "is truncated (no end-of-image marker)",
    "truncated_image.png": "is truncated (no IEND chunk)",
    "broken_data_stream.png": "is truncated (no IEND chunk)",
    "decompression_bomb.gif": "is a decompression bomb",
}


def decoded(part: ImagePart) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(part.url.partition(",")[2])))


def test_every_file_in_the_folder_has_an_expected_outcome() -> None:
    assert {p.name for p in ODD.iterdir() if p.name != "README.md"} == SENT.keys() | REFUSED.keys()


@pytest.mark.parametrize("name", sorted(SENT))
def test_a_readable_file_is_sent_as_openai_takes_it_and_the_estimate_agrees(name: str) -> None:
    (part,) = to_parts([name], ODD)
    fmt, mode, note = SENT[name]
    with decoded(part) as image:
        assert (image.format, image.mode, part.note) == (fmt, mode, note)
        assert getattr(image, "n_frames", 1) == 1 and image.size == part.size
    assert sizes_as_sent(name, ODD) == (part.size,)
    if note is None:  # sent as it is: the very bytes of the file
        assert base64.b64decode(part.url.partition(",")[2]) == (ODD / name).read_bytes()


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_an_unreadable_file_is_a_row_error_named_by_cause_in_the_run_and_the_estimate(name: str) -> None:
    for attempt in (lambda: to_parts([name], ODD), lambda: sizes_as_sent(name, ODD)):
        with pytest.raises(RowInputError) as caught:
            attempt()
        assert str(caught.value).startswith(f"{name} {REFUSED[name]}")


def test_frames_spread_over_an_animation_are_sent_as_several_images() -> None:
    parts = to_parts(["dispose_bgnd.gif"], ODD, PromptConfig(frames=3))
    assert len(parts) == 3 and {p.note for p in parts} == {"frames 1, 3, 5 of 5"}
    assert sizes_as_sent("dispose_bgnd.gif", ODD, PromptConfig(frames=3)) == tuple(p.size for p in parts)
    pixels = [decoded(p).convert("RGBA").tobytes() for p in parts]
    assert len(set(pixels)) == 3  # three different frames, not the first three times


def test_heif_is_converted_with_the_extra_and_named_without_it(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, "HEIF")  # pillow-heif is in the dev extras
    (tmp_path / "photo.heic").write_bytes(buffer.getvalue())
    (part,) = to_parts(["photo.heic"], tmp_path)
    assert part.note == "converted from HEIF" and part.size == (40, 30)
    without = ("import sys; sys.modules['pillow_heif'] = None\n"  # as if the extra were not installed
               "from pathlib import Path\nfrom pipeline.images import to_parts\n"
               f"to_parts(['photo.heic'], Path({str(tmp_path)!r}))")
    done = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True)
    assert "photo.heic is HEIF, which needs the annotate-pipeline[heif] extra" in done.stderr


def _exif_rotated(fmt: str) -> bytes:
    """A 120x60 picture, its left half red, stored as EXIF orientation 6 asks: turned a quarter."""
    upright = Image.new("RGB", (120, 60), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 60, 60))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "JPEG"])
@pytest.mark.parametrize("max_side", [None, 40])
def test_exif_orientation_is_applied_for_every_format_and_sizes_agree(tmp_path: Path, fmt: str,
                                                                      max_side: int | None) -> None:
    (tmp_path / "turned").write_bytes(_exif_rotated(fmt))
    prompt = PromptConfig(max_side=max_side)
    (part,) = to_parts(["turned"], tmp_path, prompt)
    assert sizes_as_sent("turned", tmp_path, prompt) == (part.size,)
    with decoded(part) as image:
        assert image.size == part.size
        if fmt == "JPEG" and max_side is None:  # sent as it is: the provider reads the tag
            assert image.size == (60, 120) and image.getexif()[0x0112] == 6
            return
        assert image.size == ((120, 60) if max_side is None else (40, 20))
        # pixels of colour images: one value per band
        left = cast(tuple[int, ...], image.convert("RGB").getpixel((2, image.height // 2)))
        right = cast(tuple[int, ...], image.getpixel((image.width - 3, 2)))
        assert left[0] > 200 > left[2] and right[2] > 200 > right[0]  # red on the left: upright


def test_an_image_over_max_image_bytes_is_reencoded_and_a_row_over_the_request_cap_refused(tmp_path: Path) -> None:
    noise = Image.effect_noise((600, 400), 80).convert("RGB")
    noise.save(tmp_path / "noise.png")
    size = (tmp_path / "noise.png").stat().st_size
    (part,) = to_parts(["noise.png"], tmp_path, PromptConfig(max_image_bytes=size // 4))
    assert len(base64.b64decode(part.url.partition(",")[2])) <= size // 4
    assert part.note and part.note.startswith("re-encoded")
    with pytest.raises(RowInputError, match=r"the row's images are .* MB as sent, over prompt.max_request_bytes"):
        to_parts(["noise.png", "noise.png"], tmp_path, PromptConfig(max_request_bytes=size))


def _mutants(data: bytes, rng: random.Random) -> list[bytes]:
    """Cut copies and bit-flipped copies of a file."""
    cuts = [data[: rng.randrange(1, len(data))] for _ in range(6)]
    flips = []
    for _ in range(10):
        copy = bytearray(data)
        for _ in range(rng.randrange(1, 9)):
            at = rng.randrange(len(copy))
            copy[at] ^= 1 << rng.randrange(8)
        flips.append(bytes(copy))
    return cuts + flips


@pytest.mark.parametrize("name", sorted(SENT))
def test_cut_and_bit_flipped_copies_never_crash_the_run_or_the_estimate(tmp_path: Path, name: str) -> None:
    rng = random.Random(name)
    for k, mutant in enumerate(_mutants((ODD / name).read_bytes(), rng)):
        path = tmp_path / f"{k}-{name}"
        path.write_bytes(mutant)
        for prompt in (PromptConfig(), PromptConfig(max_side=32)):
            try:
                to_parts([path.name], tmp_path, prompt)
            except RowInputError:
                pass
            try:
                sizes_as_sent(path.name, tmp_path, prompt)
            except RowInputError:
                pass


def test_a_run_over_every_odd_file_finishes_and_the_estimate_agrees(sim: Simulator, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture[str]) -> None:
    rows = [{"image": str(ODD / name)} for name in sorted(SENT | REFUSED)]
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, rows), input={"keep_columns": ["image"]})
    assert cli.main(["estimate", str(cfg), "--json"]) == 0
    estimate = json.loads(capfd.readouterr().out)

    assert cli.main(["run", str(cfg), "-q"]) == 1  # some rows are errors
    out = {Path(row["image"]).name: row for row in pl.read_parquet(tmp_path / "out" / "*.parquet").iter_rows(named=True)}
    assert {name for name, row in out.items() if row["status"] == "ok"} == SENT.keys()
    assert {e.status for e in sim.log} == {200} and len(sim.log) == len(SENT)  # the simulator refused nothing
    for name, cause in REFUSED.items():
        assert out[name]["error"].startswith(f"image: {ODD / name} {cause}") and out[name]["retryable"] is False
    assert {name: out[name]["image_notes"] for name in SENT} == {name: note for name, (_, _, note) in SENT.items()}
    assert (estimate["rows"], estimate["unreadable_rows"], estimate["images"]) == (len(SENT), len(REFUSED), len(SENT))


def test_a_refused_row_still_says_how_its_image_was_changed(sim: Simulator, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, named([str(ODD / "hopper.tif")])), prompt=NAMED)
    sim.plan("hopper", [400])
    assert cli.main(["run", str(cfg), "-q"]) == 1
    (row,) = pl.read_parquet(tmp_path / "out" / "*.parquet").iter_rows(named=True)
    assert row["status"] == "error" and row["error"].startswith("request: 400")
    assert row["image_notes"] == "converted from TIFF"


def test_pillows_warnings_go_to_image_notes_not_the_terminal(sim: Simulator, tmp_path: Path) -> None:
    rows = [{"image": str(ODD / "apng_syntax_num_frames_invalid.png")}]
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, rows))
    # a process of its own: in this one, pytest records warnings instead of printing them
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, KEY_ENV: KEY}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "Invalid APNG" not in done.stderr
    notes = pl.read_parquet(tmp_path / "out" / "*.parquet")["image_notes"].to_list()
    assert notes == ["Invalid APNG, will use default PNG image if possible"]
