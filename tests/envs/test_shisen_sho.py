"""Shisen-Sho rules on hand-made boards, the pair finder against a brute-force search, knobs, parsing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from envs.shisen_sho import EMPTY, JoinablePairs, ShisenSho, connectable_pairs, tile_type

_ = EMPTY
A, B = 0, 1  # two tile types; walls are other types (2, 3, ...) that match nothing nearby


def _walls(board: list[list[int]]) -> np.ndarray:
    """Replaces every 9 with a distinct type (from 10 on), so walls never match each other."""
    out = np.array(board)
    walls = out == 9
    out[walls] = 10 + np.arange(walls.sum())
    return out


def _game(board: list[list[int]]) -> ShisenSho:
    b = _walls(board)
    game = ShisenSho(seed=0, rows=b.shape[0], cols=b.shape[1])
    game.set_board(b)
    return game


def _connected_reference(board: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Brute force: straight walks from a; each further walk starts where the last one reached (3 walks = 2 turns)."""
    filled = np.pad(board != EMPTY, 1)
    n, m = filled.shape
    start, goal = (a[0] + 1, a[1] + 1), (b[0] + 1, b[1] + 1)
    frontier = {start}
    for _walk in range(3):
        reached = set()
        for r, c in frontier:
            for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                rr, cc = r + dr, c + dc
                while 0 <= rr < n and 0 <= cc < m:
                    if (rr, cc) == goal:
                        return True
                    if filled[rr, cc]:
                        break
                    reached.add((rr, cc))
                    rr, cc = rr + dr, cc + dc
        frontier = reached
    return False


def _legal(game: ShisenSho, pair) -> bool:
    return pair in game.legal_actions()


@pytest.mark.parametrize(
    ("board", "pair", "why"),
    [
        ([[A, A, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]], ((0, 0), (0, 1)), "adjacent"),
        ([[9, 9, 9, 9], [9, 9, 9, 9], [A, _, _, A], [9, 9, 9, 9]], ((2, 0), (2, 3)), "0 turns, a row"),
        ([[9, 9, 9, 9], [9, A, 9, 9], [9, _, 9, 9], [9, A, 9, 9]], ((1, 1), (3, 1)), "0 turns, a column"),
        ([[9, 9, 9, 9], [9, A, _, 9], [9, 9, A, 9], [9, 9, 9, 9]], ((1, 1), (2, 2)), "1 turn"),
        ([[9, 9, 9, 9], [9, A, _, 9], [9, 9, _, 9], [9, 9, _, A]], ((1, 1), (3, 3)), "2 turns down a column"),
        ([[9, 9, 9, 9], [A, _, 9, 9], [9, _, _, A], [9, 9, 9, 9]], ((1, 0), (2, 3)), "2 turns, Z"),
        ([[9, 9, 9, 9], [9, A, 9, A], [9, _, _, _], [9, 9, 9, 9]], ((1, 1), (1, 3)), "2 turns, U"),
        ([[A, 9, 9, A], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]], ((0, 0), (0, 3)), "around the top border"),
        ([[9, 9, 9, A], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, A]], ((0, 3), (3, 3)), "around the right border"),
        ([[9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9], [A, 9, A, 9]], ((3, 0), (3, 2)), "around the bottom border"),
    ],
)
def test_joinable_pairs_score_and_are_removed(board, pair, why):
    game = _game(board)
    before = game.board.copy()
    assert _legal(game, pair), why
    assert game.parse_action(f"<answer>{game.format_action(pair)}</answer>") == pair
    result = game.step(pair)
    assert result.reward == 1.0 and result.info["valid"], why
    (r1, c1), (r2, c2) = pair
    expected = before.copy()
    expected[r1, c1] = expected[r2, c2] = EMPTY
    np.testing.assert_array_equal(game.board, expected)
    assert game.score == 1


@pytest.mark.parametrize(
    ("board", "pair", "why"),
    [
        # a needs up/left, b down/right: every path around takes three turns
        ([[A, 9, 9, 9], [9, B, B, 9], [9, 9, 9, 9], [9, 9, 9, A]], ((0, 0), (3, 3)), "3 turns"),
        ([[9, 9, 9, 9], [9, A, 9, A], [9, 9, 9, 9], [9, B, B, 9]], ((1, 1), (1, 3)), "blocked in a row"),
        ([[9, 9, 9, 9], [9, A, _, 9], [9, _, 9, 9], [9, 9, A, B]], ((1, 1), (3, 2)), "both corners blocked"),
        ([[9, 9, 9, 9], [9, A, B, 9], [9, B, 9, 9], [9, 9, 9, 9]], ((1, 1), (1, 2)), "different types"),
        ([[9, 9, 9, 9], [9, A, B, 9], [9, B, 9, 9], [9, 9, 9, 9]], ((1, 1), (1, 1)), "one tile twice"),
        ([[9, 9, 9, 9], [9, A, _, B], [9, B, 9, 9], [9, 9, 9, 9]], ((1, 1), (1, 2)), "an empty cell"),
    ],
)
def test_other_pairs_are_refused_and_leave_the_board(board, pair, why):
    game = _game(board)
    before = game.board.copy()
    assert not _legal(game, pair), why
    result = game.step(pair)
    assert result.reward == -1.0 and not result.info["valid"], why
    np.testing.assert_array_equal(game.board, before)
    assert game.score == 0


def test_three_turn_board_still_has_its_other_pair():
    game = _game([[A, 9, 9, 9], [9, B, B, 9], [9, 9, 9, 9], [9, 9, 9, A]])
    assert game.legal_actions() == [((1, 1), (1, 2))]
    assert not game.terminated


def test_episode_ends_when_no_pair_connects():
    game = _game([[A, 9, 9, 9], [9, B, B, 9], [9, 9, 9, 9], [9, 9, 9, A]])
    result = game.step(((1, 1), (1, 2)))
    assert result.reward == 1.0 and result.terminated and game.terminated
    assert not result.info["cleared"]
    assert game.legal_actions() == []
    assert game.step(((0, 0), (3, 3))).reward == -1.0


def test_episode_ends_when_the_board_is_empty():
    game = _game([[A, _, _, _], [_, _, _, _], [_, _, B, _], [B, _, _, A]])
    assert game.legal_actions() == [((0, 0), (3, 3)), ((2, 2), (3, 0))]
    assert not game.step(((2, 2), (3, 0))).terminated
    result = game.step(((3, 3), (0, 0)))  # either order
    assert result.terminated and result.info["cleared"]
    assert game.score == 2


def test_pair_finder_matches_brute_force_on_random_boards():
    rng = np.random.default_rng(0)
    for _trial in range(300):
        rows, cols = rng.integers(1, 7, size=2)
        board = np.where(rng.random((rows, cols)) < 0.45, EMPTY, rng.integers(0, 3, (rows, cols)))
        found = {((a, b), (c, d)) for a, b, c, d in connectable_pairs(board).tolist()}
        cells = [(r, c) for r in range(rows) for c in range(cols) if board[r, c] != EMPTY]
        expected = {
            (p, q)
            for i, p in enumerate(cells)
            for q in cells[i + 1 :]
            if board[p] == board[q] and _connected_reference(board, p, q)
        }
        assert found == expected, board


def _brute_force_pairs(board: np.ndarray) -> list:
    cells = [(r, c) for r in range(board.shape[0]) for c in range(board.shape[1]) if board[r, c] != EMPTY]
    return [
        (p, q)
        for i, p in enumerate(cells)
        for q in cells[i + 1 :]
        if board[p] == board[q] and _connected_reference(board, p, q)
    ]


def test_pairs_kept_up_to_date_match_brute_force_after_every_removal():
    """The incremental update (only paths through the emptied cells are looked for) against the brute force, on
    boards with holes and many tiles of a type (so that many pairs appear and vanish) and on dealt boards."""
    rng = np.random.default_rng(1)
    boards = [np.where(rng.random((r, c)) < 0.3, EMPTY, rng.integers(0, 4, (r, c))) for r, c in [(5, 7), (8, 6)] * 6]
    boards += [ShisenSho(seed=s, rows=8, cols=8).board for s in range(4)]
    for board in boards:
        pairs, board = JoinablePairs(board), board.copy()
        while len(pairs):
            assert pairs.pairs() == _brute_force_pairs(board)
            (r1, c1), (r2, c2) = pair = pairs.pair_at(int(rng.integers(len(pairs))))
            assert pairs.remove(pair)
            board[r1, c1] = board[r2, c2] = EMPTY
        assert _brute_force_pairs(board) == []


def test_clones_mid_episode_replay_exactly_and_leave_the_original():
    game, rng = ShisenSho(seed=5, rows=8, cols=8), np.random.default_rng(0)
    for _ in range(5):
        game.step(game.random_legal_action(rng))
    board, legal = game.board.copy(), game.legal_actions()
    finals = []
    for clone in (game.clone(), game.clone()):
        clone_rng = np.random.default_rng(1)
        for _ in range(32):  # an 8 x 8 board holds 32 pairs
            clone.step(clone.random_legal_action(clone_rng))
        assert clone.terminated
        finals.append(clone.board)
    assert (finals[0] != board).any()
    np.testing.assert_array_equal(finals[0], finals[1])
    np.testing.assert_array_equal(game.board, board)
    assert game.legal_actions() == legal


def test_deal_uses_each_of_the_first_types_four_times_and_has_a_move():
    for seed in range(20):
        game = ShisenSho(seed=seed, rows=4, cols=6)
        counts = np.bincount(game.board.ravel())
        assert counts.tolist() == [4] * 6
        assert game.legal_actions() and not game.terminated


def test_first_types_vary_colour_and_shape():
    types = [tile_type(t, 6, 6) for t in range(36)]
    assert len(set(types)) == 36  # a bijection onto colour x shape
    assert {c for c, _ in types[:6]} == set(range(6)) and {s for _, s in types[:6]} == set(range(6))
    assert len(set(tile_type(t, 4, 3) for t in range(12))) == 12


def test_same_seed_same_deal_and_clone_is_independent():
    a, b = ShisenSho(seed=7), ShisenSho(seed=7)
    np.testing.assert_array_equal(a.board, b.board)
    clone = a.clone()
    clone.step(clone.legal_actions()[0])
    np.testing.assert_array_equal(a.board, b.board)


@pytest.mark.parametrize(
    ("knobs", "names"),
    [
        ({"rows": 3, "cols": 3}, ["'rows'", "'cols'", "divisible by 4"]),
        ({"rows": 2, "cols": 5}, ["'rows'", "'cols'"]),
        ({"rows": 12, "cols": 12, "n_colours": 2, "n_shapes": 2}, ["'n_colours'", "'n_shapes'", "36 tile types"]),
        ({"rows": 1}, ["'rows'", "[2, 20]"]),
        ({"n_shapes": 99}, ["'n_shapes'"]),
        ({"tiles": 4}, ["'tiles'", "allowed keys"]),
        ({"image_size": (56, 56)}, ["'image_size'"]),
    ],
)
def test_bad_knobs_name_the_keys(knobs, names):
    with pytest.raises(ValueError) as err:
        ShisenSho(seed=0, **knobs)
    for name in names:
        assert name in str(err.value)


def test_photo_dir_needs_a_class_per_tile_type(tmp_path):
    for k in range(3):
        (tmp_path / f"class{k}").mkdir()
        Image.new("RGB", (8, 8), (80 * k, 0, 0)).save(tmp_path / f"class{k}" / "a.png")
    with pytest.raises(ValueError, match="'photo_dir' has 3 classes"):
        ShisenSho(seed=0, rows=4, cols=4, icon_style="photo", photo_dir=str(tmp_path))
    game = ShisenSho(seed=0, rows=2, cols=6, icon_style="photo", photo_dir=str(tmp_path))
    assert game.render_array().shape == (840, 644, 3)


def test_parse_accepts_loose_spacing_and_orders_the_cells():
    game = ShisenSho(seed=0)
    expected = ((0, 1), (3, 1))
    for text in ["(0, 1) (3, 1)", "(3,1)(0,1)", " ( 0 ,1 ) , ( 3, 1 ). ", "[0, 1] and [3, 1]", "(0,1) -> (3,1)"]:
        assert game.parse_answer(text) == expected, text
    for text in ["", "(0, 1)", "0 1 3 1", "(0, 1) (3, 1) (2, 2)", "(a, 1) (3, 1)", "(0, 1) or (3, 1)", "x" * 10000]:
        assert game.parse_action(text) is None, text
    assert game.parse_action("<think>(5, 5) (5, 4)</think><answer>(0, 1) (3, 1)</answer>") == expected


def test_step_refuses_malformed_actions():
    game = ShisenSho(seed=0)
    before = game.board.copy()
    for action in [None, "(0, 1) (3, 1)", ((0, 1),), ((0.0, 1), (3, 1)), ((True, 1), (3, 1)), ((99, 0), (98, 0))]:
        result = game.step(action)
        assert result.reward == -1.0 and not result.terminated
    np.testing.assert_array_equal(game.board, before)


def test_text_observation_names_tiles_and_empty_cells():
    game = _game([[A, _, _, _], [_, _, _, _], [_, _, B, _], [B, _, _, A]])
    lines = game.text_observation().split("\n")
    assert lines[0] == "red circle|-|-|-"
    assert lines[3] == "green square|-|-|red circle"
    assert all(line.count("|") == 3 for line in lines)


def test_render_size_and_changes_with_the_board():
    game = ShisenSho(seed=0, rows=12, cols=12, image_size=(640, 840))
    frame = game.render_array()
    assert frame.shape == (840, 640, 3) and frame.dtype == np.uint8
    game.step(game.legal_actions()[0])
    assert not np.array_equal(frame, game.render_array())
    assert game.render().size == (640, 840)
