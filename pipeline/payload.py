"""The chat-completions request body for one row: the same row, files and config give the same
body. A plain function over a row (it reads the row's image files), so every engine runs it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import PromptConfig, RequestConfig
from .cost.tokens import input_tokens
from .images import ImagePart, notes_text, to_parts
from .manifest import ManifestRow
from .structured import OutputSchema

__all__ = ["build", "estimate", "input_texts", "follow_up", "prepare", "Prepared", "TokenEstimate", "UNSET_MAX_TOKENS"]

# Without max_tokens a provider may answer at length; limits reserve this many per choice.
UNSET_MAX_TOKENS = 1024


def _texts(row: ManifestRow, prompt: PromptConfig, schema: OutputSchema | None) -> tuple[str | None, str]:
    """The system and user texts; json_object mode states the schema in the system message,
    prompt mode in the user's."""
    system, user = prompt.system, row.prompt
    if schema is not None and schema.mode == "json_object":
        system = f"{system}\n\n{schema.instruction}" if system else schema.instruction
    elif schema is not None and schema.mode == "prompt":
        user = f"{user}\n\n{schema.instruction}"
    return system, user


def build(row: ManifestRow, parts: Sequence[ImagePart], request: RequestConfig, prompt: PromptConfig,
          schema: OutputSchema | None = None) -> dict[str, Any]:
    system, text = _texts(row, prompt, schema)
    user = [{"type": "text", "text": text}, *(part.content(prompt.detail) for part in parts)]
    messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": user}]
    body: dict[str, Any] = {"model": request.model, "messages": messages} | request.set_fields()
    if request.stream:
        body["stream_options"] = {"include_usage": True}  # else a streamed answer has no usage
    if schema is not None and (response_format := schema.response_format()):
        body["response_format"] = response_format
    return body | request.extra


def input_texts(row: ManifestRow, prompt: PromptConfig, schema: OutputSchema | None = None) -> list[str]:
    """The texts a request's input tokens count."""
    system, user = _texts(row, prompt, schema)
    texts = [user, *([system] if system else [])]
    if schema is not None and schema.mode == "json_schema":
        texts.append(schema.instruction)  # providers count the schema as input too
    return texts


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """One row's request, in tokens, before it is sent."""

    input: int  # expected
    input_max: int  # at worst
    output_max: int  # max_tokens x n


def estimate(row: ManifestRow, parts: Sequence[ImagePart], request: RequestConfig, prompt: PromptConfig,
             schema: OutputSchema | None = None) -> TokenEstimate:
    texts = input_texts(row, prompt, schema)
    sizes = [part.size for part in parts]
    return TokenEstimate(
        input=input_tokens(request.model, texts, sizes, prompt.detail),
        input_max=input_tokens(request.model, texts, sizes, prompt.detail, worst=True),
        output_max=(request.max_tokens or UNSET_MAX_TOKENS) * request.choices,
    )


def follow_up(body: dict[str, Any], tokens: TokenEstimate, messages: Sequence[dict[str, str]],
              model: str) -> tuple[dict[str, Any], TokenEstimate]:
    """The conversation so far with `messages` added, and what the longer request costs."""
    texts = [m["content"] for m in messages]
    more = replace(tokens, input=tokens.input + input_tokens(model, texts, [], "auto"),
                   input_max=tokens.input_max + input_tokens(model, texts, [], "auto", worst=True))
    return {**body, "messages": [*body["messages"], *messages]}, more


@dataclass(frozen=True, slots=True)
class Prepared:
    """One row's request, ready to send: the body, what it may cost in tokens, and what was
    done to its images on the way (the row's image_notes)."""

    body: dict[str, Any]
    tokens: TokenEstimate
    image_notes: str | None = None


def prepare(row: ManifestRow, root: Path, request: RequestConfig, prompt: PromptConfig,
            schema: OutputSchema | None = None, fetched: Mapping[str, bytes] | None = None) -> Prepared:
    """Read, convert, fit and encode the row's images (remote ones from `fetched`, where they
    were fetched) and build its request; CPU-bound, so both engines run it off the event loop.
    Raises RowInputError for an image that cannot be sent."""
    parts = to_parts(row.images, root, prompt, fetched)
    return Prepared(build(row, parts, request, prompt, schema), estimate(row, parts, request, prompt, schema),
                    notes_text(parts))
