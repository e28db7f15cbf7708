"""The simulator's structured output over real HTTP on 127.0.0.1: response_format, JSON answers
from the image, refusals, and seeded flaws (invalid JSON, broken schema) per choice."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from PIL import Image, ImageDraw

from pipeline.cost import tokens
from pipeline.simulator import Simulator
from pipeline.structured import Mode, OutputSchema, Unusable, json_schema

KEY = "sk-test-structured"
DEMO = Path(__file__).parents[2] / "configs" / "demo" / "images"
SCHEMA = json_schema({"colour": "enum[red, green, blue, grey, other]", "size": "enum[small, medium, large]",
                      "shapes": "int", "photo": "bool", "aspect": "float", "tags": "list[str]", "caption": "str"})


def _data_url(data: bytes, mime: str = "png") -> str:
    return f"data:image/{mime};base64,{base64.b64encode(data).decode()}"


def _squares(background: str = "blue", fmt: str = "PNG") -> str:
    """A 300x200 drawing: two red squares on a flat background."""
    img = Image.new("RGB", (300, 200), background)
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 20, 100, 100), fill="red")
    draw.rectangle((180, 90, 260, 170), fill="red")
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return _data_url(buffer.getvalue(), fmt.lower())


SQUARES = _squares()


def _body(mode: Mode | None = "json_schema", url: str = SQUARES, schema: dict[str, Any] = SCHEMA,
          prompt: str = "Annotate this image.", **extra: Any) -> dict[str, Any]:
    """A request as the pipeline sends it for this mode; None: plain text, no schema anywhere."""
    out = OutputSchema(schema, mode or "prompt")
    system = "You annotate images."
    text = prompt
    if mode == "json_object":
        system += "\n" + out.instruction
    elif mode == "prompt":
        text += "\n" + out.instruction
    user = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "system", "content": system},
                                                            {"role": "user", "content": user}], **extra}
    if mode is not None and (response_format := out.response_format()) is not None:
        body["response_format"] = response_format
    return body


def _post(sim: Simulator, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{sim.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=5)


def _contents(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [choice["message"]["content"] for choice in resp.json()["choices"]]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _valid(text: str, schema: dict[str, Any] = SCHEMA) -> bool:
    return _is_json(text) and Draft202012Validator(schema).is_valid(json.loads(text))


@pytest.fixture
def client(sim: Simulator) -> Iterator[Callable[[dict[str, Any]], httpx.Response]]:
    yield lambda body: _post(sim, body)


EXPECTED = {"colour": "blue", "size": "medium", "shapes": 2, "photo": False, "aspect": 1.5,
            "tags": ["blue", "medium", "drawing"]}


@pytest.mark.parametrize("mode", ["json_schema", "json_object", "prompt"])
def test_each_mode_answers_json_of_the_schema_from_the_image(sim: Simulator, mode: Mode) -> None:
    resp = _post(sim, _body(mode))
    (text,) = _contents(resp)
    assert resp.json()["choices"][0]["finish_reason"] == "stop"
    values = OutputSchema(SCHEMA, mode).read(text)
    assert {k: values[k] for k in EXPECTED} == EXPECTED
    assert values["caption"].startswith("300x200 image, mostly blue")
    assert text == json.dumps(json.loads(text), separators=(",", ":"))  # compact
    assert sim.log[-1].flaws == (None,)


def test_a_reask_is_answered_from_the_images_of_the_conversation(sim: Simulator) -> None:
    body = _body("json_object")
    (first,) = _contents(_post(sim, body))
    out = OutputSchema(SCHEMA, "json_object")
    body["messages"] += out.ask_again("not json at all", "is not valid JSON")
    (again,) = _contents(_post(sim, body))
    assert out.read(again) == out.read(first)


def test_the_schema_walk_follows_refs_nullables_bounds_and_names(sim: Simulator) -> None:
    schema = {
        "type": "object",
        "$defs": {"shade": {"type": "string", "enum": ["Gray", "Red", "Blue"]},
                  "box": {"type": "object", "properties": {"count": {"type": "integer", "minimum": 3}}}},
        "properties": {
            "shade": {"$ref": "#/$defs/shade"},
            "maybe": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/box"}]},
            "ratio": {"type": ["number", "null"]},
            "bg_color": {"type": "string"},
            "size_name": {"type": "string"},
            "kind": {"type": "string", "enum": ["photo", "drawing", "chart"]},
            "labels": {"type": "array", "items": {"type": "string", "enum": ["drawing", "tiny", "grey", "x"]},
                       "minItems": 3, "maxItems": 3},
            "few": {"type": "array", "items": {"type": "string"}, "maxItems": 1},
            "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2},
        },
        "required": ["shade"],
    }
    grey = _squares("grey")
    (text,) = _contents(_post(sim, _body("json_schema", grey, schema)))
    value = json.loads(text)
    assert Draft202012Validator(schema).is_valid(value)
    assert value["shade"] == "Gray" and value["maybe"] == {"count": 3} and value["ratio"] == 1.5
    assert (value["bg_color"], value["size_name"]) == ("grey", "medium")
    assert value["kind"] in ("photo", "drawing", "chart")  # by a hash: no colour or size among them
    assert value["labels"][:2] == ["grey", "drawing"] and len(value["labels"]) == 3
    assert value["few"] == ["grey"] and value["flags"] == [False, False]


def test_json_object_without_a_schema_answers_a_description(sim: Simulator) -> None:
    body = _body(None, prompt="Describe this image as json.")
    body["response_format"] = {"type": "json_object"}
    (text,) = _contents(_post(sim, body))
    assert json.loads(text) == {"description": json.loads(text)["description"]}
    assert json.loads(text)["description"].startswith("300x200 image, mostly blue")


def test_plain_text_without_a_schema_stays_prose(sim: Simulator) -> None:
    for body in (_body(None), {**_body(None), "response_format": {"type": "text"}}):
        (text,) = _contents(_post(sim, body))
        assert text.startswith("[simulated] re ") and not _is_json(text)


def test_json_object_needs_the_word_json_in_the_messages(sim: Simulator) -> None:
    body = _body(None)
    body["response_format"] = {"type": "json_object"}
    resp = _post(sim, body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert "'json'" in error["message"] and "json_object" in error["message"]
    body["messages"][0]["content"] = "Answer in JSON."
    assert _post(sim, body).status_code == 200


def _format(json_schema: Any = None, **changes: Any) -> dict[str, Any]:
    spec = {"name": "annotation", "strict": True, "schema": SCHEMA, **changes}
    return {"type": "json_schema", "json_schema": spec if json_schema is None else json_schema}


@pytest.mark.parametrize("response_format, param", [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format.type"),
    ({}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    (_format([]), "response_format.json_schema"),
    (_format(name=None), "response_format.json_schema.name"),
    (_format(name="an annotation"), "response_format.json_schema.name"),
    (_format(name="x" * 65), "response_format.json_schema.name"),
    (_format(strict="yes"), "response_format.json_schema.strict"),
    (_format(schema=None), "response_format.json_schema.schema"),
    (_format(schema=[]), "response_format.json_schema.schema"),
    (_format(schema={"type": "nope"}), "response_format.json_schema.schema"),
    (_format(schema={"type": "object", "required": "colour"}), "response_format.json_schema.schema"),
])
def test_bad_response_formats_are_400_naming_the_param(sim: Simulator, response_format: Any, param: str) -> None:
    resp = _post(sim, {**_body(None), "response_format": response_format})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert sim.log[-1].status == 400


def test_refusing_json_schema_leaves_json_object_and_prompt(faulty_sim: Callable[..., Simulator]) -> None:
    sim = faulty_sim(refuse_response_format="json_schema")
    resp = _post(sim, _body("json_schema"))
    assert resp.status_code == 400
    assert resp.json()["error"] == {
        "message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
        "type": "invalid_request_error", "param": "response_format", "code": None}
    assert _valid(_contents(_post(sim, _body("json_object")))[0])
    assert _valid(_contents(_post(sim, _body("prompt")))[0])
    assert [e.status for e in sim.log] == [400, 200, 200]


def test_refusing_all_refuses_any_response_format(faulty_sim: Callable[..., Simulator]) -> None:
    sim = faulty_sim(refuse_response_format="all")
    for kind, body in (("json_schema", _body("json_schema")), ("json_object", _body("json_object")),
                       ("text", {**_body(None), "response_format": {"type": "text"}})):
        error = _post(sim, body).json()["error"]
        assert error["param"] == "response_format" and f"'response_format' of type '{kind}'" in error["message"]
    assert _valid(_contents(_post(sim, _body("prompt")))[0])


def test_a_rate_of_one_makes_every_choice_invalid_json(faulty_sim: Callable[..., Simulator]) -> None:
    sim = faulty_sim(rate_invalid_json=1.0)
    texts = _contents(_post(sim, _body("json_schema", n=4)))
    assert not any(_is_json(t) for t in texts)
    assert sim.log[-1].flaws == ("invalid_json",) * 4
    wrapped = [t for t in texts if t.startswith("Here is the JSON: ")]  # alternately wrapped in chatter,
    cut = [t for t in texts if t not in wrapped]  # and cut in half
    assert len(wrapped) == len(cut) == 2
    whole = wrapped[0].removeprefix("Here is the JSON: ").removesuffix(" Hope this helps!")
    assert _valid(whole) and set(wrapped) == {wrapped[0]} and set(cut) == {whole[: len(whole) // 2]}
    with pytest.raises(Unusable, match="not valid JSON"):
        OutputSchema(SCHEMA).read(texts[0])


def test_a_rate_of_one_makes_every_choice_break_the_schema(faulty_sim: Callable[..., Simulator]) -> None:
    sim = faulty_sim(rate_schema_break=1.0)
    texts = _contents(_post(sim, _body("prompt", n=3)))
    assert all(_is_json(t) and not _valid(t) for t in texts)
    assert "colour" not in json.loads(texts[0])  # the first required property is dropped
    assert sim.log[-1].flaws == ("schema_break",) * 3
    loose = {"type": "object", "properties": {"count": {"type": "integer"}, "name": {"type": "string"}}}
    (text,) = _contents(_post(sim, _body("prompt", schema=loose)))  # json_schema mode would send it strict
    assert _is_json(text) and not _valid(text, loose)  # no required property: the first of a wrong type


def test_a_json_schema_refusal_is_in_the_refusal_field_with_no_content_streamed_or_not(
        faulty_sim: Callable[..., Simulator]) -> None:
    sim = faulty_sim(rate_refusal=1.0)
    (choice,) = _post(sim, _body("json_schema")).json()["choices"]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "stop"
    assert choice["message"]["refusal"] == "I'm sorry, I cannot assist with that request."
    body = _body("json_schema", stream=True)
    with httpx.stream("POST", f"{sim.url}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as resp:
        deltas = [json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                  for line in resp.iter_lines() if line.startswith("data: {")]
    assert not any(delta.get("content") for delta in deltas)
    assert "".join(delta.get("refusal") or "" for delta in deltas) == choice["message"]["refusal"]
    assert [e.flaws for e in sim.log] == [("refusal",)] * 2
    for mode in (None, "json_object", "prompt"):  # without Structured Outputs, a refusal is in words
        (choice,) = _post(sim, _body(mode)).json()["choices"]
        assert choice["message"]["content"].startswith("I'm sorry") and choice["message"]["refusal"] is None


def test_flaw_shares_follow_the_rates_and_the_log(faulty_sim: Callable[..., Simulator]) -> None:
    sim = faulty_sim(rate_invalid_json=0.3, rate_schema_break=0.3, seed=11)
    seen: list[str | None] = []
    for i in range(20):  # 60 answers
        texts = _contents(_post(sim, _body("json_schema", n=3, prompt=f"Annotate row {i}.")))
        seen += [None if _valid(t) else "schema_break" if _is_json(t) else "invalid_json" for t in texts]
    assert seen == [flaw for e in sim.log for flaw in e.flaws]
    assert 8 <= seen.count("invalid_json") <= 30 and 8 <= seen.count("schema_break") <= 30
    assert 12 <= seen.count(None) <= 36


def test_choices_are_flawed_independently(faulty_sim: Callable[..., Simulator]) -> None:
    sim = faulty_sim(rate_invalid_json=0.4, rate_schema_break=0.3, seed=3)
    mixed = 0
    for i in range(8):
        texts = _contents(_post(sim, _body("json_object", n=3, prompt=f"Row {i}.")))
        flaws = sim.log[-1].flaws
        assert [None if _valid(t) else "schema_break" if _is_json(t) else "invalid_json" for t in texts] == list(flaws)
        mixed += len(set(flaws)) > 1
    assert mixed >= 3


def test_flaw_rates_leave_the_fault_draws_alone(faulty_sim: Callable[..., Simulator]) -> None:
    bodies = [_body("json_schema", prompt=f"row {i % 4}") for i in range(8)]
    plain = faulty_sim(rate_500=0.5, seed=7)
    flawed = faulty_sim(rate_500=0.5, rate_invalid_json=0.5, rate_schema_break=0.2, seed=7)
    first = [_post(plain, body).status_code for body in bodies]
    assert first == [_post(flawed, body).status_code for body in bodies]
    assert {200, 500} <= set(first)


def test_a_stream_carries_the_same_json_answers(sim: Simulator) -> None:
    plain = _post(sim, _body("json_schema", n=2)).json()
    body = _body("json_schema", n=2, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{sim.url}/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as resp:
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = ["", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert streamed == [c["message"]["content"] for c in plain["choices"]]
    assert all(_valid(text) for text in streamed)
    assert chunks[-1]["usage"] == plain["usage"]


def test_json_schema_counts_the_schema_in_the_prompt_tokens(sim: Simulator) -> None:
    with_schema = _post(sim, _body("json_schema")).json()["usage"]
    without = _post(sim, _body(None)).json()["usage"]
    assert with_schema["prompt_tokens"] - without["prompt_tokens"] == tokens.text_tokens(json.dumps(SCHEMA))
    (text,) = _contents(_post(sim, _body("json_schema")))
    assert with_schema["completion_tokens"] == tokens.text_tokens(text)


def test_max_tokens_cuts_the_json(sim: Simulator) -> None:
    (whole,) = _contents(_post(sim, _body("json_schema")))
    data = _post(sim, _body("json_schema", max_tokens=5)).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == whole[:20]
    assert data["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("name, shapes", [
    ("01-green-circle-on-red.png", 1), ("13-green-circle-on-red.gif", 1), ("05-white-circle-on-teal.jpg", 2),
    ("04-purple-stripes-on-green.png", None), ("12-black-stripes-on-white.webp", None),
    ("24-black-stripes-on-white.jpg", None),
])
def test_demo_images_give_their_shapes_and_are_drawings(sim: Simulator, name: str, shapes: int | None) -> None:
    url = _data_url((DEMO / name).read_bytes(), (DEMO / name).suffix[1:])
    (text,) = _contents(_post(sim, _body("json_schema", url)))
    value = json.loads(text)
    assert value["photo"] is False and "drawing" in value["tags"]
    if shapes is None:
        assert value["shapes"] > 1
    else:
        assert value["shapes"] == shapes
    if name.startswith(("01", "13")):
        assert value["colour"] == "red"
