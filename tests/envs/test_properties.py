"""Properties every registered game must have (hypothesis): clones, seeds, action round trips, hostile text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import envs

GAMES = sorted(envs.GAMES)
seeds = st.integers(0, 2**31 - 1)


def _play(game: envs.Game, choices: list[int]) -> list[float]:
    """Steps with the legal action picked by each choice (modulo the legal count); returns the rewards."""
    rewards = []
    for choice in choices:
        legal = game.legal_actions()
        if not legal:
            break
        rewards.append(game.step(legal[choice % len(legal)]).reward)
    return rewards


def _snapshot(game: envs.Game) -> tuple:
    return game.text_observation(), game.score, game.steps, game.terminated, str(game.rng.bit_generator.state)


@pytest.mark.parametrize("name", GAMES)
@given(seed=seeds, before=st.lists(st.integers(0, 999), max_size=8), after=st.lists(st.integers(0, 999), max_size=8))
def test_clone_is_independent(name, seed, before, after):
    game = envs.make(name, seed=seed)
    _play(game, before)
    snapshot = _snapshot(game)
    clone = game.clone()
    _play(clone, after)
    clone.step(None)
    assert _snapshot(game) == snapshot
    # ...and the clone replays the original's future exactly (RNG included).
    assert _play(game.clone(), after) == _play(game, after)


@pytest.mark.parametrize("name", GAMES)
@given(seed=seeds, choices=st.lists(st.integers(0, 999), max_size=10))
def test_same_seed_same_episode(name, seed, choices):
    a, b = envs.make(name, seed=seed), envs.make(name, seed=seed)
    assert _play(a, choices) == _play(b, choices)
    assert _snapshot(a) == _snapshot(b)
    assert np.array_equal(a.render_array(), b.render_array())


@pytest.mark.parametrize("name", GAMES)
@given(seed=seeds, choices=st.lists(st.integers(0, 999), max_size=6))
def test_format_then_parse_gives_back_every_legal_action(name, seed, choices):
    game = envs.make(name, seed=seed)
    _play(game, choices)
    for action in game.legal_actions():
        text = game.format_action(action)
        assert game.parse_action(text) == action
        assert game.parse_action(f"<think>x</think><answer>{text}</answer>") == action


@pytest.mark.parametrize("name", GAMES)
@given(text=st.text(max_size=200))
def test_parse_never_raises(name, text):
    game = envs.make(name, seed=0)
    for candidate in (text, f"<answer>{text}</answer>", f"<answer>{text}", text * 50):
        action = game.parse_action(candidate)
        result = game.clone().step(action)
        assert action is not None or result.reward == game.invalid_penalty


@pytest.mark.parametrize("name", GAMES)
@given(seed=seeds, choices=st.lists(st.integers(0, 999), max_size=6))
def test_observations_follow_the_shared_conventions(name, seed, choices):
    game = envs.make(name, seed=seed, image_size=(336, 448))
    _play(game, choices)
    rows = [line for line in game.text_observation().split("\n") if "|" in line]
    assert len(rows) == game.difficulty["rows"]
    assert all(len(row.split("|")) == game.difficulty["cols"] for row in rows)
    frame = game.render_array()
    assert frame.shape == (448, 336, 3) and frame.dtype == np.uint8
    assert np.array_equal(np.asarray(game.render()), frame)
    assert all(tag in game.prompt for tag in ("<perception>", "<think>", "<answer>"))


@pytest.mark.parametrize("name", GAMES)
def test_illegal_actions_change_nothing(name):
    game = envs.make(name, seed=0)
    snapshot = _snapshot(game)
    for action in (None, "nonsense", (99, 99), -1):
        result = game.step(action)
        assert result.reward == game.invalid_penalty and not result.info.get("valid", False)
    assert _snapshot(game) == snapshot


@pytest.mark.parametrize("name", GAMES)
def test_difficulty_errors_name_the_key(name):
    with pytest.raises(ValueError, match="unknown difficulty key 'colour_count'; allowed keys:"):
        envs.make(name, colour_count=3)
    with pytest.raises(ValueError, match="'image_size'"):
        envs.make(name, image_size=(10, 10))
    with pytest.raises(ValueError, match="'icon_style'.*'glyph', 'texture', 'photo'"):
        envs.make(name, icon_style="emoji")
    with pytest.raises(ValueError, match="allowed games: tetris, 2048, shisen_sho, swap"):
        envs.make("go")


@pytest.mark.parametrize("name", GAMES)
@pytest.mark.parametrize("style", ["texture", "photo"])
def test_perception_styles_render(name, style, photo_dir):
    knobs = {"icon_style": style, "noise": 0.1, "image_size": (336, 448)}
    if style == "photo":
        knobs.update(photo_dir=photo_dir)
        if name in ("swap", "shisen_sho"):
            knobs.update(n_colours=2, n_shapes=2)  # within the 6 photo classes
            if name == "shisen_sho":
                knobs.update(rows=4, cols=4)
    game = envs.make(name, seed=0, **knobs)
    frame = game.render_array()
    assert frame.shape == (448, 336, 3)
    assert not np.array_equal(frame, envs.make(name, seed=0, image_size=(336, 448)).render_array())
