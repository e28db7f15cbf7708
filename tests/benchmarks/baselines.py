"""The comparison baselines of the performance issue: the loop a user writes without the pipeline.

    python tests/benchmarks/baselines.py {openai,litellm,litellm-router,httpx} --base-url URL \
        --manifest CSV --concurrency C --out OUT.parquet [--model gpt-4o] [--max-tokens 50] \
        [--max-side N] [--rpm N]

One script, four clients, one shape: read the manifest with Polars (column `image`, paths relative
to the manifest's folder), turn each image into a base64 data URL (the file's bytes as they are, or
with --max-side a plain Pillow `thumbnail` saved as JPEG), send one chat completion per row under
`asyncio.Semaphore(C)` + `asyncio.gather`, keep the results in memory and write them with one
`write_parquet` at the end. A failed row becomes a row with its error text; the script never stops
on one.

- openai: `openai.AsyncOpenAI(...).chat.completions.create`.
- litellm: `litellm.acompletion(model="openai/<model>", api_base=...)`, with its remote lookups
  (price map, Anthropic beta headers, blog posts) switched to the copies it ships, and its
  callbacks and debug output off.
- litellm-router: `litellm.Router(...).acompletion` over one deployment whose `litellm_params`
  carry `rpm` (--rpm, the limit the user states), with the strategy LiteLLM documents for
  keeping to it ("Rate-Limit Aware v2", `usage-based-routing-v2`: it counts each deployment's
  requests per whole UTC minute and refuses one over its rpm with a 429 of its own, Retry-After
  60) and the router's own retries (2, its default); remote lookups off as for litellm.
- httpx: `httpx.AsyncClient` on `httpx_aiohttp.AiohttpTransport`, POST the JSON body, read
  choices[0].message.content and usage: the ceiling, with the least parsing.

It prints one JSON line: rows, ok, errors, seconds (in process, from just before reading the
manifest to after the Parquet write), first_request_at and last_answer_at (epoch seconds, around
the first send and the last answer) and cpu_s (this process's user+system CPU, imports included).
The API key comes from the environment variable named by common.KEY_ENV and is never printed.
Run it as a subprocess with the venv's interpreter; the benchmark scripts do.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import importlib.util
import io
import json
import mimetypes
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import KEY_ENV

PROMPT = "Describe this image."
Result = dict[str, Any]
Send = Callable[[str], Awaitable[tuple[str | None, int | None, int | None]]]


def data_url(path: Path, max_side: int | None) -> str:
    """The image as a data URL: its bytes as they are, or a JPEG no larger than max_side."""
    if max_side is None:
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        raw = path.read_bytes()
    else:
        from PIL import Image

        with Image.open(path) as src:
            img = src.convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        mime, raw = "image/jpeg", buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def messages(url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": PROMPT},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        }
    ]


# --- the three clients: each returns (send, close) ------------------------------------------


def openai_client(args: argparse.Namespace, key: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import openai

    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=key)

    async def send(url: str) -> tuple[str | None, int | None, int | None]:
        resp = await client.chat.completions.create(
            model=args.model, messages=messages(url), max_tokens=args.max_tokens  # type: ignore[arg-type]
        )
        usage = resp.usage
        return (
            resp.choices[0].message.content,
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )

    return send, client.close


def quiet_litellm() -> Any:
    """The litellm module with its remote lookups off, and its callbacks and debug output too."""
    # Before the import: use the price map, Anthropic beta-header table and blog posts that the
    # package ships instead of fetching them; only the simulator on 127.0.0.1 is contacted.
    for name in ("LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "LITELLM_LOCAL_BLOG_POSTS"):
        os.environ[name] = "True"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import logging

    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.set_verbose = False  # type: ignore[attr-defined]
    litellm.callbacks = []
    litellm.success_callback = []
    litellm.failure_callback = []
    litellm.turn_off_message_logging = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return litellm


def answer(resp: Any) -> tuple[str | None, int | None, int | None]:
    """The text and token counts of a LiteLLM response."""
    usage = getattr(resp, "usage", None)
    return (
        resp.choices[0].message.content,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None,
    )


async def nothing_to_close() -> None:
    return None


def litellm_client(args: argparse.Namespace, key: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    litellm = quiet_litellm()

    async def send(url: str) -> tuple[str | None, int | None, int | None]:
        return answer(await litellm.acompletion(
            model=f"openai/{args.model}",
            api_base=args.base_url,
            api_key=key,
            messages=messages(url),
            max_tokens=args.max_tokens,
        ))

    return send, nothing_to_close


def litellm_router_client(args: argparse.Namespace, key: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    if args.rpm is None:
        raise SystemExit("litellm-router needs --rpm: the deployment's limit")
    litellm = quiet_litellm()  # its callbacks emptied before the router adds its usage counter to them
    deployment = {"model_name": args.model,
                  "litellm_params": {"model": f"openai/{args.model}", "api_base": args.base_url, "api_key": key,
                                     "rpm": args.rpm}}

    @functools.cache
    def router() -> Any:
        """Made on first use, inside the run's event loop: its usage counter starts a task on the
        loop running (made outside one, it would make a loop of its own that never runs)."""
        return litellm.Router(model_list=[deployment], routing_strategy="usage-based-routing-v2")

    async def send(url: str) -> tuple[str | None, int | None, int | None]:
        return answer(await router().acompletion(model=args.model, messages=messages(url),
                                                 max_tokens=args.max_tokens))

    return send, nothing_to_close


def httpx_client(args: argparse.Namespace, key: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import httpx
    from httpx_aiohttp import AiohttpTransport

    c = args.concurrency
    client = httpx.AsyncClient(
        transport=AiohttpTransport(limits=httpx.Limits(max_connections=c, max_keepalive_connections=c)),
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(60.0),
    )
    endpoint = args.base_url.rstrip("/") + "/chat/completions"

    async def send(url: str) -> tuple[str | None, int | None, int | None]:
        body = {"model": args.model, "messages": messages(url), "max_tokens": args.max_tokens}
        resp = await client.post(endpoint, json=body)
        resp.raise_for_status()
        data = resp.json()
        usage = data.get("usage") or {}
        return data["choices"][0]["message"]["content"], usage.get("prompt_tokens"), usage.get("completion_tokens")

    return send, client.aclose


CLIENTS = {"openai": openai_client, "litellm": litellm_client, "litellm-router": litellm_router_client,
           "httpx": httpx_client}
NEEDS = {"openai": "openai", "litellm": "litellm", "litellm-router": "litellm",
         "httpx": "httpx_aiohttp"}  # from the bench extra


def not_installed(client: str) -> str | None:
    """The module a client needs that this interpreter cannot import, or None."""
    module = NEEDS[client]
    return None if importlib.util.find_spec(module) else module


# --- the loop ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, paths: list[Path], send: Send, stamps: dict[str, float]) -> list[Result]:
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i: int, path: Path) -> Result:
        async with sem:
            try:
                url = data_url(path, args.max_side)
                if "first_request_at" not in stamps:
                    stamps["first_request_at"] = time.time()
                answer, prompt_tokens, completion_tokens = await send(url)
                stamps["last_answer_at"] = time.time()
                return {"id": i, "answer": answer, "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens, "error": None}
            except Exception as exc:  # a failed row is a row, as in the scripts users write
                stamps["last_answer_at"] = time.time()
                return {"id": i, "answer": None, "prompt_tokens": None, "completion_tokens": None,
                        "error": f"{type(exc).__name__}: {exc}"}

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(paths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--concurrency", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument("--max-tokens", type=int, default=50)
    parser.add_argument("--max-side", type=int, default=None)
    parser.add_argument("--rpm", type=int, default=None, help="the requests-a-minute limit stated (litellm-router)")
    args = parser.parse_args(argv)

    import polars as pl

    key = os.environ[KEY_ENV]
    send, close = CLIENTS[args.client](args, key)

    async def whole() -> list[Result]:
        try:
            return await run(args, paths, send, stamps)
        finally:
            await close()

    stamps: dict[str, float] = {}
    start = time.perf_counter()
    manifest = pl.read_csv(args.manifest)
    folder = args.manifest.parent
    paths = [folder / p for p in manifest["image"].to_list()]
    results = asyncio.run(whole())
    schema = {"id": pl.Int64, "answer": pl.String, "prompt_tokens": pl.Int64,
              "completion_tokens": pl.Int64, "error": pl.String}
    pl.DataFrame(results, schema=schema).write_parquet(args.out)
    seconds = time.perf_counter() - start

    usage = resource.getrusage(resource.RUSAGE_SELF)
    errors = sum(r["error"] is not None for r in results)
    print(json.dumps({
        "rows": len(results),
        "ok": len(results) - errors,
        "errors": errors,
        "seconds": round(seconds, 4),
        "first_request_at": stamps.get("first_request_at"),
        "last_answer_at": stamps.get("last_answer_at"),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
