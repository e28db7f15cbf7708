"""The simulator over real HTTP on 127.0.0.1: answers, usage, errors, streams, limits and faults."""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from pipeline import simulator
from pipeline.cli import simulator_arguments, simulator_settings
from pipeline.config import SimulatorSettings
from pipeline.errors import ConfigError
from pipeline.simulator import Simulator

from ..runs import wait_for

KEY = "sk-test-secret-123"
PROMPT = "Describe this image."


def _data_url(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (209, 42, 31),
              fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


RED = _data_url()


def _body(*urls: str, prompt: str = PROMPT, detail: str = "auto", **extra: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    parts += [{"type": "image_url", "image_url": {"url": url, "detail": detail}} for url in urls]
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": parts}], "max_tokens": 300, **extra}


@pytest.fixture(scope="module")
def server() -> Iterator[Simulator]:
    with simulator.running() as sim:
        yield sim


@pytest.fixture
def sim(server: Simulator) -> Iterator[Simulator]:
    server.reset()
    yield server
    server.settings = SimulatorSettings()
    server.reset()


@pytest.fixture
def client(server: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as c:
        yield c


def test_png_answer_and_usage_by_the_tile_rule(sim: Simulator, client: httpx.Client) -> None:
    resp = client.post("chat/completions", json=_body(_data_url((1024, 768)), detail="high"))
    assert resp.status_code == 200
    data = resp.json()
    content = data["choices"][0]["message"]["content"]
    assert "1024x768" in content and "red" in content and PROMPT in content
    text_tokens = math.ceil(len(PROMPT) / 4) + 4
    image_tokens = 85 + 170 * 2 * 2  # gpt-4o: 2x2 tiles of 512
    assert data["usage"] == {
        "prompt_tokens": text_tokens + image_tokens,
        "completion_tokens": math.ceil(len(content) / 4),
        "total_tokens": text_tokens + image_tokens + math.ceil(len(content) / 4),
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert data["id"].startswith("chatcmpl-sim-") and data["object"] == "chat.completion"
    assert data["model"] == "gpt-4o" and data["system_fingerprint"] == "fp_simulator"
    assert data["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                                  "logprobs": None, "finish_reason": "stop"}
    entry = sim.log[-1]
    assert (entry.status, entry.response_id, entry.usage) == (200, data["id"], data["usage"])


def test_answers_are_deterministic_and_follow_prompt_and_images(sim: Simulator, client: httpx.Client) -> None:
    def answer(body: dict[str, Any]) -> str:
        return str(client.post("chat/completions", json=body).json()["choices"][0]["message"]["content"])

    first, again = answer(_body(RED)), answer(_body(RED))
    assert first == again
    assert answer(_body(RED, prompt="List the objects.")) != first
    blue_jpeg = _data_url((30, 20), (20, 40, 200), "JPEG")
    both = answer(_body(RED, blue_jpeg))
    assert "Image 1: 64x48" in both and "Image 2: 30x20" in both and "blue" in both
    low = client.post("chat/completions", json=_body("https://example.com/cat.jpg", detail="low")).json()
    assert low["usage"]["prompt_tokens"] == math.ceil(len(PROMPT) / 4) + 4 + 85
    high = client.post("chat/completions", json=_body("https://example.com/cat.jpg")).json()
    assert high["usage"]["prompt_tokens"] == math.ceil(len(PROMPT) / 4) + 4 + 765  # unknown: 1024x1024


def test_no_key_is_401(sim: Simulator) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.post(f"{sim.url}/chat/completions", json=_body(RED), headers=headers)
        assert resp.status_code == 401
        assert resp.json() == {"error": {"message": resp.json()["error"]["message"], "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}
    assert [e.status for e in sim.log] == [401, 401, 401] and KEY not in repr(sim.log)


@pytest.mark.parametrize("style, headers", [
    ("bearer", {"Authorization": f"Bearer {KEY}"}),
    ("x-api-key", {"x-api-key": KEY, "anthropic-version": "2023-06-01"}),
    ("x-goog-api-key", {"x-goog-api-key": KEY}),
])
def test_each_auth_style_is_accepted_and_the_key_never_logged(sim: Simulator, style: str,
                                                              headers: dict[str, str]) -> None:
    resp = httpx.post(f"{sim.url}/chat/completions", json=_body(RED), headers=headers)
    assert resp.status_code == 200
    (entry,) = sim.requests()
    assert entry.auth == style
    assert KEY not in repr(entry)
    assert not {"authorization", "x-api-key", "x-goog-api-key"} & set(entry.headers)
    assert entry.body is not None
    logged_url = entry.body["messages"][0]["content"][1]["image_url"]["url"]
    assert logged_url.startswith("data:image/png;base64,<") and logged_url.endswith(" bytes>")
    assert entry.markers[0] == PROMPT


def _messages(*content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(content)}]}


TEXT = {"type": "text", "text": PROMPT}
BAD_PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()
TRUNCATED_PNG = RED[: len(RED) // 2 // 4 * 4]


@pytest.mark.parametrize("change, param", [
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.[0].role"),
    ({"messages": [{"role": "user"}]}, "messages.[0].content"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"frequency_penalty": 2.1}, "frequency_penalty"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logit_bias": {"50256": 101}}, "logit_bias"),
    ({"logit_bias": {"word": 1}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 3}, "stop"),
    ({"stream": "yes"}, "stream"),
    (_messages(TEXT, {"type": "image_url", "image_url": {"url": RED, "detail": "huge"}}),
     "messages.[0].content.[1].image_url.detail"),
    (_messages(TEXT, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}),
     "messages.[0].content.[1].image_url"),
    (_messages(TEXT, {"type": "image_url", "image_url": {"url": BAD_PNG}}), "messages.[0].content.[1].image_url"),
    (_messages(TEXT, {"type": "image_url", "image_url": {"url": TRUNCATED_PNG}}),
     "messages.[0].content.[1].image_url"),
])
def test_invalid_requests_are_400_naming_the_field(sim: Simulator, client: httpx.Client,
                                                   change: dict[str, Any], param: str) -> None:
    resp = client.post("chat/completions", json={**_body(RED), **change})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if param.endswith("image_url"):
        assert (error["code"], error["message"]) == ("invalid_image", "Invalid image.")
    assert sim.log[-1].status == 400


def _encoded_url(image: Image.Image, fmt: str, mime: str = "image/png", **options: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


_FRAMES = [Image.new("RGB", (16, 16), (80 * k, 0, 0)).convert("P") for k in range(3)]


@pytest.mark.parametrize("url, code", [
    (_encoded_url(Image.new("RGB", (16, 16)), "BMP"), "invalid_image_format"),
    (_encoded_url(Image.new("RGB", (16, 16)), "TIFF", "image/png"), "invalid_image_format"),  # by content, not MIME
    (_encoded_url(_FRAMES[0], "GIF", "image/gif", save_all=True, append_images=_FRAMES[1:]), "invalid_image_format"),
    (_encoded_url(Image.new("CMYK", (16, 16)), "JPEG", "image/jpeg"), "invalid_image_mode"),
    (_encoded_url(Image.new("I;16", (16, 16)), "PNG"), "invalid_image_mode"),
])
def test_images_openai_does_not_take_are_400(sim: Simulator, client: httpx.Client, url: str, code: str) -> None:
    resp = client.post("chat/completions", json=_body(url))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == (code, "messages.[0].content.[1].image_url")
    if code == "invalid_image_format":
        assert error["message"].startswith("You uploaded an unsupported image.")


def test_a_single_frame_gif_and_a_grey_jpeg_are_taken(sim: Simulator, client: httpx.Client) -> None:
    for url in (_encoded_url(_FRAMES[0], "GIF", "image/gif"), _encoded_url(Image.new("L", (16, 16)), "JPEG", "image/jpeg")):
        assert client.post("chat/completions", json=_body(url)).status_code == 200


def test_stream_with_usage_assembles_the_same_answer(sim: Simulator, client: httpx.Client) -> None:
    plain = client.post("chat/completions", json=_body(RED)).json()
    body = _body(RED, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == plain["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["stop"]
    assert chunks[-2]["choices"][0]["delta"] == {}  # the finish_reason comes alone, as OpenAI sends it
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_n_gives_that_many_choices(sim: Simulator, client: httpx.Client) -> None:
    data = client.post("chat/completions", json=_body(RED, n=3)).json()
    contents = [c["message"]["content"] for c in data["choices"]]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2] and len(set(contents)) == 3
    assert data["usage"]["completion_tokens"] == sum(math.ceil(len(c) / 4) for c in contents)


def test_max_tokens_truncates_with_finish_reason_length(sim: Simulator, client: httpx.Client) -> None:
    data = client.post("chat/completions", json=_body(RED, max_tokens=3)).json()
    assert data["choices"][0]["finish_reason"] == "length"
    assert len(data["choices"][0]["message"]["content"]) == 12
    assert data["usage"]["completion_tokens"] == 3


def test_plan_scripts_statuses_in_order(sim: Simulator, client: httpx.Client) -> None:
    sim.plan("cat-042", [429, 500, 404, 200], retry_after_s=0.25)
    statuses = []
    for _ in range(5):
        resp = client.post("chat/completions", json=_body(RED, prompt="Caption cat-042 please"))
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert resp.headers["retry-after"] == "0.25"
        if resp.status_code == 404:
            assert resp.json()["error"]["code"] == "model_not_found"
    assert statuses == [429, 500, 404, 200, 200]
    assert [e.fault for e in sim.log] == ["plan", "plan", "plan", None, None]
    assert client.post("chat/completions", json=_body(RED)).status_code == 200  # other rows untouched


def test_plan_matches_image_urls_and_scripts_faults(sim: Simulator, client: httpx.Client) -> None:
    sim.plan("example.com/dog.png", ["drop", 200])
    with pytest.raises(httpx.TransportError):
        client.post("chat/completions", json=_body("https://example.com/dog.png"))
    assert client.post("chat/completions", json=_body("https://example.com/dog.png")).status_code == 200


def test_requests_per_minute_limits_bursts(sim: Simulator, client: httpx.Client) -> None:
    sim.settings = SimulatorSettings(requests_per_minute=60)  # one a second, no burst
    first = client.post("chat/completions", json=_body(RED))
    second = client.post("chat/completions", json=_body(RED))
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "60"
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert second.headers["retry-after"] == "1"  # whole seconds, as HTTP writes them
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in second.headers
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.headers["x-ratelimit-reset-requests"] in ("1s", *(f"{ms}ms" for ms in range(900, 1000)))
    assert [e.fault for e in sim.log] == [None, "rate_limit"]


def test_the_bucket_mode_sends_fractional_waits(sim: Simulator, client: httpx.Client) -> None:
    sim.settings = SimulatorSettings(requests_per_minute=60, limit_mode="bucket")
    assert client.post("chat/completions", json=_body(RED)).status_code == 200
    second = client.post("chat/completions", json=_body(RED))
    assert second.status_code == 429
    assert 0 < float(second.headers["retry-after"]) <= 1
    assert 0 < int(second.headers["retry-after-ms"]) <= 1000
    assert second.headers["x-ratelimit-reset-requests"].endswith("ms")


def test_unstated_limits_send_no_headers_and_no_wait(sim: Simulator, client: httpx.Client) -> None:
    sim.settings = SimulatorSettings(requests_per_minute=60, state_limits=False)
    first = client.post("chat/completions", json=_body(RED))
    second = client.post("chat/completions", json=_body(RED))
    assert first.status_code == 200 and second.status_code == 429
    for resp in (first, second):
        assert not [name for name in resp.headers if name.startswith(("x-ratelimit", "retry-after"))]


def test_tokens_per_minute_counts_max_tokens(sim: Simulator, client: httpx.Client) -> None:
    sim.settings = SimulatorSettings(tokens_per_minute=60_000)  # 1,000 a second
    assert client.post("chat/completions", json=_body(RED, max_tokens=500)).status_code == 200
    resp = client.post("chat/completions", json=_body(RED, max_tokens=500))
    assert resp.status_code == 429  # 264 + 500 charged twice is more than 1,000
    assert resp.headers["x-ratelimit-limit-tokens"] == "60000"
    assert float(resp.headers["retry-after"]) > 0


@pytest.mark.parametrize("fault", ["429", "500", "503", "malformed", "drop", "hang"])
def test_a_rate_of_one_always_faults(sim: Simulator, client: httpx.Client, fault: str) -> None:
    sim.settings = SimulatorSettings(**{f"rate_{fault}": 1.0}, retry_after_s=2.5, hang_s=0.2)
    started = time.monotonic()
    try:
        resp: httpx.Response | None = client.post("chat/completions", json=_body(RED))
    except httpx.TransportError:
        resp = None
    entry = sim.log[-1]
    assert entry.fault == fault
    if fault == "drop":
        assert resp is None and entry.status == 0
        return
    assert resp is not None
    if fault == "malformed":
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        with pytest.raises(json.JSONDecodeError):
            json.loads(resp.content)
    elif fault == "hang":
        assert resp.status_code == 200 and time.monotonic() - started >= 0.2
    else:
        assert resp.status_code == int(fault) and "error" in resp.json()
    if fault == "429":
        assert resp.headers["retry-after"] == "2.5"


def test_hung_requests_do_not_hold_up_shutdown() -> None:
    with simulator.running(SimulatorSettings(rate_hang=1.0, hang_s=60)) as sim:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{sim.url}/chat/completions", json=_body(RED), headers={"x-api-key": KEY}, timeout=0.2)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert sim.log[0].fault == "hang"
    wait_for(lambda: sim.log[0].status == 503)


def test_faults_are_repeatable_and_retries_draw_again() -> None:
    settings = SimulatorSettings(rate_500=0.5, seed=7)
    bodies = [_body(RED, prompt=f"row {i % 4}") for i in range(12)]  # each row sent three times

    def statuses() -> list[int]:
        with simulator.running(settings) as sim:
            with httpx.Client(base_url=sim.url, headers={"x-goog-api-key": KEY}) as client:
                return [client.post("chat/completions", json=body).status_code for body in bodies]

    first = statuses()
    assert first == statuses()
    assert {200, 500} <= set(first)
    assert any(len({first[i], first[i + 4], first[i + 8]}) == 2 for i in range(4))


def test_models_are_listed(sim: Simulator, client: httpx.Client) -> None:
    data = client.get("models").json()
    assert data["object"] == "list" and data["data"][0]["object"] == "model"


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com"])
def test_only_loopback_is_served(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        with simulator.running(host=host):
            pass


def test_settings_come_from_command_line_flags() -> None:
    parser = argparse.ArgumentParser()
    simulator_arguments(parser)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings} - {"-h"}
    assert flags == {"--" + name.replace("_", "-") for name in SimulatorSettings.model_fields}
    assert simulator_settings(parser.parse_args([])) == SimulatorSettings()
    args = parser.parse_args(["--rate-500", "0.5", "--requests-per-minute", "60", "--seed", "3"])
    assert simulator_settings(args) == SimulatorSettings(rate_500=0.5, requests_per_minute=60, seed=3)
    with pytest.raises(ConfigError, match="rate_500"):
        simulator_settings(parser.parse_args(["--rate-500", "2"]))


def _strict(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "annotation", "strict": strict, "schema": schema}},
            "messages": [{"role": "user", "content": "Describe it as JSON."}]}


_CLOSED = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}


@pytest.mark.parametrize(("change", "param", "code", "message"), [
    ({"seed": 1, "top_k": 5}, None, None, "Unrecognized request argument supplied: top_k"),
    ({"stream_options": {"include_usage": True}}, "stream_options", None,
     "The 'stream_options' parameter is only allowed when 'stream' is enabled."),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options", None, "only allowed when"),
    ({"model": "o4-mini"}, "max_tokens", "unsupported_parameter",
     "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."),
    ({"model": "gpt-5-nano-2025-08-07"}, "max_tokens", "unsupported_parameter", "Use 'max_completion_tokens'"),
    ({"model": "o3", "max_tokens": None, "max_completion_tokens": 300, "temperature": 0.2}, "temperature",
     "unsupported_value", "Unsupported value: 'temperature' does not support 0.2 with this model. Only the "
                          "default (1) value is supported."),
    ({"model": "o1", "max_tokens": None, "top_p": 0.5}, "top_p", "unsupported_value", "'top_p' does not support"),
    (_strict({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}), "response_format",
     None, "Invalid schema for response_format 'annotation': In context=(), 'additionalProperties' is required "
           "to be supplied and to be false."),
    (_strict({**_CLOSED, "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}), "response_format",
     None, "In context=(), 'required' is required to be supplied and to be an array including every key in "
           "properties. Missing 'b'."),
    (_strict({**_CLOSED, "properties": {"a": {"type": "object", "properties": {"x": {"type": "integer"}},
                                              "required": ["x"]}}}),
     "response_format", None, "In context=('properties', 'a'), 'additionalProperties' is required"),
    (_strict({**_CLOSED, "properties": {"a": {"type": "array", "items": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "additionalProperties": False}}}}),
     "response_format", None, "In context=('properties', 'a', 'items'), 'required' is required"),
    (_strict({**_CLOSED, "$defs": {"x": {"type": "object", "properties": {}}}}), "response_format", None,
     "In context=('$defs', 'x'), 'additionalProperties'"),
    (_strict({**_CLOSED, "properties": {"a": {"allOf": [{"type": "string"}]}}}), "response_format", None,
     "In context=('properties', 'a'), 'allOf' is not permitted."),
    (_strict({"type": "array", "items": {"type": "string"}}), "response_format", None,
     "schema must be a JSON Schema of 'type: \"object\"', got 'type: \"array\"'."),
])
def test_requests_openai_refuses_are_400s_in_its_words(sim: Simulator, client: httpx.Client, change: dict[str, Any],
                                                      param: str | None, code: str | None, message: str) -> None:
    body = {key: value for key, value in {**_body(RED), **change}.items() if value is not None}
    resp = client.post("chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and (error["param"], error["code"]) == (param, code)
    assert message in error["message"]
    assert sim.log[-1].status == 400


@pytest.mark.parametrize("change", [
    {"stream": True, "stream_options": {"include_usage": True}, "seed": 3, "metadata": {"job": "a"}},
    {"model": "o4-mini", "max_tokens": None, "max_completion_tokens": 300, "temperature": 1, "reasoning_effort": "low"},
    {"model": "gpt-5-chat-latest", "temperature": 0.3},  # gpt-5's chat model takes what gpt-4o takes
    _strict(_CLOSED),
    _strict({"type": "object", "properties": {"a": {"type": "string"}}}, strict=False),  # not strict: not checked
    _strict({**_CLOSED, "$defs": {"p": {"type": "object", "properties": {"x": {"type": ["integer", "null"]}},
                                        "required": ["x"], "additionalProperties": False}},
             "properties": {"a": {"anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}]}}}),
])
def test_requests_openai_takes_are_answered(sim: Simulator, client: httpx.Client, change: dict[str, Any]) -> None:
    body = {key: value for key, value in {**_body(RED), **change}.items() if value is not None}
    assert client.post("chat/completions", json=body).status_code == 200
