"""The chat-completions request body for one row. Pure: same inputs, same body."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import PromptConfig, RequestConfig
from .images import ImagePart
from .manifest import ManifestRow
from .tokens import input_tokens

__all__ = ["build", "estimate", "TokenEstimate", "UNSET_MAX_TOKENS"]

# Without max_tokens a provider may answer at length; limits reserve this many per choice.
UNSET_MAX_TOKENS = 1024


def build(row: ManifestRow, parts: Sequence[ImagePart], request: RequestConfig, prompt: PromptConfig) -> dict[str, Any]:
    user = [{"type": "text", "text": row.prompt}, *(part.content(prompt.detail) for part in parts)]
    system = [{"role": "system", "content": prompt.system}] if prompt.system else []
    body: dict[str, Any] = {"model": request.model, "messages": [*system, {"role": "user", "content": user}]}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    body |= request.set_fields()
    if request.stream:
        body["stream_options"] = {"include_usage": True}  # else a streamed answer has no usage
    return body | request.extra


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """One row's request, in tokens, before it is sent."""

    input: int  # expected
    input_max: int  # at worst
    output_max: int  # max_tokens x n


def estimate(row: ManifestRow, parts: Sequence[ImagePart], request: RequestConfig,
             prompt: PromptConfig) -> TokenEstimate:
    texts = [row.prompt, *([prompt.system] if prompt.system else [])]
    sizes = [part.size for part in parts]
    return TokenEstimate(
        input=input_tokens(request.model, texts, sizes, prompt.detail),
        input_max=input_tokens(request.model, texts, sizes, prompt.detail, worst=True),
        output_max=(request.max_tokens or UNSET_MAX_TOKENS) * request.choices,
    )
