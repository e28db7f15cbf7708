"""What the simulator sends back, as OpenAI shapes it: the model list, error bodies (and
`Invalid`, the 400 a request earns), the completion JSON and its SSE chunk events.

Never: deciding what to answer.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, NamedTuple

__all__ = ["JSON", "Answer", "Invalid", "models_body", "error_body", "completion_head", "completion_body", "chunk_events"]

JSON = dict[str, Any]
_ERRORS: dict[int, tuple[str, str | None, str]] = {  # status -> (type, code, message), as OpenAI words them
    400: ("invalid_request_error", None, "Bad request (scripted by the simulator)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to use this model."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (simulated). Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_MODEL_IDS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini")


class Invalid(Exception):
    """A body the provider would refuse with a 400: its message, the offending param and a code."""

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


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


def completion_head(model: str) -> JSON:
    """The fields a completion and each of its chunks share, under a fresh response id."""
    response_id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": "fp_simulator"}


class Answer(NamedTuple):
    """One choice's answer. A refusal is sent as OpenAI's Structured Outputs send it: the text in
    the message's `refusal` field, its `content` null."""

    text: str
    finish_reason: str
    refusal: bool = False

    @property
    def field(self) -> str:
        return "refusal" if self.refusal else "content"


def completion_body(head: JSON, answers: list[Answer], usage: JSON) -> JSON:
    """The JSON of a completion that is not streamed: one choice per answer, and the usage."""
    choices = [{"index": i, "logprobs": None, "finish_reason": answer.finish_reason,
                "message": {"role": "assistant", "content": None, "refusal": None, answer.field: answer.text}}
               for i, answer in enumerate(answers)]
    return {**head, "choices": choices, "usage": usage}


def chunk_events(head: JSON, answers: list[Answer], usage: JSON | None) -> list[bytes]:
    """The SSE events of a streamed completion: each answer in three pieces, then its
    finish_reason in a chunk of its own with an empty delta (as OpenAI sends it), the usage if
    asked, [DONE]."""
    chunk = {**head, "object": "chat.completion.chunk"}

    def event(choices: list[JSON], **extra: Any) -> bytes:
        extra = {"usage": None, **extra} if usage is not None else extra
        return b"data: " + json.dumps({**chunk, "choices": choices, **extra}).encode() + b"\n\n"

    events = []
    for i, answer in enumerate(answers):
        text, field = answer.text, answer.field
        opening = {"content": None, "refusal": ""} if answer.refusal else {"content": ""}
        events.append(event([{"index": i, "delta": {"role": "assistant", **opening}, "logprobs": None,
                              "finish_reason": None}]))
        step = max(1, math.ceil(len(text) / 3))
        pieces = [text[k: k + step] for k in range(0, len(text), step)] or [""]
        for piece in pieces:
            events.append(event([{"index": i, "delta": {field: piece}, "logprobs": None, "finish_reason": None}]))
        events.append(event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": answer.finish_reason}]))
    if usage is not None:
        events.append(event([], usage=usage))
    return [*events, b"data: [DONE]\n\n"]
