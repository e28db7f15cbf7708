"""A chat-completions request as the provider reads it: checked the way the provider checks
it (`Invalid` carries the 400's message, param and code), `response_format` included, and
what it asks (`Parsed`: model, prompt, images, schema, the marker a fault plan follows).

Never: answering. A plain blocking function: the server calls `parse` off its event loop.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from ..cost import tokens
from .image_facts import ImageCache, ImageFacts
from .wire import JSON, Invalid

__all__ = ["Parsed", "parse"]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_RANGES = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
_INT_RANGES = {"n": (1, 128), "max_tokens": (1, None), "max_completion_tokens": (1, None)}
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


def _data_url_summary(url: str) -> str:
    head, _, payload = url.partition(",")
    return f"{head},<{len(payload) * 3 // 4} bytes>"


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
