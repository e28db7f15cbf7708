"""Image references -> chat content parts, in a form every provider accepts.

Owns: deciding, from an image's header, what is sent: the file as it is (JPEG, PNG, WebP or a
single-frame GIF, in a plain mode, within the byte cap), or a re-encoding (another format,
CMYK or 16-bit pixels, an animation's frames, a downscale, an EXIF turn); doing it; the data
URLs; the pixel sizes an estimate counts. Never: HTTP (remote bytes come in `fetched`), retries.
Every function here is plain and blocking: the engines call it off the event loop.
"""

from __future__ import annotations

import base64
import io
import math
import mmap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

from PIL import Image, ImageCms

from . import objects
from .config import PromptConfig
from .errors import RowInputError
from .image_file import Buffer, opened, orientation, truncation
from .manifest import ImageRef

__all__ = ["ImagePart", "to_parts", "read_file", "sniff_mime", "sizes_as_sent", "sizes_from_head", "resolve", "is_remote",
           "notes_text"]

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),  # after 'RIFF' and the length
)
# What providers decode as it is (PROVIDER_FACTS 5.2: PNG, JPEG, WebP, non-animated GIF), by
# Pillow's format and the modes sent unchanged; MPO is a JPEG with a second picture appended.
_SENT_AS_IS = {"JPEG": {"L", "RGB"}, "MPO": {"L", "RGB"}, "PNG": {"1", "L", "LA", "P", "RGB", "RGBA"},
               "GIF": {"L", "P", "RGB", "RGBA"}, "WEBP": {"L", "LA", "RGB", "RGBA"}}
_STILL = {"MPO", "PSD"}  # formats whose further "frames" are not pictures in sequence
_DEEP = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # more than 8 bits a sample
_JPEG_QUALITY = 90
_QUARTER_TURNS = frozenset({5, 6, 7, 8})  # EXIF orientations whose upright picture swaps width and height
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}
_REMOTE = ("http://", "https://")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclass(frozen=True, slots=True)
class ImagePart:
    url: str  # a data: URL, or an http(s) URL passed through
    size: tuple[int, int] | None  # pixels as sent; None where not known here (remote URLs passed through)
    note: str | None = None  # what was done to the image on the way, when anything was

    def content(self, detail: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": self.url, "detail": detail}}


def sniff_mime(data: bytes) -> str | None:
    """The MIME type of a format the providers accept, from the bytes; None for any other."""
    for magic, offset, mime in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return mime
    return None


def is_remote(ref: ImageRef) -> TypeGuard[str]:
    """An http(s) URL, the scheme in any case (HTTPS://, as URLs may be written)."""
    return isinstance(ref, str) and ref[:8].lower().startswith(_REMOTE)


def resolve(ref: str, root: Path) -> Path:
    """The file a reference names: a leading ~ expanded, a relative path under `root`."""
    path = Path(ref).expanduser()
    return path if path.is_absolute() else root / path


def read_file(ref: str, root: Path) -> bytes:
    """The bytes of a local file a reference names; RowInputError when it cannot be read."""
    try:
        path = resolve(ref, root)
        return path.read_bytes()
    except FileNotFoundError:
        raise RowInputError(f"missing file {path}") from None
    except (OSError, ValueError, RuntimeError) as exc:  # also a NUL in the path, an unknown ~user
        raise RowInputError(f"cannot read {ref!r}: {exc}") from None


# --- what is sent -------------------------------------------------------------------------------


def _fitted(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The size an image is downscaled to so that it fits max_side (aspect kept)."""
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _upright(size: tuple[int, int], turn: int) -> tuple[int, int]:
    return (size[1], size[0]) if turn in _QUARTER_TURNS else size


def _spread(total: int, wanted: int) -> tuple[int, ...]:
    """`wanted` frame numbers spread evenly over `total`, first and last included."""
    if wanted >= total:
        return tuple(range(total))
    if wanted == 1:
        return (0,)
    return tuple(sorted({round(k * (total - 1) / (wanted - 1)) for k in range(wanted)}))


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


@dataclass(frozen=True, slots=True)
class _Plan:
    """What is sent of one image, decided from its header: `reasons` empty means the file as it is."""

    frames: tuple[int, ...]
    size: tuple[int, int]  # pixels each frame is sent at, upright when re-encoded
    fitted: tuple[int, int]  # the same before the EXIF turn
    turn: int  # EXIF orientation applied when re-encoding
    reasons: tuple[str, ...]
    decoded: bool  # converted from another format or mode, or frames of an animation: no header says it decodes


def _frames(image: Image.Image, whole: bool) -> int:
    """An animation's frames; 1 for a still. An MPO's second picture is a camera's extra (a depth
    map, a large preview), a PSD's are its layers (the picture is their composite): neither is a
    frame. Counting may need the whole file: from a file's first bytes, 1 when it does."""
    if image.format in _STILL:
        return 1
    try:
        return getattr(image, "n_frames", 1) if getattr(image, "is_animated", False) else 1
    except Exception:  # noqa: BLE001 - Pillow ran out of data
        if whole:
            raise
        return 1


def _plan(image: Image.Image, buf: Buffer, label: str, prompt: PromptConfig, whole: bool = True) -> _Plan:
    """`whole`: `buf` is the whole file, not only its first bytes (a remote image's, for an estimate)."""
    fmt, mode = image.format or "unknown", image.mode
    if whole and (cut := truncation(buf, fmt)):
        raise RowInputError(f"{label} is truncated ({cut})")
    total = _frames(image, whole)
    frames = _spread(total, prompt.frames)
    turn = orientation(image, buf)
    fitted = _fitted(image.size, prompt.max_side)
    reasons = []
    if fmt not in _SENT_AS_IS:
        reasons.append(f"converted from {fmt}")
    if mode not in _SENT_AS_IS.get(fmt, {"L", "LA", "P", "RGB", "RGBA"}):
        reasons.append(f"{mode} to {'8-bit' if mode in _DEEP else 'RGB'}")
    decoded = bool(reasons) or total > 1
    if total > 1:
        what = "pages" if fmt == "TIFF" else "frames"
        reasons.append(f"first of {total} {what}" if frames == (0,) else
                       f"{what} {', '.join(str(f + 1) for f in frames)} of {total}")
    if fitted != image.size:
        reasons.append(f"downscaled {image.width}x{image.height} to {'x'.join(map(str, _upright(fitted, turn)))}")
    if len(buf) > prompt.max_image_bytes and not reasons:
        reasons.append(f"re-encoded: {_mb(len(buf))} is over prompt.max_image_bytes")
    if turn != 1 and (reasons or fmt not in ("JPEG", "MPO")):  # a JPEG sent as it is keeps its EXIF
        reasons.append(f"turned upright (EXIF orientation {turn})")
    size = _upright(fitted, turn) if reasons else image.size
    return _Plan(frames, size, fitted, turn, tuple(reasons), decoded)


# --- re-encoding --------------------------------------------------------------------------------


def _eight_bit(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The pixels in a mode a PNG or JPEG holds (1, L, LA, P, RGB, RGBA), and a note when the
    values were rescaled."""
    mode = image.mode
    if mode in ("1", "L", "LA", "P", "RGB", "RGBA"):
        return (image.convert("RGBA") if mode == "P" and "transparency" in image.info else image), None
    if mode == "CMYK":
        icc = image.info.get("icc_profile")
        if icc:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB"), None  # type: ignore[return-value]
        return image.convert("RGB"), None
    if mode in _DEEP:
        wide = image.convert("I") if mode.startswith("I;16") else image
        low, high = wide.getextrema()  # one band: two numbers
        assert isinstance(low, (int, float)) and isinstance(high, (int, float))
        if high <= 255 and low >= 0:
            return wide.convert("L"), None
        scale = 255 / (high - low) if high > low else 1.0
        return wide.point(lambda v: (v - low) * scale).convert("L"), f"values {low:g}-{high:g} scaled to 0-255"
    alpha = "A" in mode or "a" in mode or "transparency" in image.info
    return image.convert("RGBA" if alpha else "RGB"), None


def _saved(picture: Image.Image, lossless: bool, icc: bytes | None) -> tuple[bytes, str]:
    """PNG for transparency and for palette or bilevel pictures not resampled; JPEG otherwise."""
    buffer = io.BytesIO()
    if lossless or picture.mode in ("LA", "RGBA", "PA"):
        picture.save(buffer, "PNG", optimize=False, icc_profile=icc)
        return buffer.getvalue(), "image/png"
    picture = picture if picture.mode in ("L", "RGB") else picture.convert("RGB")
    picture.save(buffer, "JPEG", quality=_JPEG_QUALITY, icc_profile=icc)
    return buffer.getvalue(), "image/jpeg"


def _render(image: Image.Image, frame: int, plan: _Plan) -> tuple[Image.Image, bool, str | None]:
    """One frame, in an 8-bit mode, resized to the plan and turned upright; whether it should
    stay lossless; a note on rescaled values."""
    if frame:
        image.seek(frame)
    # Drafting straight to the size lets libjpeg scale in the DCT domain (a 4000x3000 JPEG bound
    # for 1024 decodes at 2000x1500): ~2.5x faster than `thumbnail`, which keeps a 2x margin, and
    # alike to the eye (PSNR > 45 dB; tests/benchmarks/image_stage.py). JPEG only: None elsewhere.
    drafted = image.draft(None, plan.fitted) if plan.fitted != image.size else None
    picture, note = _eight_bit(image)
    lossless = picture.mode in ("1", "P")
    if plan.fitted != picture.size:
        if lossless:  # Pillow resamples a palette by the nearest pixel only
            picture = picture.convert("RGBA" if "transparency" in picture.info else "RGB")
            lossless = False
        box = drafted[1] if drafted else None
        picture = picture.resize(plan.fitted, Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    if plan.turn in _TURNS:
        picture = picture.transpose(_TURNS[plan.turn])
    return picture, lossless, note


def _within_cap(picture: Image.Image, lossless: bool, icc: bytes | None, cap: int,
                label: str) -> tuple[bytes, str, str | None]:
    """The encoded picture, downscaled until it fits `cap` bytes; a note when it had to be."""
    data, mime = _saved(picture, lossless, icc)
    first = len(data)
    for _ in range(6):
        if len(data) <= cap:
            break
        scale = math.sqrt(cap / len(data)) * 0.9
        picture = picture.resize((max(1, int(picture.width * scale)), max(1, int(picture.height * scale))),
                                 Image.Resampling.BICUBIC)
        data, mime = _saved(picture, False, icc)
    if len(data) > cap:
        raise RowInputError(f"{label} cannot be made smaller than prompt.max_image_bytes ({_mb(cap)})")
    note = None if len(data) == first else (
        f"downscaled to {picture.width}x{picture.height} to fit prompt.max_image_bytes ({_mb(first)} encoded)")
    return data, mime, note


def _data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _encode(data: bytes, label: str, prompt: PromptConfig) -> list[ImagePart]:
    if not data:
        raise RowInputError(f"{label} is empty")
    warned: list[str] = []
    parts = []
    with opened(data, label, warned) as image:
        plan = _plan(image, data, label, prompt)
        if not plan.reasons:
            mime = sniff_mime(data) or "image/jpeg"  # MPO sniffs as JPEG
            return [ImagePart(_data_url(data, mime), plan.size, _joined(warned))]
        icc = image.info.get("icc_profile") if image.mode != "CMYK" else None
        for frame in plan.frames:
            picture, lossless, rescaled = _render(image, frame, plan)
            encoded, mime, shrunk = _within_cap(picture, lossless, icc, prompt.max_image_bytes, label)
            note = _joined([*plan.reasons, *([rescaled] if rescaled else []), *([shrunk] if shrunk else []), *warned])
            parts.append(ImagePart(_data_url(encoded, mime), (picture.width, picture.height), note))
    return parts


def _joined(notes: Sequence[str]) -> str | None:
    return ", ".join(dict.fromkeys(notes)) or None  # dict: unique, in order


def _part(ref: ImageRef, root: Path, prompt: PromptConfig, fetched: Mapping[str, bytes]) -> list[ImagePart]:
    if isinstance(ref, bytes):
        return _encode(ref, "image bytes", prompt)
    if ref in fetched:  # http(s) or object-store URLs, fetched by the engine
        return _encode(fetched[ref], ref, prompt)
    if ref.startswith("data:") or is_remote(ref):
        return [ImagePart(ref, None)]
    return _encode(read_file(ref, root), ref, prompt)


def to_parts(refs: Sequence[ImageRef], root: Path, prompt: PromptConfig | None = None,
             fetched: Mapping[str, bytes] | None = None) -> list[ImagePart]:
    """The content parts of a row's image references (an animation may give several): local
    files read, remote ones taken from `fetched` where they were fetched (else passed through
    as URLs). RowInputError names the first unusable one, or a request over its byte cap."""
    if not refs:
        raise RowInputError("no image in this row")
    prompt = prompt or PromptConfig()
    parts = [part for ref in refs for part in _part(ref, root, prompt, fetched or {})]
    carried = sum(len(part.url) for part in parts)
    if carried > prompt.max_request_bytes:
        raise RowInputError(f"the row's images are {_mb(carried)} as sent, over prompt.max_request_bytes "
                            f"({_mb(prompt.max_request_bytes)})")
    return parts


def notes_text(parts: Sequence[ImagePart]) -> str | None:
    """The row's image_notes: each image's note, numbered when the row has several parts."""
    if len(parts) == 1:
        return parts[0].note
    return "; ".join(f"image {k}: {part.note}" for k, part in enumerate(parts, 1) if part.note) or None


# --- sizes for estimates ----------------------------------------------------------------------


def sizes_as_sent(ref: ImageRef, root: Path, prompt: PromptConfig | None = None) -> tuple[tuple[int, int], ...] | None:
    """The pixels of each image the reference will be sent as, decided as `to_parts` decides
    but from the header and the file's end alone (the file is mapped, not read); None for a
    remote or object-store URL. RowInputError when the run would refuse it."""
    prompt = prompt or PromptConfig()
    if is_remote(ref) or objects.is_object_url(ref) or isinstance(ref, str) and ref.startswith("data:"):
        return None
    if isinstance(ref, bytes):
        return _sizes(ref, "image bytes", prompt)
    path = resolve(ref, root)
    try:
        with open(path, "rb") as f:
            if not f.seek(0, io.SEEK_END):
                raise RowInputError(f"{ref} is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                f.seek(0)
                return _sizes(mapped, ref, prompt, f)
    except FileNotFoundError:
        raise RowInputError(f"missing file {path}") from None
    except (OSError, ValueError, RuntimeError) as exc:  # a folder, a NUL in the path, an unknown ~user
        raise RowInputError(f"cannot read {ref!r}: {exc}") from None


def _sizes(buf: Buffer, label: str, prompt: PromptConfig, file: BinaryIO | None = None) -> tuple[tuple[int, int], ...]:
    """An image converted from another format or mode, or an animation's frames, is decoded
    here too, as the run will: their decoders fail in ways no header shows. A JPEG, PNG, WebP
    or GIF that is only downscaled is not (its truncation shows at its end)."""
    if not len(buf):
        raise RowInputError(f"{label} is empty")
    with opened(buf, label, [], file) as image:
        plan = _plan(image, buf, label, prompt)
        if plan.decoded:
            for frame in plan.frames:
                if frame:  # as _render does: some formats refuse seek(0)
                    image.seek(frame)
                image.load()
    return (plan.size,) * len(plan.frames)


def sizes_from_head(head: bytes, label: str, prompt: PromptConfig) -> tuple[tuple[int, int], ...]:
    """What `sizes_as_sent` says of a remote image, from its first bytes (a ranged GET): all but
    what only the whole file shows (a cut end, a broken decode, the frames of a GIF)."""
    with opened(head, label, []) as image:
        plan = _plan(image, head, label, prompt, whole=False)
    return (plan.size,) * len(plan.frames)
