"""Swap (match-3) rules on hand-made boards: lines, scoring swaps, cascades, reshuffles, adjacency, parsing, knobs."""

from __future__ import annotations

import numpy as np
import pytest

from envs.swap import Swap, find_matches, scoring_swaps


def _game(board: list[list[int]], n_colours: int = 5, n_shapes: int = 1, **knobs) -> Swap:
    b = np.array(board)
    game = Swap(seed=0, rows=b.shape[0], cols=b.shape[1], n_colours=n_colours, n_shapes=n_shapes, **knobs)
    game.set_board(b)
    return game


def _scoring_swaps_reference(board: np.ndarray) -> list:
    """Brute force: try every adjacent swap on a copy and look for any line."""
    rows, cols = board.shape
    found = []
    for r in range(rows):
        for c in range(cols):
            for r2, c2 in ((r, c + 1), (r + 1, c)):
                if r2 < rows and c2 < cols and board[r, c] != board[r2, c2]:
                    b = board.copy()
                    b[r, c], b[r2, c2] = b[r2, c2], b[r, c]
                    if find_matches(b).any():
                        found.append(((r, c), (r2, c2)))
    return found


def test_find_matches_marks_lines_of_three_or_more():
    board = np.array([[1, 1, 1, 2], [3, 4, 5, 2], [0, 4, 0, 2], [0, 4, 1, 3]])
    mask = find_matches(board)
    expected = np.zeros_like(mask)
    expected[0, :3] = True  # a row of three 1s
    expected[1:4, 1] = True  # a column of three 4s
    expected[:3, 3] = True  # a column of three 2s
    assert (mask == expected).all()


def test_scoring_swaps_match_brute_force_on_random_boards():
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 300:
        board = rng.integers(0, 4, size=tuple(rng.integers(3, 9, size=2)))
        if find_matches(board).any():
            continue
        assert scoring_swaps(board) == _scoring_swaps_reference(board)
        checked += 1


def test_scoring_swap_clears_and_refills():
    game = _game([[0, 1, 2], [1, 2, 0], [0, 0, 1]], n_colours=3)
    assert ((2, 1), (2, 2)) not in game.legal_actions()
    assert ((1, 0), (2, 0)) not in game.legal_actions()
    assert ((1, 2), (2, 2)) in game.legal_actions()  # the 0 drops into row 2 next to two 0s
    result = game.step(((1, 2), (2, 2)))
    assert result.reward == 1.0 and result.info["cleared"] >= 3 and game.score == result.info["cleared"]
    assert not find_matches(game.board).any()  # resolved until stable


def test_cascade():
    # Swapping (3, 2) and (4, 2) lines up three 0s in row 4; the tiles above fall one row, giving row 4 = 3 2 2 2 3:
    # a second line, whatever drops in from the top.
    board = [
        [1, 3, 4, 1, 0],
        [4, 1, 3, 0, 4],
        [1, 4, 1, 3, 1],
        [3, 2, 0, 4, 0],
        [0, 0, 2, 2, 3],
    ]
    game = _game(board)
    result = game.step(((3, 2), (4, 2)))
    assert result.reward == 1.0
    assert result.info["cascades"] >= 1 and result.info["cleared"] >= 6


def test_non_scoring_non_adjacent_and_off_board_swaps_change_nothing():
    board = [[0, 1, 2], [1, 2, 0], [0, 0, 1]]
    game = _game(board, n_colours=3)
    for action in [
        ((0, 0), (0, 1)),
        ((0, 0), (2, 2)),
        ((0, 0), (1, 1)),
        ((2, 2), (2, 3)),
        ((0, 0), (0, 0)),
        None,
        "swap",
        ((1, 2),),
    ]:
        result = game.step(action)
        assert result.reward == -1.0 and not result.info["valid"]
    assert (game.board == np.array(board)).all() and game.steps == 0 and game.score == 0


def test_board_without_a_scoring_swap_is_reshuffled():
    latin = [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert scoring_swaps(np.array(latin)) == []
    game = _game(latin, n_colours=3)
    assert sorted(game.board.ravel()) == sorted(np.ravel(latin))  # the same tiles, permuted
    assert game.legal_actions() and not find_matches(game.board).any()


def test_start_boards_have_no_lines_and_a_move():
    for seed in range(20):
        game = Swap(seed=seed)
        assert game.board.shape == (8, 8) and game.board.max() < 12
        assert not find_matches(game.board).any() and game.legal_actions()


def test_episode_lasts_max_moves():
    game = Swap(seed=1, max_moves=5)
    rng = np.random.default_rng(0)
    for i in range(5):
        legal = game.legal_actions()
        result = game.step(legal[rng.integers(len(legal))])
        assert result.terminated == (i == 4)
    assert game.legal_actions() == [] and game.step(None).terminated


def test_parsing_text_and_format():
    game = Swap(seed=0)
    assert game.parse_action("<answer>(2, 3) (2, 4)</answer>") == ((2, 3), (2, 4))
    assert game.parse_action("(2,4) and (2,3)") == ((2, 3), (2, 4))  # either order names the same swap
    for text in ("", "(2, 3)", "(1, 2) (3, 4) (5, 6)", "2 3 2 4", "(a, b) (c, d)", "(-1, 0) (0, 0)"):
        assert game.parse_action(text) is None
    action = game.legal_actions()[0]
    assert game.parse_action(game.format_action(action)) == action
    rows = game.text_observation().split("\n")
    assert len(rows) == 8 and all(len(row.split("|")) == 8 for row in rows)
    names = {cell for row in rows for cell in row.split("|")}
    assert names <= {f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")}
    assert all(tag in game.prompt for tag in ("<perception>", "<think>", "<answer>", "(2, 3) (2, 4)"))


def test_knob_errors_name_the_keys(photo_dir):
    with pytest.raises(ValueError, match="'n_colours' x 'n_shapes'"):
        Swap(n_colours=1, n_shapes=2)
    with pytest.raises(ValueError, match="'rows'"):
        Swap(rows=2)
    with pytest.raises(ValueError, match="'n_shapes'"):
        Swap(n_shapes=99)
    with pytest.raises(ValueError, match="'photo_dir'"):
        Swap(icon_style="photo", photo_dir=photo_dir)  # 12 tile types, 6 photo classes
    game = Swap(seed=0, icon_style="photo", photo_dir=photo_dir, n_colours=3, n_shapes=2)
    assert game.render_array().shape == (840, 644, 3)
