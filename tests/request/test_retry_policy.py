"""Retry-After parsing, the retry policy with an injected sleep, and reading the API key."""

from __future__ import annotations

import asyncio
import email.utils
from datetime import datetime, timedelta, timezone
from unittest.mock import AsyncMock, call

import httpx
import pytest

from pipeline.client import SIMULATOR_KEY, _retry_after, read_key, retry_policy
from pipeline.config import EndpointConfig
from pipeline.errors import ConfigError, Rejected, Retryable


def http_date(seconds_from_now: float) -> str:
    return email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the finer one wins
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": "0.75"}, 0.75),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),  # a bad ms header falls back
    ],
)
def test_retry_after_seconds(headers: dict[str, str], seconds: float) -> None:
    assert _retry_after(httpx.Headers(headers)) == pytest.approx(seconds)


def test_retry_after_http_date() -> None:
    # HTTP dates have whole seconds, so up to one second is lost in formatting
    assert _retry_after(httpx.Headers({"Retry-After": http_date(5)})) == pytest.approx(4.5, abs=0.6)


def test_retry_after_date_in_the_past_is_zero() -> None:
    assert _retry_after(httpx.Headers({"Retry-After": http_date(-60)})) == 0.0


@pytest.mark.parametrize("headers", [{}, {"retry-after": ""}, {"retry-after-ms": "x"}, {"content-type": "text/plain"}])
def test_retry_after_absent_is_none(headers: dict[str, str]) -> None:
    assert _retry_after(httpx.Headers(headers)) is None


@pytest.mark.parametrize("value", ["soon", "in a bit", "Thu, 99 Foo 2025"])
def test_retry_after_garbage_is_none(value: str) -> None:
    assert _retry_after(httpx.Headers({"Retry-After": value})) is None


def test_retry_after_names_its_wait_and_succeeds_on_attempt_three() -> None:
    sleep = AsyncMock()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise Retryable("429 slow down", status=429, retry_after_s=3.0)
        return "answer"

    assert asyncio.run(retry_policy(max_attempts=5, sleep=sleep)(flaky)) == "answer"
    assert calls == 3
    assert sleep.await_args_list == [call(3.0), call(3.0)]


def test_rejected_is_never_retried() -> None:
    sleep = AsyncMock()
    fn = AsyncMock(side_effect=Rejected("400 bad image", status=400))
    with pytest.raises(Rejected, match="400 bad image"):
        asyncio.run(retry_policy(max_attempts=5, sleep=sleep)(fn))
    assert fn.await_count == 1
    sleep.assert_not_awaited()


def test_other_errors_are_not_retried() -> None:
    sleep = AsyncMock()
    fn = AsyncMock(side_effect=KeyError("bug"))
    with pytest.raises(KeyError):
        asyncio.run(retry_policy(max_attempts=5, sleep=sleep)(fn))
    assert fn.await_count == 1
    sleep.assert_not_awaited()


def test_the_last_retryable_itself_is_raised_after_max_attempts() -> None:
    sleep = AsyncMock()
    raised: list[Retryable] = []

    async def always_busy() -> None:
        raised.append(Retryable(f"503 busy #{len(raised) + 1}", status=503, retry_after_s=0.5))
        raise raised[-1]

    with pytest.raises(Retryable) as info:
        asyncio.run(retry_policy(max_attempts=4, sleep=sleep)(always_busy))
    assert type(info.value) is Retryable  # not tenacity.RetryError
    assert info.value is raised[-1]
    assert str(info.value) == "503 busy #4"
    assert sleep.await_args_list == [call(0.5)] * 3


def test_retryable_without_retry_after_backs_off_within_bounds() -> None:
    sleep = AsyncMock()
    fn = AsyncMock(side_effect=[Retryable("timeout"), Retryable("timeout"), Retryable("timeout"), "ok"])
    assert asyncio.run(retry_policy(max_attempts=4, sleep=sleep)(fn)) == "ok"
    waits = [c.args[0] for c in sleep.await_args_list]
    assert len(waits) == 3
    # random exponential, multiplier 0.5: attempt n waits at most 0.5 * 2**n
    assert all(0 <= w <= 0.5 * 2**n for n, w in enumerate(waits, start=1))


def test_read_key_strips_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_PROVIDER_KEY", "  sk-abc123 \n")
    assert read_key(EndpointConfig(api_key_env="MY_PROVIDER_KEY")) == "sk-abc123"


@pytest.mark.parametrize("value", [None, "", "   \t"])
def test_read_key_unset_or_blank_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("MY_PROVIDER_KEY", raising=False)
    else:
        monkeypatch.setenv("MY_PROVIDER_KEY", value)
    with pytest.raises(ConfigError, match=r"endpoint.api_key_env: the variable MY_PROVIDER_KEY is unset or empty"):
        read_key(EndpointConfig(api_key_env="MY_PROVIDER_KEY"))


def test_the_simulator_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MY_PROVIDER_KEY", raising=False)
    endpoint = EndpointConfig(api_key_env="MY_PROVIDER_KEY", simulator={})
    assert read_key(endpoint) == SIMULATOR_KEY
    monkeypatch.setenv("MY_PROVIDER_KEY", "real-key")
    assert read_key(endpoint) == "real-key"  # a set variable wins over the placeholder


def test_a_huge_retry_after_is_capped() -> None:
    from pipeline.client import MAX_RETRY_AFTER_S

    assert _retry_after(httpx.Headers({"Retry-After": "86400"})) == MAX_RETRY_AFTER_S


def test_the_proxy_comes_from_the_environment_once_and_no_proxy_spares_loopback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.client import proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert proxy_for("https://api.openai.com/v1/chat/completions") == "http://proxy.invalid:3128"
    assert proxy_for("http://127.0.0.1:8000/v1/chat/completions") is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("https_proxy", raising=False)
    assert proxy_for("https://api.openai.com/v1/chat/completions") is None
