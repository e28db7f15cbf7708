"""`annotate estimate`: before anything is sent, close to what the run then records."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import cli
from pipeline.simulator import Simulator

from .conftest import image_bytes, write_config, write_manifest


def estimate(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert cli.main(["estimate", *args, "--json"]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


@pytest.fixture
def mixed(tmp_path: Path, images: Callable[..., list[str]]) -> Path:
    """Images of several sizes and formats, some larger than max_side, with a templated prompt."""
    paths = images(6, size=(1600, 900)) + images(6, size=(300, 200), fmt="JPEG")
    rows = [{"image": p, "subject": f"a thing called {i} " * (i % 3 + 1)} for i, p in enumerate(paths)]
    return write_manifest(tmp_path, rows)


@pytest.mark.parametrize("detail", ["auto", "low", "high"])
def test_expected_input_is_within_5_percent_of_the_run_and_its_cost_within_the_range(
    sim: Simulator, tmp_path: Path, mixed: Path, capsys: pytest.CaptureFixture[str], detail: str
) -> None:
    cfg = write_config(tmp_path, sim.url, mixed, prompt={"user": "Describe {subject}.", "system": "Be brief.",
                                                          "detail": detail, "max_side": 1024})
    guess = estimate([str(cfg)], capsys)
    assert sim.log == []  # an estimate sends nothing

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert guess["rows"] == guess["images"] == out.height == 12
    assert guess["input_tokens"]["total"] == pytest.approx(out["prompt_tokens"].sum(), rel=0.05)
    assert guess["cost_usd"]["low"] <= out["cost_usd"].sum() <= guess["cost_usd"]["high"]
    assert guess["output_tokens"]["max"] == 12 * 50
    assert guess["detail_auto_as_high"] is (detail == "auto")


def test_sample_answers_n_rows_for_real_and_a_run_does_not_pay_for_them_again(
    sim: Simulator, tmp_path: Path, mixed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, sim.url, mixed, prompt={"user": "Describe {subject}."})
    guess = estimate([str(cfg), "--sample", "3"], capsys)

    assert guess["sampled_rows"] == 3 and len(sim.log) == 3
    sampled = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert guess["output_tokens"]["expected"] == round(sampled["completion_tokens"].mean() * 12)
    assert cli.main(["run", str(cfg), "-q"]) == 0
    assert len(sim.log) == 12


def test_unknown_price_gives_null_costs_and_unreadable_images_are_counted_apart(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ok.png").write_bytes(image_bytes())
    manifest = write_manifest(tmp_path, [{"image": "ok.png"}, {"image": "missing.png"},
                                         {"image": "https://example.com/a.jpg"}])
    cfg = write_config(tmp_path, sim.url, manifest, request={"model": "my-own-model", "max_tokens": 10})
    guess = estimate([str(cfg)], capsys)
    assert guess["cost_usd"] == {"low": None, "expected": None, "high": None}
    assert (guess["rows"], guess["unreadable_rows"]) == (2, 1)
    assert guess["input_tokens"]["max"] > guess["input_tokens"]["total"]  # the URL's size is unknown
