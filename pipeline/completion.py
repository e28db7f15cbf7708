"""A chat completion as received: its answers and the provider's usage counts.

Owns: parsing a completion body, assembling streamed chunks into the same thing, and the
provider's error message out of an error body. Never: HTTP, retries. Parse failures raise
ValueError; the client decides what they mean.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["Usage", "Reply", "parse_body", "assemble_chunks", "error_message"]


def _count(value: Any) -> int | None:
    return None if value is None else int(value)  # ValueError when it is no number


@dataclass(frozen=True, slots=True)
class Usage:
    """Parsed only from the provider's `usage`, never estimated."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None

    @classmethod
    def parse(cls, raw: Any) -> Usage | None:
        if not isinstance(raw, dict):
            return None
        details_in = raw.get("prompt_tokens_details") or {}
        details_out = raw.get("completion_tokens_details") or {}
        prompt = int(raw.get("prompt_tokens") or 0)
        completion = int(raw.get("completion_tokens") or 0)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=int(raw.get("total_tokens") or prompt + completion),
            reasoning_tokens=_count(details_out.get("reasoning_tokens")),
            cached_tokens=_count(details_in.get("cached_tokens")),
        )

    def __add__(self, other: Usage) -> Usage:
        """Two requests' counts together (a question and its follow-up)."""
        def both(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens,
                     self.total_tokens + other.total_tokens, both(self.reasoning_tokens, other.reasoning_tokens),
                     both(self.cached_tokens, other.cached_tokens))


@dataclass(frozen=True, slots=True)
class Reply:
    answers: tuple[str | None, ...]  # one per choice, in index order
    finish_reason: str | None
    refusal: str | None
    model: str | None
    response_id: str | None
    usage: Usage | None
    latency_ms: float = 0.0
    attempts: int = 1

    def timed(self, latency_ms: float, attempts: int) -> Reply:
        return replace(self, latency_ms=latency_ms, attempts=attempts)

    def after(self, earlier: Reply) -> Reply:
        """This reply to a follow-up, carrying the usage, time and attempts of the earlier one too."""
        usage = self.usage if earlier.usage is None else earlier.usage if self.usage is None else earlier.usage + self.usage
        return replace(self, usage=usage, latency_ms=earlier.latency_ms + self.latency_ms,
                       attempts=earlier.attempts + self.attempts)


def _text(value: Any) -> str | None:
    """A message field as text: a string, None, or a list of content parts (some gateways)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in value)
    raise ValueError(f"a message field is {type(value).__name__}, not text")


def _reply(raw: dict[str, Any], choices: list[dict[str, Any]]) -> Reply:
    if not choices:
        raise ValueError("no choices in the completion")
    choices = sorted(choices, key=lambda c: int(c.get("index", 0)))
    messages = [c.get("message") or {} for c in choices]
    if not all(isinstance(m, dict) for m in messages):
        raise ValueError("a choice has no message")
    return Reply(
        answers=tuple(_text(m.get("content")) for m in messages),
        finish_reason=_text(choices[0].get("finish_reason")),
        refusal=_text(messages[0].get("refusal")),
        model=_text(raw.get("model")),
        response_id=_text(raw.get("id")),
        usage=Usage.parse(raw.get("usage")),
    )


def parse_body(content: bytes) -> Reply:
    """A non-streamed completion body; ValueError when it is not one."""
    raw = json.loads(content)
    if not isinstance(raw, dict) or not isinstance(raw.get("choices"), list):
        raise ValueError("the body is not a chat completion")
    return _reply(raw, raw["choices"])


def assemble_chunks(chunks: Iterable[dict[str, Any]]) -> Reply:
    """The `chat.completion.chunk` events of one stream, routed by choice index."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        if "error" in chunk:
            raise ValueError(f"error in the stream: {error_message(chunk)}")
        head = {"id": chunk.get("id", head.get("id")), "model": chunk.get("model", head.get("model")),
                "usage": chunk.get("usage") or head.get("usage")}
        for delta_choice in chunk.get("choices") or []:
            choice = choices.setdefault(int(delta_choice.get("index", 0)),
                                        {"index": delta_choice.get("index", 0), "message": {}})
            delta = delta_choice.get("delta") or {}
            message = choice["message"]
            for key in ("content", "refusal"):
                if delta.get(key) is not None:
                    message[key] = (message.get(key) or "") + delta[key]
            if delta_choice.get("finish_reason"):
                choice["finish_reason"] = delta_choice["finish_reason"]
    return _reply(head, list(choices.values()))


def error_message(raw: Any) -> str:
    """The provider's own words from an error body: OpenAI's, Anthropic's or Gemini's list form."""
    if isinstance(raw, list) and raw:
        raw = raw[0]
    error = raw.get("error") if isinstance(raw, dict) else None
    if isinstance(error, dict):
        message = error.get("message") or ""
        code = error.get("code") or error.get("type")
        return f"{message} ({code})" if code and message else str(message or code or "")
    if isinstance(error, str):
        return error
    return ""
