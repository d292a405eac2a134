"""2048 rules on hand-made boards, against the gymnasium-2048 oracle, spawns, game over, parsing and knobs."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium_2048.envs.twenty_forty_eight import TwentyFortyEightEnv

from envs.game_2048 import Game2048, apply_move, slide_line

UP, RIGHT, DOWN, LEFT = range(4)


def _game(board: list[list[int]], **knobs) -> Game2048:
    game = Game2048(seed=0, rows=len(board), cols=len(board[0]), **knobs)
    game.set_board(board)
    return game


@pytest.mark.parametrize(
    ("line", "slid", "gained"),
    [
        ((2, 2, 2, 2), (4, 4, 0, 0), 8),
        ((2, 2, 4, 0), (4, 4, 0, 0), 4),  # the new 4 does not merge again in the same move
        ((0, 2, 0, 2), (4, 0, 0, 0), 4),
        ((4, 4, 8, 8), (8, 16, 0, 0), 24),
        ((2, 4, 8, 16), (2, 4, 8, 16), 0),
        ((0, 0, 0, 2), (2, 0, 0, 0), 0),
        ((2, 2, 2), (4, 2, 0), 4),  # the pair nearest the wall merges first
    ],
)
def test_slide_line(line, slid, gained):
    assert slide_line(line) == (slid, gained)


def test_moves_in_every_direction():
    board = [[2, 0, 0, 2], [0, 4, 4, 0], [2, 0, 0, 0], [2, 8, 0, 8]]
    assert apply_move(board, LEFT) == ([[4, 0, 0, 0], [8, 0, 0, 0], [2, 0, 0, 0], [2, 16, 0, 0]], 28)
    assert apply_move(board, RIGHT) == ([[0, 0, 0, 4], [0, 0, 0, 8], [0, 0, 0, 2], [0, 0, 2, 16]], 28)
    assert apply_move(board, UP) == ([[4, 4, 4, 2], [2, 8, 0, 8], [0, 0, 0, 0], [0, 0, 0, 0]], 4)
    assert apply_move(board, DOWN) == ([[0, 0, 0, 0], [0, 0, 0, 0], [2, 4, 0, 2], [4, 8, 4, 8]], 4)


def test_rules_match_the_gymnasium_2048_oracle():
    """Same board + same move -> same board (before the spawn) and the same merge score, on random boards."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = int(rng.integers(2, 7))
        exponents = rng.integers(0, 6, size=(size, size))
        exponents[rng.random((size, size)) < 0.3] = 0
        values = np.where(exponents > 0, 2**exponents, 0)
        for action in range(4):
            oracle, oracle_score, _ = TwentyFortyEightEnv.apply_action(exponents.astype(np.uint8), action)
            moved, gained = apply_move(values.tolist(), action)
            assert moved == np.where(oracle > 0, 2 ** oracle.astype(np.int64), 0).tolist()
            assert gained == oracle_score


def test_step_rewards_merges_and_spawns_one_tile():
    game = _game([[2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 4]])
    result = game.step(LEFT)
    assert result.reward == 1.0 and result.info["merged"] and game.score == 4
    after = np.array(game.board)
    expected = np.array([[4, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [4, 0, 0, 0]])
    spawned = after - expected
    assert (spawned != 0).sum() == 1 and spawned.max() in (2, 4) and (expected[spawned != 0] == 0).all()


def test_move_without_merge_scores_minus_one():
    game = _game([[2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    result = game.step(RIGHT)
    assert result.reward == -1.0 and result.info["valid"] and not result.info["merged"] and game.score == 0


def test_useless_and_unparseable_moves_are_invalid_and_change_nothing():
    board = [[2, 4, 0, 0], [4, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    game = _game(board)
    assert game.legal_actions() == [RIGHT, DOWN]
    rng_state = game.rng.bit_generator.state
    for action in (LEFT, UP, None, 7, "left", True):
        result = game.step(action)
        assert result.reward == game.invalid_penalty and not result.info["valid"]
    assert game.board == board and game.rng.bit_generator.state == rng_state and game.steps == 0


def test_spawn_values_follow_the_90_10_rule():
    game = Game2048(seed=123)
    spawned = []
    for _ in range(2000):
        game.set_board([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2]])
        game.step(LEFT)
        spawned.append(sum(map(sum, game.board)) - 2)
    assert set(spawned) == {2, 4} and 0.07 < np.mean(np.array(spawned) == 4) < 0.13


def test_game_over_when_no_move_changes_the_board():
    game = _game([[2, 4, 2, 4], [4, 2, 4, 2], [2, 4, 2, 4], [4, 2, 4, 8]])
    assert game.terminated and game.legal_actions() == []
    game = _game([[2, 4, 2, 4], [4, 2, 4, 2], [2, 4, 2, 4], [4, 2, 8, 0]])
    assert game.legal_actions() == [RIGHT, DOWN]
    result = game.step(RIGHT)  # fills the last cell; whether it ends depends on the spawn
    assert result.terminated == (game.legal_actions() == [])


def test_random_play_reaches_game_over_with_the_usual_score():
    game = Game2048(seed=5)
    rng = np.random.default_rng(0)
    merged_total = 0
    while not game.terminated:
        legal = game.legal_actions()
        merged_total += game.step(legal[rng.integers(len(legal))]).info["score_gain"]
    assert game.score == merged_total > 0 and game.steps > 20


def test_text_observation_and_parsing():
    game = _game([[2, 0, 0, 1024], [0, 0, 0, 0], [0, 0, 0, 0], [0, 16, 0, 0]])
    assert game.text_observation() == "2|-|-|1024\n-|-|-|-\n-|-|-|-\n-|16|-|-"
    for text, action in [("left", LEFT), ("LEFT", LEFT), (" Up. ", UP), ("2", DOWN), ("<answer>right</answer>", RIGHT)]:
        assert game.parse_action(text) == action
    for text in ("", "4", "north", "left right", "-1", "up!?down"):
        assert game.parse_action(text) is None
    assert [game.format_action(a) for a in range(4)] == ["up", "right", "down", "left"]
    prompt = game.prompt
    assert all(word in prompt for word in ("<perception>", "<think>", "<answer>", "|", "left"))


def test_rows_and_cols_knobs_and_their_errors():
    game = Game2048(seed=0, rows=3, cols=5)
    assert len(game.board) == 3 and len(game.board[0]) == 5
    assert game.render_array().shape == (840, 644, 3)
    with pytest.raises(ValueError, match="'rows'"):
        Game2048(rows=1)
    with pytest.raises(ValueError, match="'cols'"):
        Game2048(cols="4")
    with pytest.raises(ValueError, match="unknown difficulty key 'size'"):
        Game2048(size=4)
    with pytest.raises(ValueError, match="'photo_dir'"):
        Game2048(icon_style="photo")
    with pytest.raises(ValueError, match="power of two"):
        Game2048().set_board([[3, 0, 0, 0]] * 4)


def test_photo_style_keeps_the_numbers(photo_dir):
    game = Game2048(seed=0, icon_style="photo", photo_dir=photo_dir)
    assert game.render_array().shape == (840, 644, 3)
