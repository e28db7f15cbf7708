"""What tokens cost: the bundled price table, config overrides, the cost of one usage record.

Owns: model-name resolution to a priced family and the cost formula. Never: guessing a
price. An unknown model costs None, not a made-up number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import NamedTuple, Protocol

from ..config import Price

__all__ = ["PriceTable"]

# gpt-4o-2024-08-06, claude-sonnet-4-20250514, gemini-2.5-pro-latest -> their family
_VERSION_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")


def _bundled() -> dict[str, Price]:
    raw = json.loads(resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8"))
    fields = set(Price.model_fields)
    return {model: Price(**{k: v for k, v in p.items() if k in fields}) for model, p in raw["models"].items()}


class Usage(Protocol):
    """The token counts of one answer, as a reply's usage reports them."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int | None: ...


class PriceTable:
    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self._prices = _bundled() | dict(overrides or {})
        self._found: dict[str, Price | None] = {}  # asked once or twice per row: resolve each name once

    def find(self, model: str) -> Price | None:
        """The price of a model, of its family when the name carries a date, or None."""
        if model not in self._found:
            name = model.rsplit("/", 1)[-1]  # gateways write 'openai/gpt-4o'
            self._found[model] = (self._prices.get(model) or self._prices.get(name)
                                  or self._prices.get(_VERSION_SUFFIX.sub("", name)))
        return self._found[model]

    def list_usd(self, model: str, input_tokens: float, output_tokens: float, batch: bool = False) -> float | None:
        """Tokens at the list price (the Batch API's when `batch`), none of the input cached: a
        request's worst case, or an estimate's figures."""
        rates = self._rates(model, batch)
        if rates is None:
            return None
        return (input_tokens * rates.input + output_tokens * rates.output) / 1e6

    def cost_usd(self, model: str, usage: Usage, batch: bool = False) -> float | None:
        rates = self._rates(model, batch)
        if rates is None:
            return None
        cached = usage.cached_tokens or 0
        # Some gateways leave thinking tokens out of completion_tokens but in total_tokens.
        output = max(usage.completion_tokens, usage.total_tokens - usage.prompt_tokens)
        return ((usage.prompt_tokens - cached) * rates.input + cached * rates.cached + output * rates.output) / 1e6

    def _rates(self, model: str, batch: bool) -> _Rates | None:
        """A model's rates; for a batch, its batch prices or None when they are not known (a
        cached token then costs what an uncached one does, which never under-reports)."""
        price = self.find(model)
        if price is None:
            return None
        if not batch:
            return _Rates(price.input, price.output, price.input if price.cached_input is None else price.cached_input)
        if price.batch_input is None or price.batch_output is None:
            return None
        cached = price.batch_input if price.batch_cached_input is None else price.batch_cached_input
        return _Rates(price.batch_input, price.batch_output, cached)


class _Rates(NamedTuple):
    input: float
    output: float
    cached: float
