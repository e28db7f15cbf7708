"""Structured answers: the output schema's two forms, how it is asked for, and reading answers
into typed values.

Owns: turning the short form (`{label: "enum[cat, dog]", count: int}`) into JSON Schema;
mapping a JSON Schema to one Arrow type per top-level field; the `response_format` or the
instruction that asks for it; parsing and validating an answer (with `jsonschema`); the
follow-up message that asks again. Never: I/O, HTTP, deciding how often to ask again.

The JSON Schema to Arrow mapping is written here: no kept library maps JSON Schema to Arrow
types (the code generators emit pydantic source, not types).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

if TYPE_CHECKING:  # jsonschema loads only when a schema is set: it costs every run 80 ms
    from jsonschema import Draft202012Validator

__all__ = ["Mode", "SchemaError", "Unusable", "OutputSchema", "json_schema", "strict_form", "arrow_fields",
           "categories", "build_schema"]

Mode = Literal["json_schema", "json_object", "prompt"]
JSON = dict[str, Any]

_SCALARS: dict[str, JSON] = {"str": {"type": "string"}, "int": {"type": "integer"},
                             "float": {"type": "number"}, "bool": {"type": "boolean"}}
_ARROW: dict[str, pa.DataType] = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
                                  "boolean": pa.bool_()}
_LIST = re.compile(r"list\[(.+)\]", re.S)
_ENUM = re.compile(r"enum\[(.*)\]", re.S)
_FENCE = re.compile(r"\A\s*```(?:json)?\s*\n(.*?)\n\s*```\s*\Z", re.S)
_MAX_DEPTH = 32  # nesting levels of one column's type
SCHEMA_NAME = "annotation"  # json_schema.name on the wire


class SchemaError(ValueError):
    """A schema the pipeline cannot use; `path` names the field (dotted, `[]` for list items)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path, self.message = path, message


class Unusable(ValueError):
    """An answer that is not JSON, or not of the schema; the message completes "the answer ..."."""


# --- the short form -----------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _short_type(text: str, path: str) -> JSON:
    text = text.strip()
    if text in _SCALARS:
        return dict(_SCALARS[text])
    if match := _ENUM.fullmatch(text):
        values = [v.strip().strip("'\"") for v in match.group(1).split(",") if v.strip()]
        if not values:
            raise SchemaError(path, f"an enum needs at least one value (got {text!r})")
        if len(set(values)) < len(values):
            raise SchemaError(path, f"an enum lists a value twice (got {text!r})")
        return {"type": "string", "enum": values}
    if match := _LIST.fullmatch(text):
        return {"type": "array", "items": _short_type(match.group(1), path + "[]")}
    raise SchemaError(path, f"unknown type {text!r}; use str, int, float, bool, list[T], enum[a, b] or a mapping")


def _is_described(spec: Mapping[str, Any]) -> bool:
    """`{type: ..., description: ...}` is one field with a description, not a nested object."""
    return "type" in spec and set(spec) <= {"type", "description"} and isinstance(spec["type"], (str, dict))


def _short(spec: Any, path: str) -> JSON:
    if isinstance(spec, str):
        return _short_type(spec, path)
    if not isinstance(spec, Mapping):
        raise SchemaError(path, f"expected a type name or a mapping, got {type(spec).__name__}")
    if _is_described(spec):
        node = _short(spec["type"], path)
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            raise SchemaError(path, "description must be text")
        return {**node, "description": description} if description else node
    if not spec:
        raise SchemaError(path, "a mapping needs at least one field")
    properties = {str(name): _short(value, _join(path, str(name))) for name, value in spec.items()}
    # strict structured output wants every field required and no others
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _is_json_schema(spec: Mapping[str, Any]) -> bool:
    return "$schema" in spec or (spec.get("type") == "object" and isinstance(spec.get("properties"), Mapping))


def json_schema(spec: Any) -> JSON:
    """The JSON Schema for `output_schema` as written: a JSON Schema object, or the short form.
    Raises SchemaError naming the field when it cannot become typed columns."""
    if not isinstance(spec, Mapping) or not spec:
        raise SchemaError("", "expected a mapping of fields to types, or a JSON Schema object")
    if _is_json_schema(spec):
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError as InvalidSchema

        schema: JSON = json.loads(json.dumps(spec))  # plain JSON types, a copy
        try:
            Draft202012Validator.check_schema(schema)
        except InvalidSchema as exc:
            raise SchemaError(".".join(str(p) for p in exc.path), f"not a valid JSON Schema: {exc.message}") from None
        if schema.get("type") != "object" or not schema.get("properties"):
            raise SchemaError("", "the top level must be an object with properties: each becomes a column")
    else:
        schema = _short(spec, "")
    arrow_fields(schema)  # every field must map to a column type
    return schema


# --- the strict form ---------------------------------------------------------------------

# Keywords Structured Outputs' strict mode does not take (OpenAI's "Supported schemas" guide).
_NOT_STRICT = ("allOf", "oneOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
               "patternProperties", "unevaluatedProperties", "propertyNames", "minProperties", "maxProperties")


def _nullable(node: Any) -> Any:
    """The node with null allowed: how strict mode writes a field that may be left out."""
    if not isinstance(node, dict):
        return node
    if isinstance(node.get("type"), (str, list)):
        kinds = [node["type"]] if isinstance(node["type"], str) else list(node["type"])
        node = {**node, "type": kinds if "null" in kinds else [*kinds, "null"]}
    elif "anyOf" in node:
        if not any(isinstance(o, dict) and o.get("type") == "null" for o in node["anyOf"]):
            node = {**node, "anyOf": [*node["anyOf"], {"type": "null"}]}
        return node
    elif "$ref" in node or "const" in node:
        return {"anyOf": [node, {"type": "null"}]}
    if "enum" in node and None not in node["enum"]:
        node = {**node, "enum": [*node["enum"], None]}
    return node


def _strict(node: Any, path: str) -> Any:
    if not isinstance(node, dict):
        return node
    if found := [key for key in _NOT_STRICT if key in node]:
        raise SchemaError(path, f"{found[0]} has no strict form")
    out = dict(node)
    for key in ("$defs", "definitions"):
        if isinstance(node.get(key), dict):
            out[key] = {name: _strict(sub, f"{key}.{name}") for name, sub in node[key].items()}
    if "items" in node:
        out["items"] = _strict(node["items"], path + "[]")
    if isinstance(node.get("anyOf"), list):
        out["anyOf"] = [_strict(option, path) for option in node["anyOf"]]
    if node.get("type") == "object" or "properties" in node:
        if node.get("additionalProperties", False) is not False:
            raise SchemaError(path, "an object open to more properties has no strict form")
        required = set(node.get("required", ()))
        properties = {name: _strict(sub, _join(path, name)) for name, sub in (node.get("properties") or {}).items()}
        out |= {"properties": {name: sub if name in required else _nullable(sub) for name, sub in properties.items()},
                "required": list(properties), "additionalProperties": False}
    return out


def strict_form(schema: JSON) -> JSON:
    """The schema under Structured Outputs' strict rules: every object closed and all its fields
    required, the optional ones made nullable. Raises SchemaError where that cannot be done."""
    return _strict(schema, "")  # type: ignore[no-any-return]


# --- JSON Schema to Arrow -----------------------------------------------------------------


def _resolve(node: Any, root: JSON, path: str) -> JSON:
    followed: set[str] = set()
    while isinstance(node, Mapping) and "$ref" in node:
        ref = node["$ref"]
        if ref in followed:
            raise SchemaError(path, f"{ref!r} refers to itself in a loop")
        followed.add(ref)
        target: Any = root
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(path, f"only local references (#/$defs/...) are followed, not {ref!r}")
        for key in ref[2:].split("/"):
            target = target.get(key) if isinstance(target, Mapping) else None
        if target is None:
            raise SchemaError(path, f"{ref!r} points nowhere")
        node = target
    if not isinstance(node, Mapping):
        raise SchemaError(path, "expected a schema object")
    return dict(node)


def _one_type(node: JSON, path: str) -> str:
    """The node's JSON type, with `null` allowed beside it (a null cell)."""
    kinds = node.get("type")
    if kinds is None and ("enum" in node or "const" in node):
        values = node.get("enum", [node.get("const")])
        kinds = sorted({"string" if isinstance(v, str) else "boolean" if isinstance(v, bool)
                        else "integer" if isinstance(v, int) else "number" if isinstance(v, float) else "null"
                        for v in values})
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = [k for k in kinds or [] if k != "null"]
    if kinds == ["integer", "number"]:
        return "number"
    if len(kinds) != 1:
        raise SchemaError(path, f"no single column type ({kinds or 'no type'}); give one type per field")
    return str(kinds[0])


def _node(node: Any, root: JSON, path: str) -> JSON:
    """A field's schema with references followed and a null option (anyOf/oneOf) left out."""
    resolved = _resolve(node, root, path)
    for key in ("anyOf", "oneOf"):
        if key in resolved:
            options = [o for o in resolved[key] if _resolve(o, root, path).get("type") != "null"]
            if len(options) != 1:
                raise SchemaError(path, f"{key} with several types has no single column type")
            return _node(options[0], root, path)
    return resolved


def _arrow_type(node: Any, root: JSON, path: str, depth: int) -> pa.DataType:
    if depth > _MAX_DEPTH:
        raise SchemaError(path, f"nested over {_MAX_DEPTH} levels: a recursive schema has no fixed column type")
    node = _node(node, root, path)
    kind = _one_type(node, path)
    if kind in _ARROW:
        return _ARROW[kind]
    if kind == "array":
        if "items" not in node:
            raise SchemaError(path, "a list needs items: the type of its elements")
        return pa.list_(_arrow_type(node["items"], root, path + "[]", depth + 1))
    if kind == "object":
        if not node.get("properties"):
            raise SchemaError(path, "an object needs properties: the fields of its column")
        return pa.struct(_fields(node, root, path, depth + 1))
    raise SchemaError(path, f"type {kind!r} has no column type")


def categories(schema: JSON) -> list[tuple[str, ...]]:
    """The column paths of enum and boolean fields, nested ones included: what value counts suit."""
    def walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        node = _node(node, schema, ".".join(path))
        if "enum" in node or "const" in node or node.get("type") in ("boolean", ["boolean", "null"]):
            yield path
        for name, sub in (node.get("properties") or {}).items():
            yield from walk(sub, (*path, name))

    return list(walk(schema, ()))


def _fields(node: JSON, root: JSON, path: str, depth: int = 0) -> list[pa.Field]:
    return [pa.field(name, _arrow_type(sub, root, _join(path, name), depth))
            for name, sub in node["properties"].items()]


def arrow_fields(schema: JSON) -> list[pa.Field]:
    """One Arrow field per top-level property, in schema order."""
    return _fields(schema, schema, "")


# --- answers ------------------------------------------------------------------------------


def _cell(value: Any, kind: pa.DataType) -> Any:
    """A validated JSON value as its column wants it: 2.0 for an integer is 2, 2 for a number 2.0."""
    if value is None:
        return None
    if pa.types.is_struct(kind):
        return {f.name: _cell(value.get(f.name), f.type) for f in kind}
    if pa.types.is_list(kind):
        return [_cell(v, kind.value_type) for v in value]
    if pa.types.is_integer(kind):
        return int(value)
    if pa.types.is_floating(kind):
        return float(value)
    return value


def _problem(validator: Draft202012Validator, value: Any) -> str | None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where}: {error.message}" if where else error.message


@dataclass(frozen=True)
class OutputSchema:
    """A run's output schema and how it is asked for; `read` turns an answer into column values."""

    schema: JSON
    mode: Mode = "json_schema"
    fields: list[pa.Field] = field(init=False)
    sent: JSON = field(init=False, repr=False)  # the schema as asked for: its strict form where it has one
    not_strict: str | None = field(init=False, default=None)  # why json_schema mode asks with strict: false
    instruction: str = field(init=False, repr=False)  # the schema stated in words, for a message
    _validator: Draft202012Validator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from jsonschema import Draft202012Validator

        sent = self.schema
        if self.mode == "json_schema":
            try:
                sent = strict_form(self.schema)
            except SchemaError as exc:
                object.__setattr__(self, "not_strict", str(exc))
        object.__setattr__(self, "sent", sent)
        object.__setattr__(self, "fields", arrow_fields(self.schema))
        object.__setattr__(self, "instruction", "Answer with one JSON object and nothing else. It must match "
                           "this JSON Schema:\n" + json.dumps(sent, separators=(",", ":")))
        object.__setattr__(self, "_validator", Draft202012Validator(sent))

    def response_format(self) -> JSON | None:
        if self.mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "strict": self.not_strict is None,
                                                           "schema": self.sent}}
        return {"type": "json_object"} if self.mode == "json_object" else None

    def read(self, text: str | None) -> JSON:
        """Column values from an answer's text; Unusable says why there are none."""
        if text is None or not text.strip():
            raise Unusable("is empty")
        fenced = _FENCE.match(text)  # a fenced block is the same JSON, as models write it unasked
        try:
            value = json.loads(fenced.group(1) if fenced else text)
        except ValueError as exc:
            raise Unusable(f"is not valid JSON ({exc})") from None
        if problem := _problem(self._validator, value):
            raise Unusable(f"does not match the schema: {problem}")
        return {f.name: _cell(value.get(f.name), f.type) for f in self.fields}

    def ask_again(self, answer: str | None, problem: str) -> list[JSON]:
        """The messages that follow a failed answer: the answer itself, and what was wrong with it."""
        return [{"role": "assistant", "content": answer or ""},
                {"role": "user", "content": f"That answer {problem}. Answer again with only the JSON object, "
                                            "matching the schema."}]


def build_schema(spec: Any, mode: Mode | None) -> OutputSchema | None:
    """The run's OutputSchema from the config's JSON Schema, or None when none is set."""
    return None if spec is None else OutputSchema(spec, mode or "json_schema")
