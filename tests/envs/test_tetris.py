"""Tetris rules on hand-made boards: line clears, walls, the 7-bag, game over, answers, rewards and knobs."""

from __future__ import annotations

import numpy as np
import pytest

from envs.tetris import PIECES, Placement, Tetris

ROWS, COLS = 20, 10


def _game(piece: str, board: np.ndarray | None = None, **knobs) -> Tetris:
    game = Tetris(seed=0, **knobs)
    rows, cols = game.board.shape
    game.set_board(np.zeros((rows, cols), np.int8) if board is None else board, piece=piece)
    return game


def _filled(cells: list[tuple[int, int]], rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    board = np.zeros((rows, cols), np.int8)
    for r, c in cells:
        board[r, c] = 1
    return board


def _turn(rotation: int) -> str:
    """The move that turns a new piece to `rotation`: clockwise, or once counter-clockwise for 3."""
    return "(rotate_counterclockwise,1)" if rotation == 3 else f"(rotate_clockwise,{rotation})"


def _drop_from_above(board: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Reference hard drop: (4, 2) cells moved above the board, then down one row at a time until blocked."""
    cells = cells.copy()
    cells[:, 0] -= cells[:, 0].max() + 1
    while True:
        below = cells[:, 0] + 1
        seen = below >= 0
        if (below >= board.shape[0]).any() or board[below[seen], cells[seen, 1]].any():
            return cells
        cells[:, 0] = below


def test_single_line_clear_scores_and_shifts_rows_down():
    board = _filled([(19, c) for c in range(4, 10)] + [(18, 9)])
    game = _game("I", board)
    result = game.step(Placement(0, 0))
    assert result.reward == 11.0 and result.info == {"valid": True, "lines_cleared": 1}
    assert game.score == 2.0 and game.lines == 1 and game.pieces == 1
    np.testing.assert_array_equal(game.board != 0, _filled([(19, 9)]) != 0)  # the block above moved down


def test_four_lines_at_once():
    board = _filled([(r, c) for r in range(16, 20) for c in range(9)] + [(15, 0)])
    game = _game("I", board)
    result = game.step(game.parse_action("<answer>rotate 1, column 9</answer>"))
    assert result.reward == 41.0 and result.info["lines_cleared"] == 4
    assert game.score == 5.0
    np.testing.assert_array_equal(game.board != 0, _filled([(19, 0)]) != 0)


def test_lines_that_are_not_adjacent_clear_and_the_row_between_drops():
    board = _filled([(r, c) for r in (16, 17, 19) for c in range(1, 10)] + [(18, c) for c in range(1, 10) if c != 5])
    game = _game("I", board)
    result = game.step(Placement(1, 0))
    assert result.reward == 31.0 and game.score == 4.0
    expected = _filled([(19, c) for c in range(10) if c != 5])  # row 18, now with column 0 filled, at the bottom
    np.testing.assert_array_equal(game.board != 0, expected != 0)


def test_a_placement_without_lines_scores_one_and_lands_on_the_stack():
    game = _game("O", _filled([(19, 4)]))
    result = game.step(Placement(0, 4))
    assert result.reward == 1.0 and game.score == 1.0 and not result.terminated
    np.testing.assert_array_equal(np.argwhere(game.board).tolist(), [[17, 4], [17, 5], [18, 4], [18, 5], [19, 4]])


def test_legal_placements_stay_inside_the_walls():
    assert set(_game("I").legal_actions()) == {(0, c) for c in range(7)} | {(1, c) for c in range(10)}
    assert set(_game("O").legal_actions()) == {(0, c) for c in range(9)}
    assert set(_game("T").legal_actions()) == {(r, c) for r in (0, 2) for c in range(8)} | {
        (r, c) for r in (1, 3) for c in range(9)
    }
    game = _game("I")
    assert game.step(Placement(0, 7)).reward == -1.0  # would stick out of the right wall
    assert not game.board.any()


def test_rotation_against_a_wall_is_refused():
    game = _game("I")
    # Vertical at the right wall: turning again would put the horizontal I outside, so it stays vertical.
    assert game.parse_action("(rotate_clockwise,1)(move_right,9)(rotate_clockwise,1)(hard_drop,1)") == (1, 9)
    assert game.parse_action("(rotate_counterclockwise,1)(move_left,9)(rotate_counterclockwise,1)") == (1, 0)
    # Away from the walls the same second turn goes through: back to horizontal.
    assert game.parse_action("(rotate_clockwise,2)(move_left,1)(hard_drop,1)") == (0, 2)


def test_rotation_into_a_block_is_refused():
    game = _game("T", _filled([(2, 4)]))  # every turned T covers row 2 under its centre
    assert game.legal_actions() == [(0, c) for c in range(8)]
    assert game.parse_action("(rotate_clockwise,1)(move_left,3)(hard_drop,1)") == (0, 0)
    assert game.step(Placement(1, 3)).reward == -1.0


def test_move_sequences_give_the_same_placement_as_the_canonical_answer():
    for letter in PIECES:
        game = _game(letter)
        for placement in game.legal_actions():
            start = game.parse_action(_turn(placement.rotation))  # where the turned piece is before sliding
            shift = placement.column - start.column
            slide = f"(move_right,{shift})" if shift >= 0 else f"(move_left,{-shift})"
            answer = f"{_turn(placement.rotation)}{slide}(hard_drop,1)"
            assert game.parse_action(answer) == placement, (letter, answer)
            assert game.parse_action(f"<answer>{game.format_action(placement)}</answer>") == placement


def test_equivalent_rotations_parse_to_the_canonical_one():
    game = _game("S")
    assert game.parse_action("rotate 2, column 3") == (0, 3)
    assert game.parse_action("rotate 3, column 3") == (1, 3)
    assert game.parse_action("(rotate_clockwise,2)(hard_drop,1)") == (0, 3)
    assert game.parse_action("(rotate_clockwise,6)(hard_drop,1)") == (0, 3)
    assert _game("O").parse_action("rotate 3, column 0") == (0, 0)


def test_parse_accepts_the_documented_forms_only():
    game = _game("T")
    for text in ["rotate 1, column 4", "Rotation: 1, Column: 4", "column 4, rotate 1", "ROTATE 1 COLUMN 4."]:
        assert game.parse_action(text) == (1, 4), text
    assert game.parse_action("(move_left,2)(rotate_clockwise,1)(hard_drop,1)") == (1, 2)
    assert game.parse_action("(hard_drop,1)(move_left,3)") == (0, 3)  # moves after the drop are ignored
    assert game.parse_action("(move_left,9999)") == (0, 0)
    for text in ["rotate 4, column 1", "rotate 1", "column 4", "left", "(move_left,2)(jump,1)", "(move_left)", ""]:
        assert game.parse_action(text) is None, text
    assert game.parse_action("x" * 100000) is None
    assert game.parse_action("<answer>rotate 9, column 99</answer>") is None
    assert game.step(game.parse_action("rotate 0, column 42")).reward == -1.0  # well formed, not legal


def test_seven_bag_deals_every_piece_once_per_bag():
    for piece_set in ("IOTSZJL", "IO", "T", "LJ"):
        game = Tetris(seed=3, piece_set=piece_set)
        dealt = []
        for _ in range(5 * len(piece_set)):
            dealt.append(game.piece)
            game.step(game.legal_actions()[0])
            game.set_board(np.zeros_like(game.board))  # keep the episode going
        bags = [dealt[i : i + len(piece_set)] for i in range(0, len(dealt), len(piece_set))]
        assert all(sorted(bag) == sorted(piece_set) for bag in bags), (piece_set, bags)
        if len(piece_set) > 2:
            assert len({tuple(bag) for bag in bags}) > 1  # bags are shuffled


def test_game_over_when_the_next_piece_has_no_room():
    board = _filled([(r, c) for r in range(2, ROWS) for c in range(3, 7)])  # a tower under the spawn area
    game = _game("O", board)
    result = game.step(Placement(0, 4))
    assert result.reward == 1.0 and result.terminated and game.terminated
    assert game.legal_actions() == []
    assert game.step(Placement(0, 0)).reward == -1.0


def test_game_over_when_a_piece_rests_above_the_board():
    game = _game("I", _filled([(r, 0) for r in range(3, ROWS)]))
    result = game.step(Placement(1, 0))  # the vertical I lands with its top cell above row 0
    assert result.reward == 1.0 and result.terminated


def test_random_play_ends_on_a_small_board():
    game = Tetris(seed=1, rows=6, cols=4, preview=0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        legal = game.legal_actions()
        if not legal:
            break
        game.step(legal[rng.integers(len(legal))])
    assert game.terminated and game.legal_actions() == []


def test_hard_drop_matches_a_cell_by_cell_drop_on_boards_with_holes():
    rng = np.random.default_rng(0)
    for trial in range(40):
        board = np.where(rng.random((ROWS, COLS)) < 0.5, 1, 0).astype(np.int8)
        board[: rng.integers(4, 15)] = 0  # stack with holes and overhangs, below the spawn band
        board[:, [0, COLS - 1]] = 0  # no piece spans both edges: no line clears
        letter = PIECES[trial % len(PIECES)]
        game = _game(letter, board)
        for placement in game.legal_actions():
            shape = _game(letter).clone()
            shape.step(placement)
            cells = _drop_from_above(board, np.argwhere(shape.board))  # the placement's cells, dropped on `board`
            expected = board.copy()
            expected[cells[:, 0], cells[:, 1]] = 1
            played = game.clone()
            played.step(placement)
            np.testing.assert_array_equal(played.board != 0, expected != 0)


def test_text_observation_lists_the_board_and_the_pieces():
    game = _game("O", preview=3)
    game.step(Placement(0, 0))
    lines = game.text_observation().split("\n")
    assert len(lines) == ROWS + 2
    assert lines[ROWS - 1] == "#|#|-|-|-|-|-|-|-|-" and lines[0] == "|".join(["-"] * COLS)
    assert lines[ROWS] == f"current: {game.piece}"
    assert lines[ROWS + 1] == "next: " + ", ".join(game.queue[:3])
    no_preview = _game("O", preview=0).text_observation().split("\n")
    assert no_preview[-1] == "current: O" and len(no_preview) == ROWS + 1


@pytest.mark.parametrize(
    ("knobs", "name"),
    [
        ({"piece_set": "IX"}, "'piece_set'"),
        ({"piece_set": ""}, "'piece_set'"),
        ({"piece_set": "II"}, "'piece_set'"),
        ({"preview": 7}, "'preview'"),
        ({"rows": 5}, "'rows'"),
        ({"cols": 3}, "'cols'"),
        ({"n_colours": 0}, "'n_colours'"),
        ({"image_size": (56, 56)}, "'image_size'"),
        ({"icon_style": "photo"}, "'photo_dir'"),
        ({"speed": 2}, "'speed'"),
    ],
)
def test_bad_knobs_name_the_key(knobs, name):
    with pytest.raises(ValueError, match=name):
        Tetris(seed=0, **knobs)


def test_knobs_change_the_board_and_the_pieces():
    game = Tetris(seed=0, rows=12, cols=6, piece_set="IO", preview=1)
    assert game.board.shape == (12, 6)
    assert {game.piece, *game.queue} <= set("IO")
    assert "next: " in game.text_observation() and "12 rows x 6 columns" in game.prompt


def test_render_size_and_preview_panel():
    game = Tetris(seed=0, image_size=(640, 840))
    frame = game.render_array()
    assert frame.shape == (840, 640, 3) and frame.dtype == np.uint8
    other = game.clone()
    other.queue[0] = "I" if other.queue[0] != "I" else "O"  # only the preview differs
    assert not np.array_equal(frame, other.render_array())
    game.step(game.legal_actions()[0])
    assert not np.array_equal(frame, game.render_array())
    assert game.render().size == (640, 840)


def test_same_seed_same_game_and_clones_are_independent():
    a, b = Tetris(seed=5), Tetris(seed=5)
    assert (a.piece, a.queue) == (b.piece, b.queue)
    clone = a.clone()
    clone.step(clone.legal_actions()[-1])
    assert not a.board.any() and a.pieces == 0
    assert clone.board.any()


def test_a_piece_slid_under_an_overhang_falls_from_where_it_is():
    game = _game("T", _filled([(0, 0)]))  # a block in the spawn band, over an empty column
    assert Placement(2, 0) in game.legal_actions()  # the flat-side-up T slides under it at rows 1-2
    game.step(Placement(2, 0))
    np.testing.assert_array_equal(np.argwhere(game.board).tolist(), [[0, 0], [18, 0], [18, 1], [18, 2], [19, 1]])
