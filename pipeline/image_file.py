"""Opening one image file safely: what it is, why it cannot be read, and what Pillow said.

Owns: turning any failure of Pillow on a hostile file into a RowInputError named by its
cause (empty, truncated, corrupt, a decompression bomb, an unknown format), the cheap check of
a file's end that finds truncation without decoding, the EXIF orientation of every format that
carries one, and Pillow's warnings, kept per thread for the row's notes instead of printed.
Never: deciding what is sent (images.py), or I/O beyond the bytes handed in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from .errors import RowInputError

__all__ = ["Buffer", "opened", "truncation", "orientation", "is_image_file", "is_image_name", "suffix_of", "HEIF_EXTRA"]

log = logging.getLogger(__name__)

HEIF_EXTRA = "annotate-pipeline[heif]"
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"mif1", b"msf1")
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk with its CRC: eight bytes that only end a PNG


# The whole file, in memory or mapped: both find, rfind and slice (an mmap searches from its
# read position unless given a start, so every search here names one).
Buffer = bytes | mmap.mmap


try:  # HEIC and HEIF, when the extra is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
    _HEIF = True
except ImportError:
    _HEIF = False


# --- Pillow's warnings, per thread ----------------------------------------------------------

_local = threading.local()
_fallback: Any = None


def _show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
          file: Any = None, line: str | None = None) -> None:
    caught = getattr(_local, "caught", None)
    if caught is None:
        _fallback(message, category, filename, lineno, file, line)
        return
    caught.append(str(message))
    log.debug("Pillow: %s", message)


def _install() -> None:
    """Route Pillow's warnings through `_show`, every time: a test harness or a library may
    have swapped `showwarning` since. 'always' so that a file's warning is seen on every row,
    not only the first time its line warns."""
    global _fallback
    if warnings.showwarning is not _show:
        _fallback = warnings.showwarning
        warnings.showwarning = _show
        warnings.filterwarnings("always", module="PIL")


@contextlib.contextmanager
def _caught(notes: list[str]) -> Iterator[None]:
    """Pillow's warnings in this thread go to `notes`, not to the terminal. (warnings.catch_warnings
    changes process-wide state: threads preparing rows side by side would take each other's.)"""
    _install()
    _local.caught = notes
    try:
        yield
    finally:
        _local.caught = None


# --- opening ----------------------------------------------------------------------------------


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _unknown(head: bytes, label: str) -> RowInputError:
    if _is_heif(head) and not _HEIF:
        return RowInputError(f"{label} is HEIF, which needs the {HEIF_EXTRA} extra: pip install '{HEIF_EXTRA}'")
    if head.lstrip()[:1] == b"<":
        return RowInputError(f"{label} is not an image (it is HTML or XML text)")
    return RowInputError(f"{label} is not an image (unknown format)")


def _cause(exc: Exception, label: str) -> RowInputError:
    """A failure of Pillow, named for a person: Pillow raises nearly anything on hostile files."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return RowInputError(f"{label} is a decompression bomb ({text})")
    if "truncated" in text or isinstance(exc, EOFError):
        return RowInputError(f"{label} is truncated ({text})")
    if "Ghostscript" in text:
        return RowInputError(f"{label} is EPS, which Pillow renders only through Ghostscript: install it "
                             "(apt-get install ghostscript)")
    if isinstance(exc, NotImplementedError):
        return RowInputError(f"{label} uses a variant of its format Pillow cannot read ({text})")
    if isinstance(exc, MemoryError):
        return RowInputError(f"{label} is too large to decode in memory")
    return RowInputError(f"{label} is corrupt ({type(exc).__name__}: {text})")


@contextlib.contextmanager
def opened(buf: Buffer, label: str, notes: list[str], file: BinaryIO | None = None) -> Iterator[Image.Image]:
    """The image Pillow opens from `file`, or from `buf` (the file's bytes) when no file is
    given, usable inside the block; every exception raised by Pillow in the block (opening,
    decoding, converting) comes out as a RowInputError naming the cause, and Pillow's warnings
    are added to `notes`. (An mmap is not handed to Pillow: some formats seek past its end.)"""
    with _caught(notes):
        try:
            with Image.open(file or io.BytesIO(buf[:])) as image:
                if 0 in image.size or isinstance(image, ImageFile.StubImageFile):
                    raise RowInputError(f"{label} is {image.format}, which Pillow can name but not decode")
                yield image
        except UnidentifiedImageError:
            raise _unknown(buf[:64], label) from None
        except RowInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any of Pillow's failures is this row's error
            raise _cause(exc, label) from None


def truncation(buf: Buffer, fmt: str | None) -> str | None:
    """Why a JPEG, PNG, GIF or WebP file is cut short, from its end alone; None when it ends as
    its format says (other formats are decoded whole before they are sent, which finds it)."""
    if fmt in ("JPEG", "MPO"):
        scan = _jpeg_scan(buf)  # the main image's data: FFD9 cannot occur inside it (byte stuffing)
        return None if scan > 0 and buf.rfind(b"\xff\xd9", scan) != -1 else "no end-of-image marker"
    if fmt == "PNG":
        return None if buf.rfind(_PNG_END, 0) != -1 else "no IEND chunk"
    if fmt == "GIF":
        return None if buf[-1:] == b";" else "no GIF trailer"
    if fmt == "WEBP":
        declared = int.from_bytes(buf[4:8], "little") + 8
        return None if declared <= len(buf) else f"RIFF says {declared} bytes, the file has {len(buf)}"
    return None


def _jpeg_scan(buf: Buffer) -> int:
    """Where the first start-of-scan's data begins, walking the segments (so an EXIF thumbnail's
    own markers are stepped over); 0 when the file ends first."""
    at = 2
    while at + 4 <= len(buf):
        head = buf[at:at + 4]
        if head[0] != 0xFF:
            return 0
        if head[1] == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(head[2:4], "big")
        if head[1] == 0xDA:
            return at + 2 + length
        at += 2 + length
    return 0


def orientation(image: Image.Image, buf: Buffer) -> int:
    """The EXIF orientation (1-8) still to apply, 1 when none. A PNG keeps EXIF in an eXIf chunk or an
    ImageMagick text chunk that may follow the pixels, so it is looked for only when present."""
    if image.format == "TIFF":  # Pillow turns a TIFF upright itself: its size and pixels are upright already
        return 1
    if image.format == "PNG" and buf.find(b"eXIf", 0) == -1 and buf.find(b"Raw profile type exif", 0) == -1:
        return 1
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def suffix_of(name: str) -> str:
    """'.png' of 'a/b.PNG' (a path or URL); '' when the last part has no dot."""
    last = name.rstrip("/").rsplit("/", 1)[-1]
    return "." + last.rsplit(".", 1)[-1].lower() if "." in last else ""


def is_image_name(name: str) -> bool:
    """Whether a file's suffix is one of a format Pillow reads (not the save-only ones: .pdf)."""
    return Image.registered_extensions().get(suffix_of(name)) in Image.OPEN


def is_image_file(path: Path) -> bool:
    """Whether a file is in a format Pillow reads: by its suffix, else by its first bytes (a
    file of a known suffix that turns out broken is still listed: its row says why)."""
    if is_image_name(path.name):
        return True
    try:
        with _caught([]), Image.open(path):
            return True
    except Exception:  # noqa: BLE001 - not an image, whatever Pillow raised
        return False
