"""Token counts a provider would charge for images and text, from sizes alone.

Owns: the image-token rules of PROVIDER_FACTS.md (OpenAI tile and patch rules, Claude's
pixel rule, Gemini's tiles) and a text approximation. Used to reserve rate-limit budget
before a request, by the simulator to count usage the provider's way, and by estimates.
Never: I/O. Output token columns always come from the provider's `usage`, not from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Detail", "image_tokens", "text_tokens", "input_tokens", "UNKNOWN_SIZE"]

Detail = Literal["low", "high", "auto"]
ImageRule = Callable[[int, int, Detail], int]

# An image whose pixels are not known here (an http(s) URL) is expected to be a 1024x1024
# one; at worst it is the costliest of these shapes.
UNKNOWN_SIZE = (1024, 1024)
_LARGEST = ((2048, 768), (768, 2048), (2048, 2048), (4000, 3000), (3000, 4000))


@dataclass(frozen=True, slots=True)
class _Tiles:
    base: int
    per_tile: int

    def __call__(self, w: int, h: int, detail: Detail) -> int:
        if detail == "low":
            return self.base
        # 'auto' is billed like 'high' in practice (PROVIDER_FACTS 1.1), so reserve that.
        scale = min(1.0, 2048 / max(w, h))
        if min(w, h) * scale > 768:  # shrink only: small images are not upscaled
            scale *= 768 / (min(w, h) * scale)
        tiles = math.ceil(round(w * scale, 6) / 512) * math.ceil(round(h * scale, 6) / 512)
        return self.base + self.per_tile * tiles


@dataclass(frozen=True, slots=True)
class _Patches:
    multiplier: float

    def __call__(self, w: int, h: int, detail: Detail) -> int:
        patches = math.ceil(w / 32) * math.ceil(h / 32)
        if patches > 1536:
            r = math.sqrt(32 * 32 * 1536 / (w * h))
            r *= min(math.floor(w * r / 32) / (w * r / 32), math.floor(h * r / 32) / (h * r / 32))
            # rounding first: binary floats turn 44.0 into 44.0000000001 and ceil into 45
            patches = math.ceil(round(w * r / 32, 6)) * math.ceil(round(h * r / 32, 6))
        return math.ceil(round(patches * self.multiplier, 6))  # 150 * 1.62 is 243.00000000000003


def _claude(w: int, h: int, detail: Detail) -> int:
    # Anthropic shrinks an image whose long edge passes 1568 px or that would pass ~1,600 tokens.
    scale = min(1.0, 1568 / max(w, h), math.sqrt(1_600 * 750 / (w * h)))
    return math.ceil(w * scale * h * scale / 750)


def _gemini(w: int, h: int, detail: Detail) -> int:
    if w <= 384 and h <= 384:
        return 258
    crop = max(1, math.floor(min(w, h) / 1.5))
    return 258 * math.ceil(w / crop) * math.ceil(h / crop)


# Longest matching prefix wins, so 'gpt-4o-mini' is found before 'gpt-4o'.
_RULES: dict[str, ImageRule] = {
    "gpt-4o-mini": _Tiles(2833, 5667),
    "gpt-4o": _Tiles(85, 170),
    "gpt-4.1-mini": _Patches(1.62),
    "gpt-4.1-nano": _Patches(2.46),
    "gpt-4.1": _Tiles(85, 170),
    "gpt-4.5": _Tiles(85, 170),
    "gpt-5-mini": _Patches(1.62),
    "gpt-5-nano": _Patches(2.46),
    "gpt-5": _Tiles(70, 140),
    "o4-mini": _Patches(1.72),
    "o1": _Tiles(75, 150),
    "o3": _Tiles(75, 150),
    "computer-use": _Tiles(65, 129),
    "claude": _claude,
    "gemini": _gemini,
}
_DEFAULT_RULE: ImageRule = _RULES["gpt-4o"]


def _rule(model: str) -> ImageRule:
    name = model.rsplit("/", 1)[-1].lower()  # gateways write 'openai/gpt-4o'
    matches = [prefix for prefix in _RULES if name.startswith(prefix)]
    return _RULES[max(matches, key=len)] if matches else _DEFAULT_RULE


def image_tokens(model: str, width: int, height: int, detail: Detail = "auto") -> int:
    """Input tokens one image of this size costs on this model."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return _rule(model)(width, height, detail)


def text_tokens(text: str) -> int:
    """About four characters a token: the usual approximation for English text."""
    return math.ceil(len(text) / 4)


def input_tokens(
    model: str,
    texts: Iterable[str],
    image_sizes: Iterable[tuple[int, int] | None],
    detail: Detail,
    worst: bool = False,
) -> int:
    """Input tokens of a request: expected, or at worst (a token per byte of text, as no
    byte-level tokenizer does worse; an image of unknown size at its costliest shape)."""
    count = (lambda t: len(t.encode("utf-8"))) if worst else text_tokens
    text = sum(count(t) + 4 for t in texts)  # + per-message framing
    images = 0
    for size in image_sizes:
        candidates = [size] if size else (_LARGEST if worst else [UNKNOWN_SIZE])
        images += max(image_tokens(model, w, h, detail) for w, h in candidates)
    return text + images
