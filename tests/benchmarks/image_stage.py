"""P6, the image stage: `pipeline.images.to_parts` against a naive Pillow loop on 12 MP JPEGs.

Naive: `Image.open`, `thumbnail((1024, 1024))`, save JPEG at our quality, base64. Both run in
this one thread, interleaved image by image (alternating which goes first) so machine noise
falls on both alike; "per core" is images per CPU second of this thread. Visual equality is the
PSNR of our decoded output against naive's, per image, at the same size.

Beside it, two rows in rows per wall-clock second, with no target of their own:
- TIFF: photo-like 3000x2000 TIFFs, every other one LZW-compressed, which `to_parts` converts
  to JPEG; naive converts to RGB, then as above. Interleaved in this one thread as above.
- Remote: the JPEGs above served by aiohttp on 127.0.0.1, from a thread of this process, with
  no latency added (a host across a network would favour fetching several at once further).
  Ours as the local engine prepares rows (pipeline/engines/local.py `_Local`): rows at once, each
  fetched by `Fetcher.fetch_all` (FetchConfig's defaults: 8 at once per host), then `to_parts`
  in a thread. Naive: `requests`, one image at a time, then as above. Whole passes over the
  rows, alternating which side goes first.

Run it standalone with `.venv/bin/python tests/benchmarks/image_stage.py [--smoke]`.
The file name does not start with test_, so pytest does not collect it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from aiohttp import web
from common import HOST, Figure, standalone
from PIL import Image, ImageChops, ImageFilter

from pipeline.config import FetchConfig, PromptConfig
from pipeline.fetch import Fetcher
from pipeline.images import _JPEG_QUALITY, to_parts

MAX_SIDE = 1024
TARGET_RATIO = 2.0
TARGET_PSNR_DB = 35.0
PROMPT = PromptConfig(max_side=MAX_SIDE)
ROWS_AT_ONCE = 20  # the local engine's workers at its default concurrency (16 + 4)


@dataclass(frozen=True)
class Scale:
    photos: int
    size: tuple[int, int]  # of each photo, in pixels
    rounds: int  # passes over the photos, and over the TIFFs
    tiffs: int
    tiff_size: tuple[int, int]


FULL = Scale(20, (4000, 3000), 2, 12, (3000, 2000))
SMOKE = Scale(2, (1600, 1200), 1, 2, (1500, 1000))  # still larger than MAX_SIDE: downscaled like the full ones


def photo_like(n: int, size: tuple[int, int]) -> Iterator[Image.Image]:
    """n photo-like RGB pictures: gradients and blurred noise, shifted per picture so no two
    are alike and none compresses to nothing."""
    vertical = Image.linear_gradient("L").resize(size)
    horizontal = Image.linear_gradient("L").rotate(90).resize(size)
    noise = Image.effect_noise(size, 48).filter(ImageFilter.GaussianBlur(1))
    for i in range(n):
        bands = (ImageChops.add(vertical, ImageChops.offset(noise, 37 * i, 11 * i), scale=2),
                 ImageChops.offset(horizontal, 53 * i, 0),
                 ImageChops.offset(noise, 0, 71 * i))
        yield Image.merge("RGB", bands)


def photos(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """n photo-like JPEGs at quality 90."""
    folder.mkdir(parents=True)
    paths = []
    for i, picture in enumerate(photo_like(n, size)):
        path = folder / f"photo{i:03d}.jpg"
        picture.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def tiffs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """n photo-like TIFFs, every other one LZW-compressed (as scanners and microscopes write
    them; on noise LZW gains nothing, so these are the larger ones), the rest uncompressed."""
    folder.mkdir(parents=True)
    paths = []
    for i, picture in enumerate(photo_like(n, size)):
        path = folder / f"scan{i:03d}.tif"
        picture.save(path, "TIFF", compression="tiff_lzw" if i % 2 else None)
        paths.append(path)
    return paths


def thumbnail_b64(image: Image.Image) -> str:
    """The naive steps after opening: `thumbnail`, JPEG at our quality, base64."""
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def naive(source: Path | io.BytesIO) -> str:
    with Image.open(source) as image:
        return thumbnail_b64(image)


def naive_tiff(path: Path) -> str:
    with Image.open(path) as image:
        return thumbnail_b64(image.convert("RGB"))


def ours(path: Path) -> str:
    return to_parts([str(path)], path.parent, PROMPT)[0].url.partition(",")[2]


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


def timed(paths: list[Path], rounds: int, baseline: Callable[[Path], str] = naive
          ) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """CPU and wall seconds per side over `rounds` passes, interleaved image by image, and the
    PSNR of each image (first pass)."""
    sides = {"ours": ours, "naive": baseline}
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


@contextmanager
def served(folder: Path) -> Iterator[str]:
    """The folder's files over HTTP from 127.0.0.1, by aiohttp in a thread of its own; yields
    the base URL."""
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_static("/", folder)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, HOST, 0).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def fetched_row(fetcher: Fetcher, gate: asyncio.Semaphore, url: str) -> str:
    """One row prepared as `_Local._prepare` does: its image fetched, then `to_parts` in a thread."""
    async with gate:
        fetched = await fetcher.fetch_all([url])
        parts = await asyncio.to_thread(to_parts, [url], Path(), PROMPT, fetched)
    return parts[0].url.partition(",")[2]


async def fetched_rows(urls: list[str]) -> list[str]:
    fetcher = Fetcher(FetchConfig())
    gate = asyncio.Semaphore(ROWS_AT_ONCE)
    try:
        return list(await asyncio.gather(*(fetched_row(fetcher, gate, url) for url in urls)))
    finally:
        await fetcher.aclose()


def ours_remote(urls: list[str]) -> list[str]:
    return asyncio.run(fetched_rows(urls))


def naive_remote(urls: list[str]) -> list[str]:
    """One image at a time: downloaded, then the naive steps. The session ignores the
    environment's proxy settings, so nothing but 127.0.0.1 is asked."""
    with requests.Session() as session:
        session.trust_env = False
        out = []
        for url in urls:
            reply = session.get(url, timeout=60)
            reply.raise_for_status()
            out.append(naive(io.BytesIO(reply.content)))
    return out


def timed_remote(urls: list[str], rounds: int) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """Process CPU and wall seconds per side over `rounds` whole passes over the rows,
    alternating which side goes first, and the PSNR of each row (first pass). The CPU is the
    whole process's (the server thread's too): how many cores each side kept busy."""
    sides = {"ours": ours_remote, "naive": naive_remote}
    cpu = dict.fromkeys(sides, 0.0)
    wall = dict.fromkeys(sides, 0.0)
    psnrs: list[float] = []
    for round_ in range(rounds):
        out = {}
        for name in (("ours", "naive") if round_ % 2 else ("naive", "ours")):
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            out[name] = sides[name](urls)
            cpu[name] += time.process_time() - cpu_start
            wall[name] += time.perf_counter() - wall_start
        if round_ == 0:
            psnrs = [psnr(a, b) for a, b in zip(out["ours"], out["naive"], strict=True)]
    return cpu, wall, psnrs


def psnr_text(psnrs: list[float]) -> str:
    return f"PSNR against naive min {min(psnrs):.1f} dB"


def tiff_figure(work: Path, scale: Scale) -> Figure:
    paths = tiffs(work / "p6-tiffs", scale.tiffs, scale.tiff_size)
    cpu, wall, psnrs = timed(paths, scale.rounds, naive_tiff)
    runs = len(paths) * scale.rounds
    setting = (f"{len(paths)} TIFF {scale.tiff_size[0]}x{scale.tiff_size[1]} RGB, every other one LZW -> JPEG, max_side "
               f"{MAX_SIDE}, 1 thread; CPU-time ratio {cpu['naive'] / cpu['ours']:.2f}×; {psnr_text(psnrs)}")
    return Figure("P6 … TIFF manifest", "- (informational: rows/s beside naive Pillow)",
                  f"{runs / wall['ours']:.1f} rows/s ({setting})", f"{runs / wall['naive']:.1f} rows/s",
                  f"{wall['naive'] / wall['ours']:.2f}×")


def remote_figure(photo_paths: list[Path], scale: Scale) -> Figure:
    with served(photo_paths[0].parent) as base:
        urls = [f"{base}/{path.name}" for path in photo_paths]
        cpu, wall, psnrs = timed_remote(urls, scale.rounds)
    runs = len(urls) * scale.rounds
    setting = (f"{len(urls)} JPEG {scale.size[0]}x{scale.size[1]} over HTTP from {HOST}, no latency added; "
               f"{ROWS_AT_ONCE} rows at once, FetchConfig per_host {FetchConfig().per_host}; "
               f"{cpu['ours'] / wall['ours']:.2f} cores busy; {psnr_text(psnrs)}")
    return Figure("P6 … remote-image manifest", "- (informational: rows/s beside `requests` + naive Pillow)",
                  f"{runs / wall['ours']:.1f} rows/s ({setting})",
                  f"{runs / wall['naive']:.1f} rows/s, one at a time ({cpu['naive'] / wall['naive']:.2f} cores busy)",
                  f"{wall['naive'] / wall['ours']:.2f}×")


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
        tiff_figure(work, scale),
        remote_figure(paths, scale),
    ]


if __name__ == "__main__":
    sys.exit(standalone(figures, lambda done: done, lambda done: [], FULL, SMOKE))
