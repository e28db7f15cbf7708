"""What either engine must do alike, on the local engine (the Ray runs are in test_ray.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cases


def test_two_endpoints_each_stay_under_their_own_limit(serve: Any, tmp_path: Path,
                                                      images: Callable[..., list[str]]) -> None:
    cases.two_endpoints_each_stay_under_their_own_limit("local", serve, tmp_path, images)


def test_the_limit_the_provider_states_lowers_ours(faulty_sim: Callable[..., Any], tmp_path: Path,
                                                   images: Callable[..., list[str]]) -> None:
    cases.the_limit_the_provider_states_lowers_ours("local", faulty_sim, tmp_path, images)
