"""The official `openai` SDK against `annotate simulate`, run as a user runs it: what the SDK
sends, the simulator takes; what the simulator answers (completions, streams with usage,
structured answers, errors), the SDK reads."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Literal

import pytest
from pydantic import BaseModel

from .conftest import KEY, image_bytes

pytest.importorskip("openai")
import openai  # noqa: E402
from openai.types.chat import ChatCompletionMessageParam  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def simulate() -> Iterator[Callable[..., str]]:
    """Starts `annotate simulate` with the given flags; the base URL of each is returned."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> str:
        port = _free_port()
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "simulate", "--port", str(port), *flags],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(process)
        url = f"http://127.0.0.1:{port}/v1"
        probe = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=1)
        deadline = time.monotonic() + 60
        while True:
            try:
                probe.models.list()
                return url
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "annotate simulate did not start"
                time.sleep(0.1)

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(simulate: Callable[..., str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=simulate(), api_key=KEY, max_retries=0)


def _messages(text: str = "Describe this image.") -> list[ChatCompletionMessageParam]:
    import base64

    url = "data:image/png;base64," + base64.b64encode(image_bytes((96, 64), "red")).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_create_answers_with_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=_messages(), max_tokens=60)
    assert reply.choices[0].message.content and "red" in reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_stream_with_usage_is_the_same_answer(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="gpt-4o-mini", messages=_messages(), max_tokens=60)
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=_messages(), max_tokens=60,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]


class Box(BaseModel):
    width: int
    height: int | None


class Label(BaseModel):
    colour: Literal["red", "green", "blue", "other"]
    box: Box
    note: str | None


def test_parse_gets_an_answer_of_the_sdk_s_own_strict_schema(client: openai.OpenAI) -> None:
    # the SDK writes a strict schema of its own ($defs, nullable fields); the simulator checks it
    reply = client.chat.completions.parse(model="gpt-4o-mini", messages=_messages(), response_format=Label)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Label) and isinstance(parsed.box, Box)


def test_a_reasoning_model_takes_max_completion_tokens_and_refuses_max_tokens(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="o4-mini", messages=_messages(), max_completion_tokens=60)
    assert reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="o4-mini", messages=_messages(), max_tokens=60)
    assert (refused.value.param, refused.value.code) == ("max_tokens", "unsupported_parameter")
    assert "Use 'max_completion_tokens' instead" in refused.value.message


def test_errors_reach_the_sdk_as_its_own_exceptions(client: openai.OpenAI, simulate: Callable[..., str]) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=_messages(), extra_body={"top_k": 5})
    assert "Unrecognized request argument supplied: top_k" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=_messages(), temperature=3)
    assert refused.value.param == "temperature"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o-mini", messages=_messages(),
                                       extra_headers={"Authorization": openai.Omit()})
    limited = openai.OpenAI(base_url=simulate("--requests-per-minute", "60"), api_key=KEY, max_retries=0)
    limited.chat.completions.create(model="gpt-4o-mini", messages=_messages())  # the second's whole allowance
    with pytest.raises(openai.RateLimitError) as throttled:
        limited.chat.completions.create(model="gpt-4o-mini", messages=_messages())
    assert (throttled.value.code == "rate_limit_exceeded"
            and int(throttled.value.response.headers["retry-after"]) >= 1)


def _batch_file(lines: list[dict[str, object]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _caption_line(custom_id: str, colour: str) -> dict[str, object]:
    url = "data:image/png;base64," + base64.b64encode(image_bytes((64, 48), colour)).decode()
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": [
                {"type": "text", "text": f"Describe {custom_id}."}, {"type": "image_url", "image_url": {"url": url}}]}]}}


def _until_ended(client: openai.OpenAI, batch_id: str) -> openai.types.Batch:
    deadline = time.monotonic() + 30
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "expired", "cancelled", "failed"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
    return batch


def test_the_sdk_runs_a_batch_from_upload_to_results(simulate: Callable[..., str]) -> None:
    client = openai.OpenAI(base_url=simulate("--batch-validating-s", "0", "--batch-lines-per-s", "500",
                                             "--batch-expire-share", "0.3"), api_key=KEY, max_retries=0)
    lines = [_caption_line(f"row-{i}", colour) for i, colour in enumerate(["red", "green", "blue", "white"] * 3)]
    file = client.files.create(file=("rows.jsonl", _batch_file(lines)), purpose="batch")
    assert file.purpose == "batch" and file.bytes > 0
    created = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"annotate_shard": "one"})
    assert created.metadata == {"annotate_shard": "one"}
    batch = _until_ended(client, created.id)
    assert batch.request_counts is not None and batch.request_counts.total == 12
    assert batch.status == "expired" and batch.output_file_id and batch.error_file_id  # some answered, some not
    answered = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    expired = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert {line["custom_id"] for line in answered + expired} == {line["custom_id"] for line in lines}
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in expired)
    for line in answered:
        completion = openai.types.chat.ChatCompletion.model_validate(line["response"]["body"])
        assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert created.id in [b.id for b in client.batches.list(limit=5)]
    assert client.files.delete(file.id).deleted


def test_a_file_of_too_many_lines_fails_validation_as_openai_reports_it(simulate: Callable[..., str]) -> None:
    client = openai.OpenAI(base_url=simulate("--batch-validating-s", "0", "--batch-max-lines", "2"),
                           api_key=KEY, max_retries=0)
    file = client.files.create(file=("rows.jsonl", _batch_file([_caption_line(f"r{i}", "red") for i in range(3)])),
                               purpose="batch")
    batch = _until_ended(client, client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                                       completion_window="24h").id)
    assert batch.status == "failed" and batch.output_file_id is None
    assert batch.errors is not None and [e.code for e in batch.errors.data or []] == ["too_many_tasks"]
