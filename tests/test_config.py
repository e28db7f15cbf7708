"""Bad configs exit 2 with one line naming the problem, before anything is sent."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import pipeline.engines
from pipeline import cli, config
from pipeline.errors import ConfigError
from pipeline.simulator import Simulator

from .conftest import write_config, write_manifest


@pytest.fixture
def good(sim: Simulator, tmp_path: Path, images: Callable[..., list[str]]) -> Path:
    return write_config(tmp_path, sim.url, write_manifest(tmp_path, [{"image": p, "label": "x"} for p in images(2)]))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "request.temperature=5"], "request.temperature: Input should be less than or equal to 2"),
        (["--set", "request.tempreature=0.5"], "request.tempreature: unknown key"),
        (["--set", "limits.concurrency=0"], "limits.concurrency"),
        (["--set", "request.n=0"], "request.n"),
        (["--set", "request.presence_penalty=-3"], "request.presence_penalty"),
        (["--set", "request.logit_bias={50256: -200}"], "request.logit_bias"),
        (["--set", "prompt.detail=medium"], "prompt.detail"),
        (["--set", "input.image_column=picture"], "input.image_column: column 'picture' is not in"),
        (["--set", "input.keep_columns=[nope]"], "input.keep_columns: column 'nope' is not in"),
        (["--set", "prompt.user=Is it a {species}?"], "prompt.user: column 'species' is not in"),
        (["--set", "endpoint.api_key_env=ANNOTATE_UNSET_VARIABLE"], "ANNOTATE_UNSET_VARIABLE is unset or empty"),
        (["--set", "limits.max_cost_usd=-1"], "limits.max_cost_usd"),
        (["--set", "limits.max_cost_usd=1", "--set", "request.model=my-own-model"],
         "limits.max_cost_usd: no price is known for my-own-model"),
        (["--set", "request"], "expected key.path=value"),
        (["--set", "request.extra={max_tokens: 9999}"], "request.extra: Value error, 'max_tokens' has its own key"),
        (["--set", "request.extra={messages: []}"], "request.extra: Value error, 'messages' is built by the pipeline"),
        (["--set", "limits.max_cost_usd=1", "--set", "request.max_tokens=null"],
         "limits.max_cost_usd: a budget needs request.max_tokens"),
        (["--set", "output_schema={label: 'enum[]'}"], "output_schema.label: an enum needs at least one value"),
        (["--set", "output_schema={box: {x: integer}}"], "output_schema.box.x: unknown type 'integer'"),
        (["--set", "output_schema={type: object, properties: {a: {type: [string, integer]}}}"],
         "output_schema.a: no single column type"),
        (["--set", "output_schema={status: str}"], "output_schema.status: the name is an output column"),
        (["--set", "output_schema={label: bool}", "--set", "input.keep_columns=[label]"], "output_schema.label: the name is a kept manifest column"),
        (["--set", "request.structured=json_object"], "request.structured: json_object needs an output_schema"),
        (["--set", "request.structured=xml", "--set", "output_schema={a: int}"], "request.structured"),
        (["--set", "output_schema={a: int}", "--set", "request.extra={response_format: {type: text}}"],
         "request.extra.response_format: output_schema builds it"),
        (["--set", "engine=spark"], "engine: Input should be 'local', 'ray' or 'batch'"),
        (["--set", "endpoints=[{base_url: 'http://127.0.0.1:9/v1'}]"], "endpoint, endpoints: set one of them"),
        (["--set", "endpoints=[{requests_per_minute: 0}]"], "endpoints.0.requests_per_minute"),
        (["--set", "ray.http_actors=0"], "ray.http_actors"),
        (["--set", "request.model=o4-mini", "--set", "request.temperature=0.2"],
         "request.temperature: o4-mini is a reasoning model, which takes only temperature 1 (got 0.2)"),
        (["--set", "request.model=gpt-5-mini", "--set", "request.top_p=0.5"],
         "request.top_p: gpt-5-mini is a reasoning model"),
        (["--set", "request.token_param=max_output_tokens"], "request.token_param: Input should be 'auto'"),
        (["--set", "request.extra={max_completion_tokens: 9}"],
         "request.extra: Value error, 'max_completion_tokens' is built by the pipeline"),
    ],
)
def test_bad_config_exits_2_with_one_line_and_sends_nothing(
    good: Path, sim: Simulator, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert cli.main(["run", str(good), "-q", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert sim.log == []


def test_engine_ray_without_ray_installed_exits_2_naming_the_extra(
    good: Path, sim: Simulator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the ray extra has
    monkeypatch.delitem(sys.modules, "pipeline.engines.ray", raising=False)  # imported afresh, then ...
    monkeypatch.delattr(pipeline.engines, "ray", raising=False)  # ... not found on the package already
    assert cli.main(["run", str(good), "-q", "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert "engine: ray needs Ray" in err and "pip install 'annotate-pipeline[ray]'" in err and err.count("\n") == 1
    assert sim.log == []


def test_missing_column_lists_the_columns_that_exist(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["run", str(good), "--set", "input.image_column=picture"])
    assert "(columns: image, label)" in capsys.readouterr().err


def test_empty_key_variable_is_refused(good: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANNOTATE_TEST_KEY", "  ")
    assert cli.main(["run", str(good), "-q"]) == 2
    assert sim.log == []


def test_broken_yaml_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("input:\n  manifest: [unclosed\nrequest: {model: gpt-4o}\n")
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML at line" in err and err.count("\n") == 1


def test_duplicate_ids_are_refused(sim: Simulator, tmp_path: Path, images: Callable[..., list[str]],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    paths = images(3)
    manifest = write_manifest(tmp_path, [{"image": p, "uid": i % 2} for i, p in enumerate(paths)])
    cfg = write_config(tmp_path, sim.url, manifest, input={"id_column": "uid"})
    assert cli.main(["run", str(cfg)]) == 2
    assert "duplicate ids" in capsys.readouterr().err and sim.log == []


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("request.temperature=0.2", "temperature", 0.2),
        ("request.stream=true", "stream", True),
        ("request.stop=[END, STOP]", "stop", ["END", "STOP"]),
        ("request.stop=END", "stop", "END"),
        ('request.logit_bias={"50256": -100}', "logit_bias", {"50256": -100}),
        ("request.logit_bias={50256: -100}", "logit_bias", {"50256": -100}),
    ],
)
def test_set_values_are_read_as_yaml(override: str, key: str, value: object) -> None:
    cfg = config.parse({"input": {"manifest": "m.csv"}, "request": {"model": "gpt-4o"}}, [override])
    assert getattr(cfg.request, key) == value


def test_set_through_a_scalar_is_an_error() -> None:
    with pytest.raises(ConfigError, match="request.model is not a mapping"):
        config.parse({"input": {"manifest": "m.csv"}, "request": {"model": "gpt-4o"}}, ["request.model.x=1"])


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_is_valid(path: Path) -> None:
    config.load(path)


def test_the_readme_config_is_valid() -> None:
    import re

    import yaml

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(input:.*?)```", readme, re.S)
    assert block is not None
    config.parse(yaml.safe_load(block.group(1)))


def test_a_broken_line_in_a_jsonl_manifest_exits_2_and_sends_nothing(
    sim: Simulator, tmp_path: Path, images: Callable[..., list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"image": "{p}"}}\n' for p in images(3)) + "{broken\n")
    cfg = write_config(tmp_path, sim.url, manifest)
    assert cli.main(["run", str(cfg), "-q"]) == 2
    assert "input.manifest: cannot read" in capsys.readouterr().err and sim.log == []
