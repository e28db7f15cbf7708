"""What reaches the wire: every request parameter, with its type, only when set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import cli
from pipeline.simulator import Simulator

from ..conftest import body_of, write_config, write_manifest

OPTIONAL = ("temperature", "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "user",
            "stream", "stream_options")


def sent_body(sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], **sections: Any) -> dict[str, Any]:
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p} for p in images(1)]), **sections)
    assert cli.main(["run", str(cfg), "-q"]) == 0
    (entry,) = sim.log
    assert entry.body is not None
    return entry.body


def test_unset_parameters_never_reach_the_wire(sim: Simulator, tmp_path: Path,
                                              images: Callable[..., list[str]]) -> None:
    body = sent_body(sim, tmp_path, images)
    assert set(body) == {"model", "messages", "max_tokens"}
    assert body["messages"][0]["content"][1]["image_url"]["detail"] == "auto"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("temperature", 0.7),
        ("top_p", 0.9),
        ("n", 2),
        ("stop", "END"),
        ("stop", ["END", "STOP"]),
        ("presence_penalty", -1.5),
        ("frequency_penalty", 1.25),
        ("logit_bias", {"50256": -100}),
        ("user", "team-vision"),
        ("stream", True),
        ("max_tokens", 17),
    ],
)
def test_each_parameter_reaches_the_wire_with_its_type(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], key: str, value: object
) -> None:
    body = sent_body(sim, tmp_path, images, request={"model": "gpt-4o", "max_tokens": 50, key: value})
    assert body[key] == value and type(body[key]) is type(value)


def test_system_prompt_detail_and_extra_fields(sim: Simulator, tmp_path: Path,
                                              images: Callable[..., list[str]]) -> None:
    body = sent_body(
        sim, tmp_path, images,
        prompt={"system": "Be brief.", "user": "Caption it.", "detail": "low"},
        request={"model": "gpt-4o-mini", "max_tokens": 20, "extra": {"seed": 7, "metadata": {"job": "a"}}},
    )
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"][0] == {"type": "text", "text": "Caption it."}
    assert user["content"][1]["image_url"]["detail"] == "low"
    assert body["seed"] == 7 and body["metadata"] == {"job": "a"} and body["model"] == "gpt-4o-mini"
    assert not set(OPTIONAL) & set(body)


def test_http_urls_are_sent_as_is_with_remote_pass(sim: Simulator, tmp_path: Path) -> None:
    url = "https://example.com/cat.jpg"  # never fetched: the simulator describes it unseen
    cfg = write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": url}]), input={"remote": "pass"})
    assert cli.main(["run", str(cfg), "-q"]) == 0
    assert body_of(sim.log[0])["messages"][0]["content"][1]["image_url"]["url"] == url


@pytest.mark.parametrize("model", ["o4-mini", "o3-2025-04-16", "gpt-5-mini", "openai/gpt-5"])
def test_a_reasoning_model_gets_max_completion_tokens_and_no_max_tokens(
        sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], model: str) -> None:
    # the simulator answers 400 to max_tokens for these models, as OpenAI does: the run would fail
    body = sent_body(sim, tmp_path, images, request={"model": model, "max_tokens": 40})
    assert body["max_completion_tokens"] == 40 and "max_tokens" not in body


def test_token_param_names_the_key_for_a_deployment_whose_name_hides_its_family(
        sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]) -> None:
    body = sent_body(sim, tmp_path, images,
                     request={"model": "captioner-prod", "max_tokens": 40, "token_param": "max_completion_tokens"})
    assert body["max_completion_tokens"] == 40 and "max_tokens" not in body
