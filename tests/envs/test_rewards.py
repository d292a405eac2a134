"""Rewards: format (all / partial, tag spam), perception (exact / cells / off), weights, and hostile responses."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import envs
from envs.rewards import MAX_SCORE_CHARS, RewardConfig, format_reward, perception_reward


@pytest.fixture
def game():
    g = envs.make("2048", seed=0)
    g.set_board([[2, 2, 0, 0], [0, 0, 0, 0], [0, 4, 0, 0], [0, 0, 0, 8]])
    return g


TRUTH = "2|2|-|-\n-|-|-|-\n-|4|-|-\n-|-|-|8"


def _response(perception: str = TRUTH, answer: str = "left") -> str:
    return f"<perception>\n{perception}\n</perception><think>merge the 2s</think><answer>{answer}</answer>"


@pytest.mark.parametrize(
    ("text", "all_", "partial", "tags"),
    [
        ("<perception>a</perception><think>b</think><answer>c</answer>", 1.0, 1.0, 1.0),
        ("<think>b</think><answer>c</answer>", 0.0, 2 / 3, 4 / 6),
        ("<answer>c</answer>", 0.0, 1 / 3, 2 / 6),
        ("no tags at all", 0.0, 0.0, 0.0),
        ("<think>b</think><perception>a</perception><answer>c</answer>", 0.0, 2 / 3, 1.0),  # out of order
        ("<perception>a<think>b</perception></think><answer>c</answer>", 0.0, 2 / 3, 1.0),  # overlapping pairs
        ("</answer>c<answer>", 0.0, 0.0, 1 / 6),  # closed before opened: only the opening tag counts
        ("<perception>a</perception><think>b</think><answer>c</answer><answer>d</answer>", 0.0, 2 / 3, 4 / 6),
        ("x <think> y", 0.0, 0.0, 1 / 6),  # a lone tag: the first step a random model can take
        ("</think></think><think>", 0.0, 0.0, 1 / 6),  # a repeated tag earns nothing
    ],
)
def test_format_modes(text, all_, partial, tags):
    assert format_reward(text, "all") == all_
    assert format_reward(text, "partial") == pytest.approx(partial)
    assert format_reward(text, "tags") == pytest.approx(tags)


def test_tag_spam_earns_nothing():
    spam = "</think><think><answer>" * 50 + "<perception></perception>" * 3
    assert format_reward(spam, "partial") == 0.0
    assert format_reward(spam, "all") == 0.0


def test_perception_exact(game):
    assert perception_reward(_response(), TRUTH, "exact") == 1.0
    assert perception_reward(_response("  \n" + TRUTH + "\n\n"), TRUTH, "exact") == 1.0  # whitespace at the ends
    assert perception_reward(_response(TRUTH.replace("8", "16")), TRUTH, "exact") == 0.0
    assert perception_reward(f"<think>{TRUTH}</think>", TRUTH, "exact") == 0.0  # outside the block
    assert perception_reward(_response(), TRUTH, "off") == 0.0


def test_perception_cells_counts_cells_position_by_position():
    assert perception_reward(_response(), TRUTH, "cells") == 1.0
    wrong_two = TRUTH.replace("8", "16").replace("4", "2")
    assert perception_reward(_response(wrong_two), TRUTH, "cells") == pytest.approx(14 / 16)
    half = "2|2|-|-\n-|-|-|-"
    assert perception_reward(_response(half), TRUTH, "cells") == pytest.approx(8 / 16)
    spaced = "2 | 2 | - | -\n\n-|-|-|-\n-|4|-|-\n-|-|-|8|extra"
    assert perception_reward(_response(spaced), TRUTH, "cells") == 1.0  # blank lines, spaces, extra cells ignored
    assert perception_reward("<perception>unclosed " + TRUTH, TRUTH, "cells") == 0.0


def test_score_breakdown_and_weights(game):
    before = game.text_observation()
    reward = envs.score(game, _response())
    assert reward == envs.Reward(game=1.0, format=1.0, perception=1.0, total=3.0, valid_action=True)
    assert game.text_observation() == before  # scored on a clone
    weighted = RewardConfig(
        format_mode="partial", perception_mode="cells", game_weight=2.0, format_weight=0.5, perception_weight=0.0
    )
    reward = envs.score(game, "<answer>up</answer>", weighted)  # up merges nothing here
    assert (reward.game, reward.format, reward.total) == (-1.0, pytest.approx(1 / 3), pytest.approx(-2 + 1 / 6))


def test_no_action_gets_the_invalid_penalty(game):
    reward = envs.score(game, _response(answer="jump"))
    assert reward.game == game.invalid_penalty and not reward.valid_action
    assert reward.format == 1.0 and reward.perception == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "",
        "<answer>",
        "</answer></answer><answer><answer>",
        "<perception>" * 10_000,
        "\x00\uffff<answer>\u202eleft</answer>",
        "<answer>" + "9" * 5000 + "</answer>",
        None,
        b"<answer>left</answer>",
        12,
    ],
)
def test_malformed_responses_never_raise(game, response):
    reward = envs.score(game, response, RewardConfig(format_mode="partial", perception_mode="cells"))
    assert reward.total == reward.game + reward.format + reward.perception


def test_huge_responses_are_fast(game):
    huge = (
        "<perception>" + "2|2|-|-\n" * 10 + "</perception><think>" + "x" * 3_000_000 + "</think><answer>left</answer>"
    )
    for config in (RewardConfig(), RewardConfig(format_mode="partial", perception_mode="cells")):
        start = time.perf_counter()
        reward = envs.score(game, huge, config)
        assert time.perf_counter() - start < 0.5
        assert reward.valid_action and reward.format < 1.0  # the head was cut: only the last MAX_SCORE_CHARS count
    assert MAX_SCORE_CHARS < len(huge)


@given(st.text(max_size=300))
def test_arbitrary_text_never_raises(text):
    game = envs.make("2048", seed=0)
    for mode in ("exact", "cells"):
        reward = envs.score(game, text, RewardConfig(format_mode="partial", perception_mode=mode))
        assert 0.0 <= reward.format <= 1.0 and 0.0 <= reward.perception <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"format_mode": "loose"}, "format_mode"),
        ({"perception_mode": "fuzzy"}, "perception_mode"),
        ({"game_weight": "1"}, "game_weight"),
    ],
)
def test_bad_reward_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RewardConfig(**kwargs)
