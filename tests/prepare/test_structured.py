"""The output schema: both forms, the column types they give, and reading answers against them."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest

from pipeline import payload
from pipeline.config import PromptConfig, RequestConfig
from pipeline.manifest import ManifestRow
from pipeline.structured import (
    OutputSchema,
    SchemaError,
    Unusable,
    categories,
    json_schema,
    strict_form,
)

SHORT = {
    "colour": {"type": "enum[red, green, blue]", "description": "the dominant colour"},
    "shapes": "int",
    "photo": "bool",
    "ratio": "float",
    "tags": "list[str]",
    "box": {"x": "int", "y": "int"},
}


def test_short_form_becomes_a_strict_json_schema() -> None:
    schema = json_schema(SHORT)
    assert schema["required"] == list(SHORT)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["colour"] == {"type": "string", "enum": ["red", "green", "blue"],
                                              "description": "the dominant colour"}
    assert schema["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    assert schema["properties"]["box"]["additionalProperties"] is False


def test_each_field_gets_its_arrow_type() -> None:
    types = {f.name: f.type for f in OutputSchema(json_schema(SHORT)).fields}
    assert types == {"colour": pa.string(), "shapes": pa.int64(), "photo": pa.bool_(), "ratio": pa.float64(),
                     "tags": pa.list_(pa.string()),
                     "box": pa.struct([pa.field("x", pa.int64()), pa.field("y", pa.int64())])}


def test_a_json_schema_is_taken_as_it_is_with_refs_and_nullable_fields() -> None:
    given = {"type": "object", "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
             "properties": {"where": {"$ref": "#/$defs/point"}, "note": {"type": ["string", "null"]},
                            "kind": {"anyOf": [{"enum": ["a", "b"]}, {"type": "null"}]}}}
    schema = json_schema(given)
    assert schema == given
    types = {f.name: f.type for f in OutputSchema(schema).fields}
    assert types == {"where": pa.struct([pa.field("x", pa.float64())]), "note": pa.string(), "kind": pa.string()}


FULL: dict[str, Any] = {  # a JSON Schema as people write one: shared parts, optional and nullable fields
    "type": "object",
    "$defs": {"box": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                      "required": ["x"]}},
    "properties": {"label": {"enum": ["cat", "dog"]}, "note": {"type": ["string", "null"]},
                   "count": {"type": "integer"}, "box": {"$ref": "#/$defs/box"},
                   "kind": {"type": "string", "enum": ["a", "b"]}},
    "required": ["label", "note"],
}


def test_a_full_json_schema_is_sent_in_strict_form_and_read_alike() -> None:
    sent = OutputSchema(json_schema(FULL)).sent
    assert sent["required"] == ["label", "note", "count", "box", "kind"] and sent["additionalProperties"] is False
    properties = sent["properties"]
    assert properties["label"] == {"enum": ["cat", "dog"]}  # required: as written
    assert properties["note"] == {"type": ["string", "null"]}
    assert properties["count"] == {"type": ["integer", "null"]}  # optional: may now be null
    assert properties["box"] == {"anyOf": [{"$ref": "#/$defs/box"}, {"type": "null"}]}
    assert properties["kind"] == {"type": ["string", "null"], "enum": ["a", "b", None]}
    assert sent["$defs"]["box"] == {"type": "object", "properties": {"x": {"type": "integer"},
                                                                     "y": {"type": ["integer", "null"]}},
                                    "required": ["x", "y"], "additionalProperties": False}
    assert strict_form(sent) == sent and strict_form(json_schema(SHORT)) == json_schema(SHORT)
    schema = OutputSchema(json_schema(FULL))
    assert schema.response_format() == {"type": "json_schema", "json_schema": {
        "name": "annotation", "strict": True, "schema": sent}}
    assert schema.read('{"label": "cat", "note": null, "count": null, "box": {"x": 1, "y": null}, "kind": null}') \
        == {"label": "cat", "note": None, "count": None, "box": {"x": 1, "y": None}, "kind": None}
    with pytest.raises(Unusable, match="'x' is a required property"):
        schema.read('{"label": "cat", "note": null, "count": 1, "box": {"y": 2}, "kind": "a"}')


@pytest.mark.parametrize(("spec", "words"), [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
     "an object open to more properties has no strict form"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "null"}]}}},
     "a: oneOf has no strict form"),
    ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
                                             "additionalProperties": {"type": "string"}}}},
     "a: an object open to more properties has no strict form"),
])
def test_a_schema_without_a_strict_form_is_sent_as_written_with_strict_false(spec: dict[str, Any],
                                                                             words: str) -> None:
    schema = OutputSchema(json_schema(spec))
    assert schema.not_strict == words
    assert schema.response_format() == {"type": "json_schema", "json_schema": {
        "name": "annotation", "strict": False, "schema": spec}}
    assert OutputSchema(json_schema(spec), "prompt").not_strict is None  # other modes ask in words


@pytest.mark.parametrize(("spec", "path", "words"), [
    ({"label": "enum[]"}, "label", "at least one value"),
    ({"label": "enum[a, a]"}, "label", "twice"),
    ({"box": {"x": "integer"}}, "box.x", "unknown type 'integer'"),
    ({"tags": "list[dict]"}, "tags[]", "unknown type 'dict'"),
    ({"box": {}}, "box", "at least one field"),
    ({"n": 3}, "n", "expected a type name or a mapping"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "properties.a.type", "not a valid JSON Schema"),
    ({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}, "a", "no single column type"),
    ({"type": "object", "properties": {"a": {"type": "array"}}}, "a", "needs items"),
    ({"type": "object", "properties": {"a": {"type": "object"}}}, "a", "needs properties"),
    ({"type": "object", "properties": {"a": {"$ref": "other.json#/x"}}}, "a", "only local references"),
    ({"type": "object", "$defs": {"tree": {"type": "object", "properties": {"kids": {
        "type": "array", "items": {"$ref": "#/$defs/tree"}}}}},
      "properties": {"root": {"$ref": "#/$defs/tree"}}}, "root.kids[].kids[]…", "a recursive schema"),
    ({"type": "object", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
      "properties": {"x": {"$ref": "#/$defs/a"}}}, "x", "refers to itself in a loop"),
])
def test_a_schema_without_column_types_names_the_field(spec: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SchemaError) as caught:
        json_schema(spec)
    if path.endswith("…"):  # named where the nesting gives up, somewhere down the recursion
        assert caught.value.path.startswith(path[:-1])
    else:
        assert caught.value.path == path
    assert words in caught.value.message


@pytest.fixture
def schema() -> OutputSchema:
    return OutputSchema(json_schema(SHORT))


GOOD = {"colour": "red", "shapes": 2.0, "photo": False, "ratio": 1, "tags": ["a"], "box": {"x": 1, "y": 2}}


def test_a_valid_answer_gives_typed_values(schema: OutputSchema) -> None:
    values = schema.read(json.dumps(GOOD))
    assert values == {**GOOD, "shapes": 2, "ratio": 1.0}
    assert type(values["shapes"]) is int and type(values["ratio"]) is float


def test_a_fenced_answer_is_the_same_json(schema: OutputSchema) -> None:
    assert schema.read(f"```json\n{json.dumps(GOOD)}\n```") == schema.read(json.dumps(GOOD))


@pytest.mark.parametrize(("text", "words"), [
    (None, "is empty"),
    ("  ", "is empty"),
    ('{"colour": "red", ', "is not valid JSON"),
    ("Here it is: {}", "is not valid JSON"),
    (json.dumps({**GOOD, "colour": "mauve"}), "colour: 'mauve' is not one of"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "shapes"}), "'shapes' is a required property"),
    (json.dumps({**GOOD, "shapes": "two"}), "shapes: 'two' is not of type 'integer'"),
    (json.dumps({**GOOD, "photo": 1}), "photo: 1 is not of type 'boolean'"),
    (json.dumps({**GOOD, "box": {"x": 1, "y": 2, "z": 3}}), "box: Additional properties"),
    (json.dumps([GOOD]), "is not of type 'object'"),
])
def test_an_unusable_answer_says_what_is_wrong(schema: OutputSchema, text: str | None, words: str) -> None:
    with pytest.raises(Unusable) as caught:
        schema.read(text)
    assert words in str(caught.value)


def test_asking_again_quotes_the_answer_and_the_problem(schema: OutputSchema) -> None:
    assistant, user = schema.ask_again('{"colour": 1}', "does not match the schema: colour: 1 is not a string")
    assert assistant == {"role": "assistant", "content": '{"colour": 1}'}
    assert user["role"] == "user" and "colour: 1 is not a string" in user["content"]


ROW = ManifestRow(id="r1", images=(), prompt="Label this image.", keep={})


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "prompt"])
def test_each_mode_puts_the_schema_where_it_belongs(mode: str) -> None:
    schema = OutputSchema(json_schema(SHORT), mode)  # type: ignore[arg-type]
    body = payload.build(ROW, [], RequestConfig(model="gpt-4o"), PromptConfig(system="Be brief."), schema)
    system, user = body["messages"][0]["content"], body["messages"][1]["content"][0]["text"]
    compact = json.dumps(schema.schema, separators=(",", ":"))
    if mode == "json_schema":
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "annotation", "strict": True, "schema": schema.schema}}
        assert (system, user) == ("Be brief.", "Label this image.")
    elif mode == "json_object":
        assert body["response_format"] == {"type": "json_object"}
        assert system.startswith("Be brief.\n\n") and compact in system and "JSON" in system
        assert user == "Label this image."
    else:
        assert "response_format" not in body
        assert system == "Be brief." and user.startswith("Label this image.\n\n") and compact in user


def test_the_estimate_counts_the_schema_and_a_follow_up_counts_its_messages(schema: OutputSchema) -> None:
    request, prompt = RequestConfig(model="gpt-4o"), PromptConfig()
    plain = payload.estimate(ROW, [], request, prompt)
    labelled = payload.estimate(ROW, [], request, prompt, schema)
    assert labelled.input > plain.input and labelled.input_max > plain.input_max
    body = payload.build(ROW, [], request, prompt, schema)
    follow = schema.ask_again("x" * 400, "is not valid JSON")
    longer, more = payload.follow_up(body, labelled, follow, request.model)
    assert longer["messages"][-2:] == follow and len(longer["messages"]) == len(body["messages"]) + 2
    assert more.input >= labelled.input + 100 and more.input_max >= labelled.input_max + 400
    assert more.output_max == labelled.output_max


def test_value_counts_suit_enum_and_boolean_fields_nested_ones_too() -> None:
    schema = json_schema({**SHORT, "box": {"x": "int", "kind": "enum[a, b]", "seen": "bool"}})
    assert categories(schema) == [("colour",), ("photo",), ("box", "kind"), ("box", "seen")]
    given = {"type": "object", "$defs": {"k": {"enum": ["a", "b"]}},
             "properties": {"k": {"$ref": "#/$defs/k"}, "f": {"type": ["boolean", "null"]}, "s": {"type": "string"}}}
    assert categories(json_schema(given)) == [("k",), ("f",)]
