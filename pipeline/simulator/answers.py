"""Simulated completions: what the simulator answers to a chat-completions request body.

Owns: validating a body the way the provider does (`Invalid` carries the 400's message, param
and code), `response_format` included; the facts of its images (size, dominant colour, shapes,
photo or drawing, decoded from data: URLs and cached; other URLs described, not fetched); the
answer texts (prose, or JSON following the schema asked for, flawed as the caller drew), usage
counts, the completion JSON, the SSE chunk events, the model list and OpenAI-style error bodies.
Never: a server, sockets, headers, auth, faults, flaw draws or rate limits; no I/O beyond
decoding data: URLs. Plain blocking functions: the simulator calls `parse` off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import hashlib
import io
import json
import math
import re
import struct
import threading
import time
import typing
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from PIL import Image

from ..cost import tokens

__all__ = ["JSON", "Invalid", "ImageFacts", "ImageCache", "Parsed", "parse", "answer_texts", "count_usage",
           "completion_head", "completion_body", "chunk_events", "models_body", "error_body"]

JSON = dict[str, Any]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
_INT_RANGES = {"n": (1, 128), "max_tokens": (1, None), "max_completion_tokens": (1, None)}
_ERRORS: dict[int, tuple[str, str | None, str]] = {  # status -> (type, code, message), as OpenAI words them
    400: ("invalid_request_error", None, "Bad request (scripted by the simulator)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to use this model."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (simulated). Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (215, 35, 35),
    "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60), "cyan": (40, 200, 220),
    "blue": (30, 70, 210), "purple": (130, 50, 180), "pink": (240, 130, 180), "brown": (130, 80, 40),
}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_MODEL_IDS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini")
_FORMATS = ("text", "json_object", "json_schema")
# CreateChatCompletionRequest's properties in OpenAI's OpenAPI spec (2.3.0): any other key is refused.
_PARAMS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options"})
# OpenAI's reasoning models, by name: the o-series and the gpt-5 family, but for gpt-5's chat model.
_REASONING = ("o1", "o3", "o4", "gpt-5")
_REASONING_DEFAULTS = {"temperature": 1, "top_p": 1}
# Keywords Structured Outputs refuses in a strict schema.
_NOT_PERMITTED = ("allOf", "oneOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
                  "patternProperties", "unevaluatedProperties", "propertyNames", "minProperties", "maxProperties")
_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_DESCRIBED: JSON = {"type": "object", "properties": {"description": {"type": "string"}}, "required": ["description"]}
_DEPTH = 32  # how deep a schema is followed: recursive $refs end there
_WRONG: tuple[tuple[str, Any], ...] = (("string", "n/a"), ("number", 0.5), ("boolean", True), ("array", []),
                                       ("object", {}))  # a value of the first type a node does not allow breaks it


class Invalid(Exception):
    """A body the provider would refuse with a 400: its message, the offending param and a code."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


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


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request body: what the answer, the usage, the log and the fault draw need."""

    model: str
    n: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    prompt: str  # the last user message's text, for the answer
    prompt_tokens: int
    images: tuple[ImageFacts, ...]
    markers: tuple[str, ...]
    digest: str  # of the body without stream fields: a retry is the same request
    logged: JSON
    response_format: str | None = None  # its type: text, json_object or json_schema
    schema: JSON | None = None  # the JSON Schema the answer follows; None: a prose answer


def models_body() -> JSON:
    """The answer to GET /v1/models: the models the simulator names (it serves any name it is asked for)."""
    return {"object": "list", "data": [
        {"id": model, "object": "model", "created": 0, "owned_by": "simulator"} for model in _MODEL_IDS]}


def error_body(status: int, message: str | None = None, *, param: str | None = None,
               code: str | None = None) -> JSON:
    """The OpenAI-style `{"error": ...}` body for a status; message and code default to OpenAI's wording."""
    kind, default_code, default_message = _ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, f"Simulated error {status}."))
    error = {"message": message or default_message, "type": kind, "param": param, "code": code or default_code}
    return {"error": error}


# --- images -----------------------------------------------------------------------------


def _data_url_summary(url: str) -> str:
    head, _, payload = url.partition(",")
    return f"{head},<{len(payload) * 3 // 4} bytes>"


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


_NO_IMAGE = ImageFacts(1, 1, "no image given", size_class="small", guessed=(0, False))


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


# --- request validation -------------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_options(body: JSON) -> None:
    for name, (lo, hi) in _RANGES.items():
        value = body.get(name)
        if value is not None and not (_is_number(value) and lo <= value <= hi):
            raise Invalid(f"Invalid '{name}': expected a number from {lo} to {hi}, got {value!r}.", name)
    for name, (low, high) in _INT_RANGES.items():
        value = body.get(name)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and low <= value and (high is None or value <= high)):
            limit = f"an integer from {low} to {high}" if high else f"an integer >= {low}"
            raise Invalid(f"Invalid '{name}': expected {limit}, got {value!r}.", name)
    bias = body.get("logit_bias")
    if bias is not None and not (isinstance(bias, dict) and all(
            isinstance(k, str) and re.fullmatch(r"\d+", k) and _is_number(v) and -100 <= v <= 100
            for k, v in bias.items())):
        raise Invalid("Invalid 'logit_bias': keys must be token ids, values from -100 to 100.", "logit_bias")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
        raise Invalid("Invalid 'stop': expected a string or a list of at most 4 strings.", "stop")
    for name, kind in (("stream", bool), ("user", str), ("stream_options", dict)):
        if body.get(name) is not None and not isinstance(body[name], kind):
            raise Invalid(f"Invalid '{name}': expected a {kind.__name__}.", name)
    include = (body.get("stream_options") or {}).get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise Invalid("Invalid 'stream_options.include_usage': expected a boolean.", "stream_options.include_usage")


def _is_reasoning(model: str) -> bool:
    name = model.rsplit("/", 1)[-1]
    return name.startswith(_REASONING) and not name.startswith("gpt-5-chat")


def _check_params(body: JSON, model: str) -> None:
    """The keys OpenAI refuses before it reads anything else: unknown ones, stream_options without
    stream, and what a reasoning model does not take."""
    for name in body:
        if name not in _PARAMS:
            raise Invalid(f"Unrecognized request argument supplied: {name}", None)
    if "stream_options" in body and body.get("stream") is not True:
        raise Invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    if not _is_reasoning(model):
        return
    if "max_tokens" in body:
        raise Invalid("Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                      "'max_completion_tokens' instead.", "max_tokens", "unsupported_parameter")
    for name, default in _REASONING_DEFAULTS.items():
        if name in body and body[name] != default:
            raise Invalid(f"Unsupported value: '{name}' does not support {body[name]!r} with this model. Only the "
                          f"default ({default}) value is supported.", name, "unsupported_value")


def _strict_problem(node: Any, context: tuple[str, ...]) -> str | None:
    """What breaks Structured Outputs' strict rules in this schema node, as OpenAI words it."""
    if not isinstance(node, dict):
        return None
    where = f"In context={context!r}"
    for key in _NOT_PERMITTED:
        if key in node:
            return f"{where}, '{key}' is not permitted"
    kinds = node.get("type")
    if kinds == "object" or (isinstance(kinds, list) and "object" in kinds) or "properties" in node:
        if node.get("additionalProperties") is not False:
            return f"{where}, 'additionalProperties' is required to be supplied and to be false"
        properties = node.get("properties") or {}
        missing = [name for name in properties if name not in (node.get("required") or [])]
        if missing:
            return (f"{where}, 'required' is required to be supplied and to be an array including every key in "
                    f"properties. Missing '{missing[0]}'")
        for name, sub in properties.items():
            if problem := _strict_problem(sub, (*context, "properties", name)):
                return problem
    for key in ("$defs", "definitions"):
        for name, sub in (node.get(key) or {}).items():
            if problem := _strict_problem(sub, (*context, key, name)):
                return problem
    options = [("items", node["items"])] if "items" in node else []
    options += [(f"anyOf/{i}", sub) for i, sub in enumerate(node.get("anyOf") or [])]
    for key, sub in options:
        if problem := _strict_problem(sub, (*context, *key.split("/"))):
            return problem
    return None


@functools.lru_cache(maxsize=256)
def _strict_schema_problem(text: str) -> str | None:
    schema = json.loads(text)
    if schema.get("type") != "object":
        return f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{schema.get('type')}\"'"
    return _strict_problem(schema, ())


def _type_name(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def _check_format(body: JSON, texts: list[str]) -> tuple[str | None, JSON | None]:
    """The response_format's type and, for json_schema, its schema, checked as OpenAI checks them."""
    fmt = body.get("response_format")
    if fmt is None:
        return None, None
    if not isinstance(fmt, dict):
        raise Invalid(f"Invalid type for 'response_format': expected an object, but got {_type_name(fmt)} instead.",
                      "response_format")
    kind = fmt.get("type")
    if kind not in _FORMATS:
        raise Invalid(f"Invalid value: {kind!r}. Supported values are: 'json_object', 'json_schema', and 'text'.",
                      "response_format.type")
    if kind == "json_object" and not any("json" in text.lower() for text in texts):
        raise Invalid("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                      "'json_object'.", "messages")
    if kind != "json_schema":
        return str(kind), None
    where = "response_format.json_schema"
    spec = fmt.get("json_schema")
    if spec is None:
        raise Invalid(f"Missing required parameter: '{where}'.", where)
    if not isinstance(spec, dict):
        raise Invalid(f"Invalid type for '{where}': expected an object, but got {_type_name(spec)} instead.", where)
    name, strict, schema = spec.get("name"), spec.get("strict"), spec.get("schema")
    if name is None:
        raise Invalid(f"Missing required parameter: '{where}.name'.", f"{where}.name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise Invalid(f"Invalid '{where}.name': string does not match pattern. Expected a string that matches "
                      "the pattern '^[a-zA-Z0-9_-]{1,64}$'.", f"{where}.name")
    if strict is not None and not isinstance(strict, bool):
        raise Invalid(f"Invalid type for '{where}.strict': expected a boolean, but got {_type_name(strict)} instead.",
                      f"{where}.strict")
    if not isinstance(schema, dict):
        raise Invalid(f"Invalid type for '{where}.schema': expected an object, but got {_type_name(schema)} instead.",
                      f"{where}.schema")
    if (problem := _schema_problem(json.dumps(schema, sort_keys=True))) is not None:
        raise Invalid(f"Invalid schema for response_format '{name}': {problem}.", f"{where}.schema")
    if strict and (problem := _strict_schema_problem(json.dumps(schema, sort_keys=True))) is not None:
        raise Invalid(f"Invalid schema for response_format '{name}': {problem}.", "response_format")
    return kind, schema


@functools.lru_cache(maxsize=256)  # a run sends one schema over and over; checking it takes milliseconds
def _schema_problem(text: str) -> str | None:
    try:
        Draft202012Validator.check_schema(json.loads(text))
    except SchemaError as exc:
        return str(exc.message)
    return None


def _embedded_schema(texts: Iterable[str]) -> JSON | None:
    """The first JSON object with a "properties" key written in these texts, as a prompt carries a schema."""
    decoder = json.JSONDecoder()
    for text in texts:
        start = text.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(text, start)
            except ValueError:
                value = None
            if isinstance(value, dict) and "properties" in value:
                return value
            start = text.find("{", start + 1)
    return None


def _parts(i: int, message: object) -> list[tuple[str, JSON]]:
    """A message's content as (param, part) pairs; a string content is one text part."""
    where = f"messages.[{i}]"
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise Invalid(f"Invalid '{where}.role': expected one of {sorted(_ROLES)}.", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str) or (content is None and message["role"] == "assistant"):
        return [(f"{where}.content", {"type": "text", "text": content or ""})]
    if not isinstance(content, list) or not content:
        raise Invalid(f"Invalid '{where}.content': expected a string or a list of parts.", f"{where}.content")
    parts = []
    for j, part in enumerate(content):
        param = f"{where}.content.[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append((param, part))
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            url, detail = part["image_url"].get("url"), part["image_url"].get("detail", "auto")
            if not isinstance(url, str) or not url.startswith(("data:", "http://", "https://")):
                raise Invalid("Invalid image URL.", f"{param}.image_url", "invalid_image_url")
            if detail not in ("low", "high", "auto"):
                raise Invalid(f"Invalid '{param}.image_url.detail': expected low, high or auto.",
                               f"{param}.image_url.detail")
            parts.append((param, part))
        else:
            raise Invalid(f"Invalid content part at '{param}'.", f"{param}.type")
    return parts


def _logged(value: Any) -> Any:
    """The body with every data: URL replaced by its size, so the log stays small."""
    if isinstance(value, dict):
        return {k: _logged(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_logged(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and ";base64," in value[:100]:
        return _data_url_summary(value)
    return value


def _digest(body: JSON) -> str:
    same = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


def parse(body: object, cache: ImageCache) -> Parsed:
    """Validate a request body and look at its images (off the event loop: Pillow decodes here)."""
    if not isinstance(body, dict):
        raise Invalid("We could not parse the JSON body of your request.", None)
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise Invalid("you must provide a model parameter", "model")
    if not isinstance(messages, list) or not messages:
        raise Invalid("Invalid 'messages': expected a non-empty array.", "messages")
    _check_params(body, model)
    pairs = [(m, _parts(i, m)) for i, m in enumerate(messages)]
    _check_options(body)
    texts = [(m["role"], part["text"]) for m, parts in pairs for _, part in parts if part["type"] == "text"]
    response_format, schema = _check_format(body, [text for _, text in texts])
    prompt_tokens, prompt, markers, images = 0, "", [], []
    for message, parts in pairs:
        user = message["role"] == "user"
        for param, part in parts:
            if part["type"] == "text":
                prompt_tokens += tokens.text_tokens(part["text"]) + 4
                markers += [part["text"]] if user else []
                continue
            url, detail = part["image_url"]["url"], part["image_url"].get("detail", "auto")
            image = cache.look(url, f"{param}.image_url")
            prompt_tokens += tokens.image_tokens(model, image.width, image.height, detail)
            images.append(image)
            markers.append(_data_url_summary(url) if url.startswith("data:") else url[:200])
        if user:
            prompt = " ".join(part["text"] for _, part in parts if part["type"] == "text")
    if schema is not None:  # json_schema: the provider puts the schema in the prompt, and counts it
        prompt_tokens += tokens.text_tokens(json.dumps(schema))
    else:  # json_object or prompt: a schema written in the messages (not the model's own), if any
        schema = _embedded_schema(text for role, text in texts if role != "assistant")
        schema = _DESCRIBED if schema is None and response_format == "json_object" else schema
    options = body.get("stream_options") or {}
    return Parsed(model, body.get("n") or 1, body.get("max_completion_tokens") or body.get("max_tokens"),
                   bool(body.get("stream")), bool(options.get("include_usage")), prompt, prompt_tokens,
                   tuple(images), tuple(markers), _digest(body), _logged(body), response_format, schema)


# --- answers ------------------------------------------------------------------------------


def _prose(parsed: Parsed) -> list[str]:
    prompt = " ".join(parsed.prompt.split())
    head = f'[simulated] re "{prompt[:40]}{"..." if len(prompt) > 40 else ""}":'
    many = len(parsed.images) > 1
    sentences = [f"{'Image %d: ' % (k + 1) if many else ''}{img.description}." for k, img in enumerate(parsed.images)]
    base = " ".join([head, *(sentences or ["no image given."])])
    return [f"{'(variant %d) ' % i if i else ''}{base}" for i in range(parsed.n)]


def _follow(ref: str, root: JSON) -> Any:
    """What a local $ref ("#" or "#/$defs/name") points at; None for anything else."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    target: Any = root
    for key in ref[2:].split("/") if ref != "#" else []:
        target = target.get(key.replace("~1", "/").replace("~0", "~")) if isinstance(target, dict) else None
    return target


def _resolve(node: Any, root: JSON, depth: int) -> JSON:
    """The node behind local $refs, and the non-null option of anyOf/oneOf; {} for what cannot be followed."""
    for _ in range(_DEPTH - depth):
        if not isinstance(node, dict):
            return {}
        if isinstance(node.get("$ref"), str):
            node = _follow(node["$ref"], root)
            continue
        options = next((node[key] for key in ("anyOf", "oneOf") if isinstance(node.get(key), list) and node[key]),
                       None)
        if options is None:
            return node
        node = next((o for o in options if _resolve(o, root, depth + 1).get("type") != "null"), options[0])
    return {}


def _kinds(node: JSON) -> list[str]:
    """The node's JSON types, null last; inferred from properties or items when it names none."""
    named = node.get("type")
    kinds = [named] if isinstance(named, str) else [k for k in named if isinstance(k, str)] if isinstance(
        named, list) else []
    kinds.sort(key=lambda kind: kind == "null")
    return kinds or ["object" if "properties" in node else "array" if "items" in node else "string"]


def _among(word: str, values: Sequence[Any]) -> Any:
    """The value that spells this word, any case (grey and gray alike), or None."""
    spellings = {"grey", "gray"} if word in ("grey", "gray") else {word.lower()}
    return next((v for v in values if isinstance(v, str) and v.lower() in spellings), None)


def _hashed(text: str, count: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) % count


def _bounded(value: float, node: JSON) -> float:
    low, high = node.get("minimum"), node.get("maximum")
    if isinstance(low, (int, float)) and value < low:
        value = low
    if isinstance(high, (int, float)) and value > high:
        value = high
    return value


def _array(node: JSON, name: str, root: JSON, facts: ImageFacts, depth: int) -> list[Any]:
    """Strings: colour, size class, photo or drawing (those of the items' enum, if any); else one item;
    padded to minItems (with unused enum values, else repeats) and cut to maxItems."""
    items = _resolve(node.get("items", {}), root, depth + 1)
    enum = items.get("enum")
    values: list[Any] = []
    spare: list[Any] = []
    if _kinds(items)[0] == "string" and "const" not in items:
        words = [facts.colour, facts.size_class, "photo" if facts.photo else "drawing"]
        if isinstance(enum, list) and enum:
            values = [v for v in (_among(w, enum) for w in words) if v is not None]
            spare = [v for v in enum if v not in values and v is not None]
        else:
            values, spare = words, [facts.description]
        values = list(dict.fromkeys(values))
    values = values or [_value(items, name, root, facts, depth + 1)]
    low, high = node.get("minItems"), node.get("maxItems")
    for k in range(low - len(values) if isinstance(low, int) else 0):
        values.append(spare.pop(0) if spare else values[k % len(values)])
    return values[:high] if isinstance(high, int) else values


def _value(node: Any, name: str, root: JSON, facts: ImageFacts, depth: int) -> Any:
    """The answer for one schema node, by its type and the field's name, from the image's facts."""
    node = _resolve(node, root, depth)
    if "const" in node:
        return node["const"]
    enum = node.get("enum")
    if isinstance(enum, list) and enum:
        choices = [v for v in enum if v is not None] or enum
        for word in (facts.colour, facts.size_class):
            if (match := _among(word, choices)) is not None:
                return match
        return choices[_hashed(facts.description, len(choices))]
    kind = _kinds(node)[0]
    if kind == "boolean":
        return facts.photo
    if kind == "integer":
        return int(_bounded(facts.shapes, node))
    if kind == "number":
        return _bounded(round(facts.width / facts.height, 3), node)
    if kind == "array":
        return _array(node, name, root, facts, depth) if depth < _DEPTH else []
    if kind == "object":
        properties = node.get("properties")
        if not isinstance(properties, dict) or depth >= _DEPTH:
            return {}
        return {str(key): _value(sub, str(key), root, facts, depth + 1) for key, sub in properties.items()}
    if kind == "null":
        return None
    lowered = name.lower()
    text = (facts.colour if "colour" in lowered or "color" in lowered
            else facts.size_class if "size" in lowered else facts.description)
    limit = node.get("maxLength")
    return text[:limit] if isinstance(limit, int) else text


def _wrong(node: JSON) -> Any:
    """A value of a type this node does not allow."""
    if "enum" in node or "const" in node:
        return []
    allowed = set(_kinds(node))
    return next(value for kind, value in _WRONG if kind not in allowed)


def _broken(value: Any, schema: JSON) -> Any:
    """The answer without its first required property, or else with its first property of a wrong type."""
    root = _resolve(schema, schema, 0)
    if not isinstance(value, dict):
        return _wrong(root)
    required = root.get("required")
    present = [key for key in required if key in value] if isinstance(required, list) else []
    if present:
        del value[present[0]]
        return value
    if not value:
        return []
    first = next(iter(value))
    properties = root.get("properties")
    value[first] = _wrong(_resolve(properties.get(first, {}) if isinstance(properties, dict) else {}, schema, 1))
    return value


def _structured(parsed: Parsed, schema: JSON, flaws: Sequence[str | None]) -> list[str]:
    """The JSON answer per choice, from the first image; a flaw makes it invalid JSON or breaks the schema."""
    value = _value(schema, "", schema, parsed.images[0] if parsed.images else _NO_IMAGE, 0)
    texts = []
    for i in range(parsed.n):
        flaw = flaws[i] if i < len(flaws) else None
        if flaw == "schema_break":
            texts.append(json.dumps(_broken(copy.deepcopy(value), schema), separators=(",", ":")))
            continue
        text = json.dumps(value, separators=(",", ":"))
        if flaw == "invalid_json":  # alternately cut in half, or wrapped in chatter
            text = (text[: len(text) // 2] if (int(parsed.digest[:8], 16) + i) % 2
                    else f"Here is the JSON: {text} Hope this helps!")
        texts.append(text)
    return texts


def answer_texts(parsed: Parsed, flaws: Sequence[str | None] = ()) -> list[tuple[str, str]]:
    """(content, finish_reason) per choice: deterministic from the prompt and the images, prose or
    JSON of `parsed.schema`; flaws, one per choice ("invalid_json", "schema_break" or None), spoil it."""
    texts = _prose(parsed) if parsed.schema is None else _structured(parsed, parsed.schema, flaws)
    answers = []
    for text in texts:
        if parsed.max_tokens is not None and tokens.text_tokens(text) > parsed.max_tokens:
            answers.append((text[: parsed.max_tokens * 4], "length"))
        else:
            answers.append((text, "stop"))
    return answers


def count_usage(parsed: Parsed, answers: list[tuple[str, str]]) -> JSON:
    """The provider's `usage` object: prompt tokens as counted in `parse`, completion tokens of the answers."""
    completion = sum(tokens.text_tokens(text) for text, _ in answers)
    return {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": completion,
            "total_tokens": parsed.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def completion_head(model: str) -> JSON:
    """The fields a completion and each of its chunks share, under a fresh response id."""
    response_id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_simulator"}


def completion_body(head: JSON, answers: list[tuple[str, str]], usage: JSON) -> JSON:
    """The JSON of a completion that is not streamed: one choice per answer, and the usage."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None, "finish_reason": finish} for i, (text, finish) in enumerate(answers)]
    return {**head, "choices": choices, "usage": usage}


def chunk_events(head: JSON, answers: list[tuple[str, str]], usage: JSON | None) -> list[bytes]:
    """The SSE events of a streamed completion: each answer in three pieces, the usage if asked, [DONE]."""
    chunk = {**head, "object": "chat.completion.chunk"}

    def event(choices: list[JSON], **extra: Any) -> bytes:
        extra = {"usage": None, **extra} if usage is not None else extra
        return b"data: " + json.dumps({**chunk, "choices": choices, **extra}).encode() + b"\n\n"

    events = []
    for i, (text, finish) in enumerate(answers):
        events.append(event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]))
        step = max(1, math.ceil(len(text) / 3))
        pieces = [text[k: k + step] for k in range(0, len(text), step)] or [""]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            events.append(event([{"index": i, "delta": {"content": piece}, "logprobs": None,
                                  "finish_reason": finish if last else None}]))
    if usage is not None:
        events.append(event([], usage=usage))
    return [*events, b"data: [DONE]\n\n"]
