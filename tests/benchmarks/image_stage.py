"""P6, the image stage: `pipeline.images.to_parts` against a naive Pillow loop on 12 MP JPEGs.

Naive: `Image.open`, `thumbnail((1024, 1024))`, save JPEG at our quality, base64. Both run in
this one thread, interleaved image by image (alternating which goes first) so machine noise
falls on both alike; "per core" is images per CPU second of this thread. Visual equality is the
PSNR of our decoded output against naive's, per image, at the same size.

Run it standalone with `.venv/bin/python tests/benchmarks/image_stage.py [--smoke]`.
The file name does not start with test_, so pytest does not collect it.
"""

from __future__ import annotations

import base64
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageFilter

from common import Figure, standalone
from pipeline.config import PromptConfig
from pipeline.images import _JPEG_QUALITY, to_parts

MAX_SIDE = 1024
TARGET_RATIO = 2.0
TARGET_PSNR_DB = 35.0


@dataclass(frozen=True)
class Scale:
    photos: int
    size: tuple[int, int]  # of each photo, in pixels
    rounds: int  # passes over the photos


FULL = Scale(20, (4000, 3000), 2)
SMOKE = Scale(2, (1600, 1200), 1)  # still larger than MAX_SIDE: downscaled like the full ones


def photos(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """n photo-like JPEGs at quality 90: gradients and blurred noise, shifted per image so no
    two are alike and none compresses to nothing."""
    folder.mkdir(parents=True)
    vertical = Image.linear_gradient("L").resize(size)
    horizontal = Image.linear_gradient("L").rotate(90).resize(size)
    noise = Image.effect_noise(size, 48).filter(ImageFilter.GaussianBlur(1))
    paths = []
    for i in range(n):
        bands = (ImageChops.add(vertical, ImageChops.offset(noise, 37 * i, 11 * i), scale=2),
                 ImageChops.offset(horizontal, 53 * i, 0),
                 ImageChops.offset(noise, 0, 71 * i))
        path = folder / f"photo{i:03d}.jpg"
        Image.merge("RGB", bands).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def naive(path: Path) -> str:
    with Image.open(path) as image:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def ours(path: Path) -> str:
    return to_parts([str(path)], path.parent, PromptConfig(max_side=MAX_SIDE))[0].url.partition(",")[2]


def psnr(ours_b64: str, naive_b64: str) -> float:
    """PSNR in dB of two base64 JPEGs over their decoded RGB pixels; from the difference's
    histogram, so no numpy is needed."""
    with Image.open(io.BytesIO(base64.b64decode(ours_b64))) as a, \
            Image.open(io.BytesIO(base64.b64decode(naive_b64))) as b:
        if a.size != b.size:
            raise ValueError(f"sizes differ: ours {a.size}, naive {b.size}")
        histogram = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).histogram()  # 256 per band
        mse = sum(count * (i % 256) ** 2 for i, count in enumerate(histogram)) / (a.width * a.height * 3)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def timed(paths: list[Path], rounds: int) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """CPU and wall seconds per side over `rounds` passes, interleaved image by image, and the
    PSNR of each image (first pass)."""
    sides = {"ours": ours, "naive": naive}
    cpu = dict.fromkeys(sides, 0.0)
    wall = dict.fromkeys(sides, 0.0)
    psnrs = []
    for round_ in range(rounds):
        for i, path in enumerate(paths):
            out = {}
            for name in (("ours", "naive") if (i + round_) % 2 else ("naive", "ours")):
                cpu_start, wall_start = time.thread_time(), time.perf_counter()
                out[name] = sides[name](path)
                cpu[name] += time.thread_time() - cpu_start
                wall[name] += time.perf_counter() - wall_start
            if round_ == 0:
                psnrs.append(psnr(out["ours"], out["naive"]))
    return cpu, wall, psnrs


def figures(work: Path, scale: Scale = FULL) -> list[Figure]:
    paths = photos(work / "p6-photos", scale.photos, scale.size)
    cpu, wall, psnrs = timed(paths, scale.rounds)
    runs = len(paths) * scale.rounds
    ratio, wall_ratio = cpu["naive"] / cpu["ours"], wall["naive"] / wall["ours"]
    worst = min(psnrs)
    met = ratio >= TARGET_RATIO and worst >= TARGET_PSNR_DB
    setting = f"{len(paths)} JPEG {scale.size[0]}x{scale.size[1]} q90 -> max_side {MAX_SIDE}, 1 thread"
    misses = []
    if ratio < TARGET_RATIO:
        misses.append(f"CPU-time ratio {ratio:.2f}× < {TARGET_RATIO:g}×")
    if worst < TARGET_PSNR_DB:
        misses.append(f"min PSNR {worst:.1f} dB < {TARGET_PSNR_DB:g} dB")
    return [
        Figure("P6 image preparation", f"≥ {TARGET_RATIO:g}× naive Pillow per core; PSNR ≥ {TARGET_PSNR_DB:g} dB",
               f"{runs / cpu['ours']:.1f} images/s per core ({setting}; wall-clock ratio {wall_ratio:.2f}×)",
               f"{runs / cpu['naive']:.1f} images/s per core", f"{ratio:.2f}×", met,
               "; ".join(misses)),
        Figure("P6 image preparation: PSNR against naive", f"≥ {TARGET_PSNR_DB:g} dB (part of P6)",
               f"min {worst:.1f} dB, mean {sum(psnrs) / len(psnrs):.1f} dB over {len(psnrs)} images"),
    ]


if __name__ == "__main__":
    sys.exit(standalone(figures, lambda done: done, lambda done: [], FULL, SMOKE))
