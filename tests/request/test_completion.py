"""Completion bodies, streamed chunks, provider error bodies, and what a usage record costs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.completion import Reply, Usage, assemble_chunks, error_message, parse_body
from pipeline.config import Price
from pipeline.cost.pricing import PriceTable

USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 80,
    "total_tokens": 1280,
    "prompt_tokens_details": {"cached_tokens": 1024},
    "completion_tokens_details": {"reasoning_tokens": 64},
}
BODY: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-2024-08-06",
    # listed out of order on purpose: answers come back in index order
    "choices": [
        {"index": 1, "message": {"role": "assistant", "content": "A tabby cat."}, "finish_reason": "length"},
        {"index": 0, "message": {"role": "assistant", "content": "A cat on a mat.", "refusal": None},
         "finish_reason": "stop"},
    ],
    "usage": USAGE,
}
EXPECTED = Reply(
    answers=("A cat on a mat.", "A tabby cat."),
    finish_reason="stop",
    refusal=None,
    model="gpt-4o-2024-08-06",
    response_id="chatcmpl-1",
    usage=Usage(prompt_tokens=1200, completion_tokens=80, total_tokens=1280, reasoning_tokens=64, cached_tokens=1024),
)


def test_parse_body_full_completion() -> None:
    assert parse_body(json.dumps(BODY).encode()) == EXPECTED


def test_parse_body_refusal() -> None:
    body = {"id": "r", "model": "gpt-4o", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
         "finish_reason": "stop"}]}
    reply = parse_body(json.dumps(body).encode())
    assert reply.answers == (None,)
    assert reply.refusal == "I can't help with that."
    assert reply.usage is None


def test_usage_without_details_or_total() -> None:
    assert Usage.parse({"prompt_tokens": 10, "completion_tokens": 5}) == Usage(10, 5, 15, None, None)
    assert Usage.parse(None) is None


@pytest.mark.parametrize(
    "content",
    [
        b'{"id": "x", "model": "gpt-4o"}',  # no choices
        b'{"choices": null}',
        b'{"choices": []}',  # empty choices
        b"<html>502 Bad Gateway</html>",  # not JSON
        b"",
        b'[{"choices": []}]',
    ],
)
def test_parse_body_refuses_what_is_not_a_completion(content: bytes) -> None:
    with pytest.raises(ValueError):
        parse_body(content)


def chunk(index: int | None = None, **delta: Any) -> dict[str, Any]:
    choices = [] if index is None else [{"index": index, "delta": delta, "finish_reason": None}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06",
            "choices": choices, "usage": None}


def finish(index: int, reason: str) -> dict[str, Any]:
    return {**chunk(), "choices": [{"index": index, "delta": {}, "finish_reason": reason}]}


def test_assemble_chunks_matches_the_full_body() -> None:
    chunks = [
        chunk(0, role="assistant", content=""),
        chunk(1, role="assistant", content=""),
        chunk(1, content="A tabby"),
        chunk(0, content="A cat"),
        chunk(0, content=" on a mat."),
        chunk(1, content=" cat."),
        finish(1, "length"),
        finish(0, "stop"),
        {**chunk(), "usage": USAGE},  # the stream_options usage chunk: choices is []
    ]
    assert assemble_chunks(chunks) == EXPECTED


def test_assemble_chunks_collects_a_streamed_refusal() -> None:
    reply = assemble_chunks([chunk(0, refusal="I can't "), chunk(0, refusal="do that."), finish(0, "stop")])
    assert reply.refusal == "I can't do that."
    assert reply.answers == (None,)


def test_an_error_chunk_raises() -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error"}}
    with pytest.raises(ValueError, match="The server had an error"):
        assemble_chunks([chunk(0, content="partial"), error])


def test_a_stream_without_choices_raises() -> None:
    with pytest.raises(ValueError):
        assemble_chunks([{**chunk(), "usage": USAGE}])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (  # OpenAI
            {"error": {"message": "Rate limit reached for gpt-4o", "type": "requests", "param": None,
                       "code": "rate_limit_exceeded"}},
            "Rate limit reached for gpt-4o (rate_limit_exceeded)",
        ),
        (  # Anthropic
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            "Overloaded (overloaded_error)",
        ),
        (  # Gemini's OpenAI-compatible endpoint wraps the error in a list
            [{"error": {"code": 429, "message": "Resource has been exhausted", "status": "RESOURCE_EXHAUSTED"}}],
            "Resource has been exhausted (429)",
        ),
        ({"error": "model not found"}, "model not found"),
        ({"error": {"message": "no code"}}, "no code"),
        ({"detail": "something else"}, ""),
        ([], ""),
        ("plain text", ""),
    ],
)
def test_error_message(raw: Any, message: str) -> None:
    assert error_message(raw) == message


# -- pricing ------------------------------------------------------------------------------------


def test_cost_with_cached_tokens_for_gpt_4o() -> None:
    usage = Usage(prompt_tokens=1200, completion_tokens=80, total_tokens=1280, cached_tokens=1024)
    # gpt-4o: input 2.50, cached input 1.25, output 10.00 per 1M
    expected = ((1200 - 1024) * 2.50 + 1024 * 1.25 + 80 * 10.00) / 1e6
    assert PriceTable().cost_usd("gpt-4o", usage) == pytest.approx(expected)
    assert expected == pytest.approx(0.00252)


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("gemini-2.5-pro-latest", "gemini-2.5-pro"),
        ("openai/gpt-4o-2024-08-06", "gpt-4o"),
    ],
)
def test_dated_names_resolve_to_their_family(model: str, family: str) -> None:
    table = PriceTable()
    assert table.find(model) is not None
    assert table.find(model) == table.find(family)


def test_family_prices_are_the_bundled_ones() -> None:
    table = PriceTable()
    assert table.find("gpt-4o-mini-2024-07-18") == Price(input=0.15, output=0.60, cached_input=0.075,
                                                         batch_input=0.075, batch_output=0.30)
    assert table.find("claude-sonnet-4-20250514") == Price(input=3.00, output=15.00, cached_input=0.30,
                                                           batch_input=1.50, batch_output=7.50)


def test_a_batch_answer_costs_the_batch_price_and_an_unknown_batch_price_is_none() -> None:
    table = PriceTable({"my-model": Price(input=1.0, output=2.0)})
    usage = Usage(1_000_000, 1_000_000, 2_000_000)
    assert table.cost_usd("gpt-4o", usage, batch=True) == pytest.approx(1.25 + 5.00)
    assert table.cost_usd("gpt-4o", usage) == pytest.approx(2.50 + 10.00)
    assert table.cost_usd("my-model", usage) == pytest.approx(3.0)
    assert table.cost_usd("my-model", usage, batch=True) is None  # never a guessed discount


def test_unknown_model_costs_none() -> None:
    table = PriceTable()
    assert table.find("my-local-llava") is None
    assert table.cost_usd("my-local-llava", Usage(10, 10, 20)) is None


def test_config_override_wins() -> None:
    table = PriceTable({"gpt-4o": Price(input=1.0, output=2.0)})
    usage = Usage(prompt_tokens=1000, completion_tokens=500, total_tokens=1500, cached_tokens=200)
    # no cached price in the override: cached tokens are billed at the input price
    assert table.cost_usd("gpt-4o", usage) == pytest.approx((1000 * 1.0 + 500 * 2.0) / 1e6)
    assert table.cost_usd("gpt-4o-2024-08-06", usage) == table.cost_usd("gpt-4o", usage)


def test_override_adds_an_unknown_model() -> None:
    table = PriceTable({"my-local-llava": Price(input=0.0, output=1.0)})
    assert table.cost_usd("my-local-llava", Usage(100, 1_000_000, 1_000_100)) == pytest.approx(1.0)


def test_hidden_thinking_tokens_are_billed_as_output() -> None:
    # total exceeds prompt + completion: the gateway left reasoning out of completion_tokens
    usage = Usage(prompt_tokens=100, completion_tokens=50, total_tokens=400)
    expected = (100 * 2.50 + (400 - 100) * 10.00) / 1e6
    assert PriceTable().cost_usd("gpt-4o", usage) == pytest.approx(expected)


def test_total_below_prompt_plus_completion_bills_completion() -> None:
    usage = Usage(prompt_tokens=100, completion_tokens=50, total_tokens=120)
    assert PriceTable().cost_usd("gpt-4o", usage) == pytest.approx((100 * 2.50 + 50 * 10.00) / 1e6)


def test_reasoning_tokens_are_inside_completion_and_not_billed_twice() -> None:
    usage = Usage(prompt_tokens=1000, completion_tokens=200, total_tokens=1200, reasoning_tokens=150,
                  cached_tokens=0)
    # gpt-4.1-mini: input 0.40, output 1.60 per 1M; the 150 reasoning tokens are among the 200
    assert PriceTable().cost_usd("gpt-4.1-mini", usage) == pytest.approx((1000 * 0.40 + 200 * 1.60) / 1e6)


def test_content_given_as_parts_is_joined_and_odd_types_are_refused() -> None:
    body: dict[str, Any] = {"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": [{"type": "text", "text": "a red "}, {"type": "text", "text": "square"}]}}]}
    assert parse_body(json.dumps(body).encode()).answers == ("a red square",)
    body["choices"][0]["message"]["content"] = {"text": "nested"}
    with pytest.raises(ValueError):
        parse_body(json.dumps(body).encode())
    body["choices"][0]["message"]["content"] = "fine"
    body["usage"] = {"prompt_tokens": 1, "completion_tokens": 1, "completion_tokens_details": {"reasoning_tokens": "x"}}
    with pytest.raises(ValueError):
        parse_body(json.dumps(body).encode())
