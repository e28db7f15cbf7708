"""Image references -> content parts: sniffing, reading, downscaling, and unusable inputs."""

from __future__ import annotations

import base64
import io
import math
import random
from pathlib import Path
from typing import cast

import pytest
from PIL import Image, ImageChops, ImageFilter

from pipeline.config import PromptConfig
from pipeline.errors import RowInputError
from pipeline.images import ImagePart, sizes_as_sent, sniff_mime, to_parts


def size_as_sent(ref: str, root: Path, max_side: int | None = None) -> tuple[int, int] | None:
    """The one size an image reference is sent at."""
    sizes = sizes_as_sent(ref, root, PromptConfig(max_side=max_side))
    assert sizes is None or len(sizes) == 1
    return None if sizes is None else sizes[0]


def encoded(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    colour: tuple[int, ...] = (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


def noisy_png(size: tuple[int, int]) -> bytes:
    """A PNG that does not compress away, so cutting it leaves a header but not all pixels."""
    rng = random.Random(7)
    image = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def photo_like(size: tuple[int, int]) -> Image.Image:
    """Gradients and blurred noise: detail for a resampler to get wrong, unlike a flat colour."""
    noise = Image.effect_noise(size, 48).filter(ImageFilter.GaussianBlur(1))
    vertical = Image.linear_gradient("L").resize(size)
    return Image.merge("RGB", (ImageChops.add(vertical, noise, scale=2), vertical.rotate(180), noise))


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over the RGB pixels of two images of one size."""
    histogram = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).histogram()  # 256 per band
    squares = sum(count * (i % 256) ** 2 for i, count in enumerate(histogram))
    mse = squares / (a.width * a.height * 3)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def decode(part: ImagePart) -> tuple[str, bytes]:
    head, _, payload = part.url.partition(",")
    assert head.startswith("data:") and head.endswith(";base64")
    return head[len("data:") : -len(";base64")], base64.b64decode(payload)


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp")],
)
def test_sniff_mime_knows_the_sent_formats(fmt: str, mime: str) -> None:
    assert sniff_mime(encoded(fmt)) == mime


def test_sniff_mime_refuses_other_bytes() -> None:
    assert sniff_mime(encoded("BMP")) is None
    assert sniff_mime(b"") is None
    assert sniff_mime(b"RIFF\0\0\0\0WAVE") is None


def test_path_becomes_a_data_url_with_mime_and_size(tmp_path: Path) -> None:
    data = encoded("JPEG", (64, 48))
    (tmp_path / "cat.jpg").write_bytes(data)
    (part,) = to_parts(["cat.jpg"], tmp_path)
    assert part.size == (64, 48)
    assert decode(part) == ("image/jpeg", data)
    assert part.content("low") == {"type": "image_url", "image_url": {"url": part.url, "detail": "low"}}


def test_absolute_path_ignores_the_root(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(encoded("PNG", (10, 20)))
    (part,) = to_parts([str(path)], tmp_path / "elsewhere")
    assert part.size == (10, 20)


def test_max_side_downscales_rgb_to_jpeg(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(encoded("PNG", (400, 300)))
    (part,) = to_parts(["big.png"], tmp_path, PromptConfig(max_side=100))
    mime, data = decode(part)
    assert mime == "image/jpeg"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.size == (100, 75)
    assert part.size == (100, 75)


def test_max_side_keeps_transparency_as_png(tmp_path: Path) -> None:
    (tmp_path / "alpha.png").write_bytes(encoded("PNG", (300, 600), mode="RGBA"))
    (part,) = to_parts(["alpha.png"], tmp_path, PromptConfig(max_side=120))
    mime, data = decode(part)
    assert mime == "image/png"
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "RGBA"
        assert image.size == (60, 120)
    assert part.size == (60, 120)


@pytest.mark.parametrize(
    ("size", "max_side"),
    [((102, 26), 100),  # `thumbnail` rounds this to 100x26, size_as_sent to 100x25
     ((803, 601), 100),  # JPEG decoded at 1/8 scale, odd sizes
     ((401, 299), 200),  # at 1/2 scale
     ((299, 401), 200)],  # portrait
)
def test_downscaled_jpeg_has_the_size_size_as_sent_predicts(tmp_path: Path, size: tuple[int, int],
                                                            max_side: int) -> None:
    (tmp_path / "big.jpg").write_bytes(encoded("JPEG", size))
    (part,) = to_parts(["big.jpg"], tmp_path, PromptConfig(max_side=max_side))
    with Image.open(io.BytesIO(decode(part)[1])) as image:
        assert image.size == part.size == size_as_sent("big.jpg", tmp_path, max_side)


def test_downscaled_jpeg_looks_like_pillows_thumbnail(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    photo_like((1500, 1000)).save(buffer, "JPEG", quality=90)
    (part,) = to_parts([buffer.getvalue()], tmp_path, PromptConfig(max_side=400))
    with Image.open(io.BytesIO(buffer.getvalue())) as naive, Image.open(io.BytesIO(decode(part)[1])) as ours:
        naive.thumbnail((400, 400))  # decodes at full size: a different path to the same picture
        assert ours.size == naive.size == (400, 267)
        assert psnr(ours, naive) >= 35


@pytest.mark.parametrize(("mode", "sent"), [("L", "L"), ("CMYK", "RGB")])
def test_downscaled_jpeg_keeps_grey_and_turns_cmyk_to_rgb(tmp_path: Path, mode: str, sent: str) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (300, 200), 100).save(buffer, "JPEG")
    (part,) = to_parts([buffer.getvalue()], tmp_path, PromptConfig(max_side=150))
    with Image.open(io.BytesIO(decode(part)[1])) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", sent, (150, 100))


def test_max_side_keeps_palette_transparency_as_png(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("P", (300, 200)).save(buffer, "GIF", transparency=0)
    (part,) = to_parts([buffer.getvalue()], tmp_path, PromptConfig(max_side=150))
    mime, data = decode(part)
    with Image.open(io.BytesIO(data)) as image:  # resampled in RGBA: a palette resizes by nearest pixel only
        assert (mime, image.mode, image.size) == ("image/png", "RGBA", (150, 100))
        bands = cast(tuple[tuple[int, int], ...], image.getextrema())  # RGBA: (min, max) of each band
        assert bands[3] == (0, 0)


@pytest.mark.parametrize("max_side", [64, 65, 1000])
def test_image_within_max_side_is_sent_unchanged(tmp_path: Path, max_side: int) -> None:
    data = encoded("PNG", (64, 48))
    (tmp_path / "small.png").write_bytes(data)
    (part,) = to_parts(["small.png"], tmp_path, PromptConfig(max_side=max_side))
    assert decode(part) == ("image/png", data)
    assert part.size == (64, 48)


@pytest.mark.parametrize(
    "ref",
    ["https://example.com/cat.jpg", "http://example.com/a.png", "data:image/png;base64,iVBORw0KGgo="],
)
def test_remote_and_data_urls_pass_through(tmp_path: Path, ref: str) -> None:
    assert to_parts([ref], tmp_path, PromptConfig(max_side=10)) == [ImagePart(ref, None)]


def test_bytes_refs_are_encoded(tmp_path: Path) -> None:
    data = encoded("WEBP", (30, 20))
    parts = to_parts([data, encoded("GIF", (8, 8))], tmp_path)
    assert [p.size for p in parts] == [(30, 20), (8, 8)]
    assert decode(parts[0]) == ("image/webp", data)
    assert decode(parts[1])[0] == "image/gif"


def test_bytes_refs_are_downscaled_too(tmp_path: Path) -> None:
    (part,) = to_parts([encoded("JPEG", (500, 250))], tmp_path, PromptConfig(max_side=50))
    assert part.size == (50, 25)
    assert decode(part)[0] == "image/jpeg"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RowInputError, match="missing file .*nope.jpg"):
        to_parts(["nope.jpg"], tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(RowInputError, match="empty.png is empty"):
        to_parts(["empty.png"], tmp_path)


def test_garbage_bytes(tmp_path: Path) -> None:
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(RowInputError, match=r"junk.jpg is not an image \(unknown format\)"):
        to_parts(["junk.jpg"], tmp_path)


def test_bmp_is_converted_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "old.bmp").write_bytes(encoded("BMP"))
    (part,) = to_parts(["old.bmp"], tmp_path)
    mime, data = decode(part)
    with Image.open(io.BytesIO(data)) as image:
        assert (mime, image.format, image.size) == ("image/jpeg", "JPEG", (64, 48))
    assert part.note == "converted from BMP"


def test_truncated_png_is_refused_from_its_end_without_a_decode(tmp_path: Path) -> None:
    data = noisy_png((200, 150))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for max_side in (None, 100):
        with pytest.raises(RowInputError, match=r"cut.png is truncated \(no IEND chunk\)"):
            to_parts(["cut.png"], tmp_path, PromptConfig(max_side=max_side))
        with pytest.raises(RowInputError, match=r"cut.png is truncated \(no IEND chunk\)"):
            size_as_sent("cut.png", tmp_path, max_side=max_side)


def test_size_as_sent_reads_a_png_header_and_end_only(tmp_path: Path) -> None:
    data = bytearray(noisy_png((200, 150)))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # pixels broken in the middle, the end intact: only a decode sees it
    (tmp_path / "broken.png").write_bytes(bytes(data))
    assert size_as_sent("broken.png", tmp_path, max_side=100) == (100, 75)
    with pytest.raises(RowInputError, match="broken.png is corrupt"):
        to_parts(["broken.png"], tmp_path, PromptConfig(max_side=100))


def test_empty_ref_list() -> None:
    with pytest.raises(RowInputError, match="no image"):
        to_parts([], Path("."))


def test_the_first_unusable_ref_is_named(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(encoded("PNG"))
    with pytest.raises(RowInputError, match="gone.png"):
        to_parts(["ok.png", "gone.png", "https://example.com/x.jpg"], tmp_path)


def test_an_image_too_large_to_decode_safely_is_a_row_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    (tmp_path / "big.png").write_bytes(encoded("PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x48 is then far past twice the limit: a "bomb"
    with pytest.raises(RowInputError, match="big.png is a decompression bomb"):
        to_parts(["big.png"], tmp_path, PromptConfig(max_side=32))


def _sideways_photo(path: Path, orientation: int) -> None:
    """A 400x200 JPEG stored sideways: red on its stored left half, blue on the right, and an
    EXIF orientation saying how to turn it upright."""
    image = Image.new("RGB", (400, 200), "blue")
    image.paste((255, 0, 0), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize(("orientation", "upright", "red_at"), [
    (1, (100, 50), (10, 25)),  # as stored: red on the left
    (6, (50, 100), (25, 10)),  # turned 90 degrees clockwise: the stored left is on top
    (8, (50, 100), (25, 90)),  # turned counter-clockwise: the stored left is at the bottom
    (3, (100, 50), (90, 25)),  # upside down: the stored left is on the right
])
def test_a_downscaled_photo_is_sent_upright_as_its_exif_orientation_says(
        tmp_path: Path, orientation: int, upright: tuple[int, int], red_at: tuple[int, int]) -> None:
    path = tmp_path / "photo.jpg"
    _sideways_photo(path, orientation)
    (part,) = to_parts([path.name], tmp_path, PromptConfig(max_side=100))  # a re-encode drops the tag: the pixels turn
    sent = Image.open(io.BytesIO(base64.b64decode(part.url.partition(",")[2]))).convert("RGB")
    assert sent.size == part.size == upright == size_as_sent(path.name, tmp_path, max_side=100)
    r, g, b = cast(tuple[int, ...], sent.getpixel(red_at))  # an RGB pixel: one value per band
    assert r > 200 and b < 60


def test_a_photo_within_max_side_keeps_its_bytes_and_exif_tag(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    _sideways_photo(path, 6)
    (part,) = to_parts([path.name], tmp_path, PromptConfig(max_side=1000))
    assert base64.b64decode(part.url.partition(",")[2]) == path.read_bytes()
    assert part.size == (400, 200) == size_as_sent(path.name, tmp_path, max_side=1000)
