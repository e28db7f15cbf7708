"""The facts of a request's images, as an answer needs them: size, dominant colour, shapes,
photo or drawing; decoded from data: URLs (or downloaded, when the settings say so) and
cached, and refused as OpenAI refuses formats and sizes it does not take.

Never: the request's other parts.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
import struct
import threading
import typing
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass

from PIL import Image

from ..cost import tokens
from .wire import Invalid

__all__ = ["ImageFacts", "ImageCache", "NO_IMAGE"]

_PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (215, 35, 35),
    "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60), "cyan": (40, 200, 220),
    "blue": (30, 70, 210), "purple": (130, 50, 180), "pink": (240, 130, 180), "brown": (130, 80, 40),
}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)  # no slots: cached_property keeps its value in __dict__
class ImageFacts:
    """What the answer says about one image, and its size for the prompt tokens.

    `colour` is the dominant palette colour; `shapes` counts the regions (4-neighbour, of 3 pixels
    or more) not of the background colour on a 32x32 thumbnail; `photo` is True when its two
    commonest palette colours cover less than 80% of it. Those two are worked out from `sample`
    (the thumbnail's RGB bytes) when a structured answer first asks: a prose answer needs neither."""

    width: int
    height: int
    description: str
    colour: str = "grey"
    size_class: str = "large"
    sample: bytes = b""
    guessed: tuple[int, bool] = (0, True)  # shapes and photo when there is no sample

    @functools.cached_property
    def _shapes_and_photo(self) -> tuple[int, bool]:
        return _shapes_and_photo(self.sample) if self.sample else self.guessed

    @property
    def shapes(self) -> int:
        return self._shapes_and_photo[0]

    @property
    def photo(self) -> bool:
        return self._shapes_and_photo[1]


def _colour_name(rgb: tuple[int, int, int]) -> str:
    return min(_PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, _PALETTE[name])))


def _dominant(img: Image.Image) -> tuple[str, str]:
    """The palette colour most pixels of a 16x16 thumbnail are nearest to, and their mean as hex."""
    small = img.convert("RGB").resize((16, 16), Image.Resampling.BOX)
    counts: Counter[str] = Counter()
    sums: dict[str, list[int]] = {}
    for count, colour in small.getcolors(256) or []:
        rgb = typing.cast(tuple[int, int, int], colour)
        name = _colour_name(rgb)
        counts[name] += count
        total = sums.setdefault(name, [0, 0, 0])
        for i in range(3):
            total[i] += rgb[i] * count
    name, count = counts.most_common(1)[0]
    return name, "#" + "".join(f"{round(c / count):02x}" for c in sums[name])


def _size_class(width: int, height: int) -> str:
    side = max(width, height)
    return "small" if side < 256 else "medium" if side < 1024 else "large"


def _regions(names: list[str], background: str, side: int) -> list[int]:
    """The sizes of the 4-neighbour regions of a side x side grid whose colour is not the background."""
    seen = [name == background for name in names]
    sizes = []
    for start in range(len(names)):
        if seen[start]:
            continue
        seen[start], queue, size = True, deque([start]), 0
        while queue:
            at = queue.popleft()
            size += 1
            y, x = divmod(at, side)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < side and 0 <= nx < side and not seen[ny * side + nx]:
                    seen[ny * side + nx] = True
                    queue.append(ny * side + nx)
        sizes.append(size)
    return sizes


def _sample(img: Image.Image) -> bytes:
    """A 32x32 point-sampled thumbnail (sampled, so that edges do not blend into colours of their own)."""
    return img.convert("RGB").resize((32, 32), Image.Resampling.NEAREST).tobytes()


def _shapes_and_photo(data: bytes) -> tuple[int, bool]:
    """Regions off the background on a 32x32 RGB sample, and whether it looks like a photo rather
    than a drawing."""
    memo: dict[bytes, str] = {}
    names = []
    for k in range(0, len(data), 3):
        pixel = data[k: k + 3]
        if (name := memo.get(pixel)) is None:
            name = memo[pixel] = _colour_name((pixel[0], pixel[1], pixel[2]))
        names.append(name)
    common = Counter(names).most_common(2)
    shapes = sum(1 for size in _regions(names, common[0][0], 32) if size >= 3)
    return shapes, sum(count for _, count in common) < 0.8 * len(names)


# OpenAI's words for an image it will not take (PROVIDER_FACTS 5.1), and what it takes (5.2):
# PNG, JPEG, WebP and non-animated GIF, below 20 MB.
_UNSUPPORTED = ("You uploaded an unsupported image. Please make sure your image is below 20 MB in size and is of "
                "one the following formats: ['png', 'jpeg', 'gif', 'webp'].")
_ACCEPTED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF"}
_ACCEPTED_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}
_LARGEST_IMAGE = 20 * 1024 * 1024
_DOWNLOAD_TIMEOUT_S = 2.0


def _check_accepted(img: Image.Image, size: int) -> None:
    """Refuse, by the decoded content (not the data URL's MIME type), what OpenAI refuses; and
    8-bit modes only: CMYK and 16-bit pictures are what browsers and decoders get wrong."""
    if img.format not in _ACCEPTED_FORMATS or size >= _LARGEST_IMAGE:
        raise Invalid(_UNSUPPORTED, None, "invalid_image_format")
    if img.format == "GIF" and getattr(img, "is_animated", False):
        raise Invalid(_UNSUPPORTED, None, "invalid_image_format")
    if img.mode not in _ACCEPTED_MODES:
        raise Invalid(f"Invalid image mode {img.mode}: expected an 8-bit grey, palette, RGB or RGBA image.", None,
                      "invalid_image_mode")


def _decode(url: str) -> ImageFacts:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise Invalid("Invalid image.", None, "invalid_image")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise Invalid("Invalid image.", None, "invalid_image") from None
    return _facts(data)


def _download(url: str) -> ImageFacts:
    """An image URL fetched as OpenAI fetches one, in its words when that fails."""
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as reply:
            data = reply.read(_LARGEST_IMAGE + 1)
    except TimeoutError:
        raise Invalid(f"Timeout while downloading {url}.", None, "invalid_image_url") from None
    except (OSError, ValueError):  # urllib's HTTPError and URLError are OSErrors
        raise Invalid(f"Error while downloading {url}.", None, "invalid_image_url") from None
    return _facts(data)


def _facts(data: bytes) -> ImageFacts:
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_accepted(img, len(data))
            width, height = img.size
            img.draft("RGB", (128, 128))  # JPEG: decode at a reduced scale, enough for 32x32 samples
            img.load()
            colour, hex_ = _dominant(img)
            sample = _sample(img)
    except _DECODE_ERRORS:
        raise Invalid("Invalid image.", None, "invalid_image") from None
    return ImageFacts(width, height, f"{width}x{height} image, mostly {colour} ({hex_})", colour,
                      _size_class(width, height), sample)


def _url_image(url: str) -> ImageFacts:
    host = re.sub(r"^https?://", "", url).split("/", 1)[0]
    w, h = tokens.UNKNOWN_SIZE
    return ImageFacts(w, h, f"an image from {host} (not fetched)", size_class=_size_class(w, h))


NO_IMAGE = ImageFacts(1, 1, "no image given", size_class="small", guessed=(0, False))


class ImageCache:
    """Image facts by the hash of their data: URL, bounded; other URLs are described without a
    look, or fetched when `download` says (each time: a host may fail once and not the next)."""

    def __init__(self, download: bool = False) -> None:
        self._lock = threading.Lock()
        self._images: dict[str, ImageFacts] = {}
        self._download = download

    def look(self, url: str, param: str) -> ImageFacts:
        if not url.startswith("data:"):
            if not self._download:
                return _url_image(url)
            try:
                return _download(url)
            except Invalid as exc:
                raise Invalid(exc.message, param, exc.code) from None
        key = hashlib.sha256(url.encode()).hexdigest()
        if (cached := self._images.get(key)) is not None:
            return cached
        try:
            image = _decode(url)
        except Invalid as exc:
            raise Invalid(exc.message, param, exc.code) from None
        with self._lock:
            if len(self._images) >= 4096:  # bound memory on long benchmark runs
                self._images.clear()
            self._images[key] = image
        return image
