"""The answer texts to a parsed request: prose about its images, or JSON following the
schema asked for (flawed as the caller drew), and the usage they count.

Never: a server, sockets, faults or flaw draws.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from ..cost import tokens
from .image_facts import NO_IMAGE, ImageFacts
from .request import Parsed
from .wire import JSON, Answer

__all__ = ["answer_texts", "count_usage"]

_DEPTH = 32  # how deep a schema is followed: recursive $refs end there
_WRONG: tuple[tuple[str, Any], ...] = (("string", "n/a"), ("number", 0.5), ("boolean", True), ("array", []),
                                       ("object", {}))  # a value of the first type a node does not allow breaks it


# What a prose answer becomes with each flaw: as vision models answer when they fail.
_PROSE_FLAWS = {"empty": "", "refusal": "I'm sorry, but I can't help with that request.",
                "repeat": "[simulated] A picture."}
STRUCTURED_REFUSAL = "I'm sorry, I cannot assist with that request."  # OpenAI's words in the refusal field


def _prose(parsed: Parsed, flaws: Sequence[str | None]) -> list[str]:
    prompt = " ".join(parsed.prompt.split())
    head = f'[simulated] re "{prompt[:40]}{"..." if len(prompt) > 40 else ""}":'
    many = len(parsed.images) > 1
    sentences = [f"{'Image %d: ' % (k + 1) if many else ''}{img.description}." for k, img in enumerate(parsed.images)]
    base = " ".join([head, *(sentences or ["no image given."])])
    flawed = [_PROSE_FLAWS.get(flaws[i] or "") if i < len(flaws) else None for i in range(parsed.n)]
    return [text if text is not None else f"{'(variant %d) ' % i if i else ''}{base}" for i, text in enumerate(flawed)]


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
    value = _value(schema, "", schema, parsed.images[0] if parsed.images else NO_IMAGE, 0)
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


def answer_texts(parsed: Parsed, flaws: Sequence[str | None] = ()) -> list[Answer]:
    """The answer per choice: deterministic from the prompt and the images, prose or JSON of
    `parsed.schema`; flaws, one per choice, spoil it: "invalid_json", "schema_break" or "refusal"
    (in the refusal field for a json_schema response_format, else in words) a structured answer,
    "empty", "refusal" (in words) or "repeat" a prose one."""
    if parsed.schema is None:
        return [_cut(parsed, text) for text in _prose(parsed, flaws)]
    refusal = (Answer(STRUCTURED_REFUSAL, "stop", refusal=True) if parsed.response_format == "json_schema"
               else Answer(_PROSE_FLAWS["refusal"], "stop"))  # only Structured Outputs have the field
    return [refusal if i < len(flaws) and flaws[i] == "refusal" else _cut(parsed, text)
            for i, text in enumerate(_structured(parsed, parsed.schema, flaws))]


def _cut(parsed: Parsed, text: str) -> Answer:
    """The text, cut where max_tokens ends it."""
    if parsed.max_tokens is not None and tokens.text_tokens(text) > parsed.max_tokens:
        return Answer(text[: parsed.max_tokens * 4], "length")
    return Answer(text, "stop")


def count_usage(parsed: Parsed, answers: list[Answer]) -> JSON:
    """The provider's `usage` object: prompt tokens as counted in `parse`, completion tokens of the answers."""
    completion = sum(tokens.text_tokens(answer.text) for answer in answers)
    return {"prompt_tokens": parsed.prompt_tokens, "completion_tokens": completion,
            "total_tokens": parsed.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
