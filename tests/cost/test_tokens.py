"""Image and request token counts against the worked examples of PROVIDER_FACTS 1.5 and 1.6."""

from __future__ import annotations

import pytest

from pipeline.cost.tokens import image_tokens, input_tokens, text_tokens

# (model, base = low, high for a 4-tile image such as 1024x1024 or 4000x3000, high for 128x64 = 1 tile)
TILE_MODELS = [
    ("gpt-4o", 85, 765, 255),
    ("gpt-4o-mini", 2833, 25_501, 8_500),
    ("gpt-5", 70, 630, 210),
    ("o3", 75, 675, 225),
]


@pytest.mark.parametrize(("model", "low", "four_tiles", "one_tile"), TILE_MODELS)
def test_tile_rule_worked_examples(model: str, low: int, four_tiles: int, one_tile: int) -> None:
    assert image_tokens(model, 1024, 1024, "high") == four_tiles  # 768x768 -> 2x2 tiles
    assert image_tokens(model, 4000, 3000, "high") == four_tiles  # 2048x1536 -> 1024x768 -> 2x2
    assert image_tokens(model, 128, 64, "high") == one_tile  # small images are not upscaled
    for size in ((1024, 1024), (4000, 3000), (128, 64)):
        assert image_tokens(model, *size, "low") == low


def test_tile_rule_auto_is_budgeted_as_high() -> None:
    assert image_tokens("gpt-4o", 1024, 1024) == image_tokens("gpt-4o", 1024, 1024, "auto") == 765


def test_tile_rule_counts_tiles_of_a_wide_image() -> None:
    # 2048x768 already fits and its short side is 768: ceil(2048/512) * ceil(768/512) = 4 * 2 tiles
    assert image_tokens("gpt-4o", 2048, 768, "high") == 85 + 170 * 8


@pytest.mark.parametrize(
    ("model", "at_1024", "at_4000x3000"),
    [
        ("gpt-4.1-mini", 1659, 2353),  # 1024 * 1.62 = 1658.88; 1452 * 1.62 = 2352.24
        ("gpt-5-mini", 1659, 2353),
        ("gpt-4.1-nano", 2520, 3572),  # 1024 * 2.46 = 2519.04; 1452 * 2.46 = 3571.92
        ("gpt-5-nano", 2520, 3572),
        ("o4-mini", 1762, 2498),  # 1024 * 1.72 = 1761.28; 1452 * 1.72 = 2497.44
    ],
)
def test_patch_rule_worked_examples(model: str, at_1024: int, at_4000x3000: int) -> None:
    assert image_tokens(model, 1024, 1024, "high") == at_1024  # 32x32 = 1024 patches
    assert image_tokens(model, 4000, 3000, "high") == at_4000x3000  # shrunk to 1408x1056 = 44x33 = 1452
    assert image_tokens(model, 4000, 3000, "low") == at_4000x3000  # detail does not matter here


def test_patch_rule_does_not_round_an_exact_product_up() -> None:
    # 480x320 = 15 x 10 = 150 patches, below the 1536 cap; 150 * 1.62 = 243 exactly
    assert image_tokens("gpt-4.1-mini", 480, 320, "high") == 243


def test_claude_unresized_image_is_pixels_over_750() -> None:
    assert image_tokens("claude-sonnet-4", 1024, 1024) == 1399  # 1,048,576 / 750 = 1398.1, rounded up


def test_claude_long_edge_is_capped_at_1568() -> None:
    # 3136x500: long edge halves to 1568x250 (0.39 MP, under every other limit)
    assert image_tokens("claude-3-5-sonnet", 3136, 500) == 523  # 392,000 / 750 = 522.7


def test_claude_large_images_match_provider_facts() -> None:
    assert image_tokens("claude-sonnet-4", 4000, 3000) == pytest.approx(1608, rel=0.01)
    assert image_tokens("claude-sonnet-4", 1092, 1092) == pytest.approx(1092 * 1092 / 750, rel=0.01)


def test_gemini_small_image_is_one_tile_of_258() -> None:
    assert image_tokens("gemini-2.5-flash", 384, 384) == 258
    assert image_tokens("gemini-2.0-flash", 100, 50) == 258


@pytest.mark.parametrize(
    ("size", "tiles"),
    [
        ((960, 540), 6),  # crop = floor(540 / 1.5) = 360 -> 3 x 2 (the doc's example)
        ((1024, 1024), 4),  # crop 682 -> 2 x 2
        ((4000, 3000), 4),  # crop 2000 -> 2 x 2
        ((385, 200), 6),  # one side over 384: crop 133 -> 3 x 2
    ],
)
def test_gemini_tiles_follow_the_rough_formula(size: tuple[int, int], tiles: int) -> None:
    assert image_tokens("gemini-2.5-pro", *size) == 258 * tiles


def test_provider_prefixed_names_use_the_model_after_the_slash() -> None:
    assert image_tokens("openai/gpt-4o", 1024, 1024, "high") == 765
    assert image_tokens("openai/gpt-4o-mini", 1024, 1024, "high") == 25_501
    assert image_tokens("openrouter/openai/gpt-4.1-mini", 1024, 1024, "high") == 1659
    assert image_tokens("OpenAI/GPT-4o", 1024, 1024, "high") == 765


def test_longest_prefix_wins() -> None:
    assert image_tokens("gpt-4o-mini-2024-07-18", 1024, 1024, "low") == 2833  # not gpt-4o's 85
    assert image_tokens("gpt-4o-2024-08-06", 1024, 1024, "low") == 85
    assert image_tokens("gpt-4.1-mini", 1024, 1024, "high") == 1659  # patch rule, not gpt-4.1 tiles
    assert image_tokens("gpt-4.1", 1024, 1024, "high") == 765
    assert image_tokens("gpt-5-nano", 1024, 1024, "high") == 2520
    assert image_tokens("gpt-5", 1024, 1024, "high") == 630


def test_unknown_model_falls_back_to_gpt_4o() -> None:
    assert image_tokens("some-local-llava", 1024, 1024, "high") == 765


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 5)])
def test_non_positive_sizes_are_refused(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        image_tokens("gpt-4o", *size)


def test_text_tokens_is_four_characters_a_token() -> None:
    assert text_tokens("") == 0
    assert text_tokens("abcd") == 1
    assert text_tokens("abcde") == 2


def test_input_tokens_adds_text_framing_and_images() -> None:
    # "Describe this image." is 20 chars -> 5 tokens, + 4 framing; "sys" -> 1 + 4
    total = input_tokens("gpt-4o", ["Describe this image.", "sys"], [(1024, 1024), (128, 64)], "high")
    assert total == (5 + 4) + (1 + 4) + 765 + 255


def test_input_tokens_unknown_size_is_expected_as_1024_square() -> None:
    assert input_tokens("gpt-4o-mini", [], [None], "low") == 2833
    assert input_tokens("gpt-4o", [], [None], "auto") == 765
    assert input_tokens("gpt-4o", ["abcd"], [], "high") == 1 + 4


def test_worst_case_counts_a_token_per_byte_and_the_costliest_image_shape() -> None:
    assert input_tokens("gpt-4o", ["héllo"], [], "high", worst=True) == 6 + 4
    assert input_tokens("gpt-4o", [], [None], "high", worst=True) == 85 + 170 * 8  # 2048x768: 4 x 2 tiles
    assert input_tokens("gpt-4o", [], [(64, 64)], "high", worst=True) == 85 + 170  # a known size is exact
