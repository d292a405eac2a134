"""Tetris rules on hand-made boards: lmgame-Bench's spawn, moves and gravity, line clears, game over, answers, knobs."""

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
    """The moves that turn a new piece to `rotation`: none, clockwise, or once counter-clockwise for 3."""
    return {0: "", 3: "(rotate_left,1)"}.get(rotation, f"(rotate_right,{rotation})")


def _cells(game: Tetris) -> list[list[int]]:
    return np.argwhere(game.board).tolist()


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
    result = game.step(game.parse_action("rotate 0, column 0"))
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
    result = game.step(Placement(1, 0, 16))
    assert result.reward == 31.0 and game.score == 4.0
    expected = _filled([(19, c) for c in range(10) if c != 5])  # row 18, now with column 0 filled, at the bottom
    np.testing.assert_array_equal(game.board != 0, expected != 0)


def test_a_placement_without_lines_scores_one_and_lands_on_the_stack():
    game = _game("O", _filled([(19, 4)]))
    result = game.step(game.parse_action("rotate 0, column 4"))
    assert result.reward == 1.0 and game.score == 1.0 and not result.terminated
    assert _cells(game) == [[17, 4], [17, 5], [18, 4], [18, 5], [19, 4]]


def test_pieces_spawn_where_lmgame_bench_spawns_them():
    # lmgame-Bench: box x = width_padded // 2 - box // 2 (padding 4 a side), box top on row 0: I on row 1, cols 3-6.
    spans = {"I": (3, 6), "O": (4, 5), "T": (4, 6), "S": (4, 6), "Z": (4, 6), "J": (4, 6), "L": (4, 6)}
    for letter, (first, last) in spans.items():
        game = _game(letter, _filled([(r, c) for r in range(2, ROWS) for c in (0, 9)]))  # a board the drop can't clear
        game.step(game.parse_action("(hard_drop,1)"))
        cols = {c for r, c in _cells(game) if 0 < c < 9}
        assert (min(cols), max(cols)) == (first, last), letter
    assert _game("I", _filled([(1, 3)])).terminated and not _game("I", _filled([(0, 3)])).terminated


def test_legal_placements_stay_inside_the_walls():
    assert set(_game("I").legal_actions()) == {(0, c, 19) for c in range(7)} | {(1, c, 16) for c in range(10)}
    assert set(_game("O").legal_actions()) == {(0, c, 18) for c in range(9)}
    assert set(_game("T").legal_actions()) == {(r, c, 18) for r in (0, 2) for c in range(8)} | {
        (r, c, 17) for r in (1, 3) for c in range(9)
    }
    game = _game("I")
    assert game.step(Placement(0, 7, 19)).reward == -1.0  # would stick out of the right wall
    assert game.step(Placement(0, 3, 18)).reward == -1.0  # in the walls, but not a resting spot
    assert not game.board.any()


def test_rotation_against_a_wall_is_refused():
    game = _game("I")
    # Vertical at the right wall: turning again would put the horizontal I outside, so it stays vertical.
    assert game.parse_action("(rotate_right,1)(right,9)(rotate_right,1)(hard_drop,1)") == (1, 9, 16)
    assert game.parse_action("(rotate_left,1)(left,9)(rotate_left,1)") == (1, 0, 16)
    # Away from the walls the same second turn goes through: back to horizontal (one row lower in its box).
    assert game.parse_action("(rotate_right,2)(left,1)(hard_drop,1)") == (0, 2, 19)


def test_a_refused_turn_over_the_stack_locks_the_piece_unturned():
    # Every turned T covers the cell under its centre, as does the T one row lower: turning there is refused, and
    # gravity, finding the piece blocked, locks it on the spot (lmgame-Bench: a move, then a fall or a lock).
    game = _game("T", _filled([(2, 5)]))
    assert game.parse_action("(rotate_right,1)(hard_drop,1)") == (0, 4, 0)
    assert game.parse_action("rotate 1, column 5") not in game.legal_actions()
    game.step(game.parse_action("(rotate_right,1)"))
    assert _cells(game) == [[0, 5], [1, 4], [1, 5], [1, 6], [2, 5]]


def test_gravity_acts_after_every_move():
    # A column of height 16 at column 1: sliding left, the T falls a row per move and locks against it, as in
    # lmgame-Bench, by hand: box col 4 -> 3 (row 1) -> 2 (row 2) -> 1, which cannot fall to row 3: locks on rows 2-3.
    game = _game("T", _filled([(r, 1) for r in range(4, ROWS)]))
    answer = "(left,4)(hard_drop,1)"
    assert game.parse_action(answer) == (0, 1, 2)
    game.step(game.parse_action(answer))
    assert [cell for cell in _cells(game) if cell[0] < 4] == [[2, 2], [3, 1], [3, 2], [3, 3]]


def test_an_lmgame_bench_answer_lands_on_the_cells_computed_by_hand():
    # T at box col 4; two slides (falling to row 2) -> box col 2; a clockwise turn: cells (0,1) (1,1) (1,2) (2,1) of
    # its box, i.e. columns 3, 3, 4, 3; the hard drop rests it on the floor.
    for answer in ("(left,2)(rotate_right,1)(hard_drop,1)", "(move_left,2)(rotate_clockwise,1)(hard_drop,1)"):
        game = _game("T")
        game.step(game.parse_action(answer))
        assert _cells(game) == [[17, 3], [18, 3], [18, 4], [19, 3]], answer


def test_a_counter_clockwise_turn_reaches_what_the_clockwise_one_cannot():
    # Z at box col 4. (0,6) refuses the clockwise turn at the spawn; (2,6) stops the unturned Z falling, (1,3) stops
    # it after a slide left, and (0,6) also refuses the slide right: only the counter-clockwise turn falls on.
    game = _game("Z", _filled([(0, 6), (1, 3), (2, 6)]))
    expected = Placement(1, 4, 17)  # turned counter-clockwise in its box: column 4 rows 18-19, column 5 rows 17-18
    assert expected in game.legal_actions()
    assert game.parse_action("rotate 3, column 4") == game.parse_action("rotate 1, column 4") == expected
    assert game.parse_action("(rotate_left,1)(hard_drop,1)") == expected
    assert game.parse_action("(rotate_right,1)(hard_drop,1)") == (0, 4, 0)  # refused, then locked where it is
    game.step(game.parse_action("rotate 3, column 4"))
    assert [cell for cell in _cells(game) if cell[0] > 2] == [[17, 5], [18, 4], [18, 5], [19, 4]]


def test_issue_8_board_under_lmgame_bench_gravity():
    # Issue #8's board: column 4 filled from row 2, Z current. The spawned Z covers column 4 on row 0 and gets one
    # move before gravity: the counter-clockwise turn is refused there ((2, 4) is filled), so it locks on the column,
    # as lmgame-Bench locks it. The vertical Z left of the column needs a turn and a slide on row 0: out of reach.
    game = _game("Z", _filled([(r, 4) for r in range(2, ROWS)]))
    assert game.parse_action("(rotate_counterclockwise,1)(hard_drop,1)") == (0, 4, 1)
    assert game.step(game.parse_action("(rotate_left,1)(hard_drop,1)")).reward == 1.0
    assert [cell for cell in _cells(game) if cell[1] != 4 or cell[0] < 2] == [[1, 4], [1, 5], [2, 5], [2, 6]]
    game = _game("Z", _filled([(r, 4) for r in range(2, ROWS)]))
    assert game.parse_action("rotate 3, column 3") == game.parse_action("rotate 1, column 3") == (1, 3, -1)
    assert game.step(game.parse_action("rotate 3, column 3")).reward == -1.0
    assert game.parse_action("(rotate_right,1)(hard_drop,1)") == (1, 5, 17)  # the clockwise turn clears it


def test_a_move_then_turn_placement_near_a_high_stack():
    # Column 5 filled from row 2: the spawned Z (over columns 4-6) must leave it at once. Sliding right first, then
    # turning, reaches the vertical Z right of the column; turning first is refused or locks.
    game = _game("Z", _filled([(r, 5) for r in range(2, ROWS)]))
    vertical = Placement(1, 6, 17)
    assert vertical in game.legal_actions()
    assert game.parse_action("(right,1)(rotate_right,1)(hard_drop,1)") == vertical
    assert game.parse_action("rotate 1, column 6") == vertical
    assert game.parse_action("(rotate_right,1)(right,1)(hard_drop,1)") != vertical
    assert game.step(vertical).reward == 1.0


def test_a_slide_under_an_overhang_is_a_placement_only_a_move_sequence_names():
    # A roof over columns 0-1 at row 17. The O dropped in column 1 lands on the roof; one that falls beside it to the
    # floor can slide once more (then it cannot fall: it locks) under it: columns 1-2, not 0-1 (two slides).
    game = _game("O", _filled([(17, 0), (17, 1)]))
    tucked = Placement(0, 1, 18)
    assert tucked in game.legal_actions() and Placement(0, 0, 18) not in game.legal_actions()
    assert game.parse_action("rotate 0, column 1") == (0, 1, 15)  # the highest spot of that column
    assert game.parse_action("(left,2)(no_op,16)(left,1)") == tucked  # lmgame-Bench: at row 18 after 18 frames
    assert game.format_action(tucked).startswith("(")
    assert game.parse_action(game.format_action(tucked)) == tucked
    game.step(tucked)
    assert _cells(game) == [[17, 0], [17, 1], [18, 1], [18, 2], [19, 1], [19, 2]]


def test_the_search_agrees_with_frame_by_frame_play_on_random_boards():
    rng = np.random.default_rng(0)
    for trial in range(30):
        board = np.where(rng.random((ROWS, COLS)) < rng.uniform(0.2, 0.7), 1, 0).astype(np.int8)
        board[: rng.integers(0, 14)] = 0
        game = _game(PIECES[trial % len(PIECES)], board)
        if game.terminated:
            continue
        legal = set(game.legal_actions())
        for placement in legal:  # every searched placement: a move sequence played frame by frame locks there
            assert game.parse_action(game.moves_to(placement)) == placement
        for _ in range(30):  # and every move sequence locks on a searched placement
            moves = rng.choice(["left", "right", "rotate_left", "rotate_right", "no_op", "soft_drop"], 8)
            answer = "".join(f"({m},{rng.integers(1, 4)})" for m in moves)
            assert game.parse_action(answer) in legal, answer


def test_move_sequences_give_the_same_placement_as_the_canonical_answer():
    for letter in PIECES:
        game = _game(letter)
        for placement in game.legal_actions():
            turn = _turn(placement.rotation)
            start = game.parse_action(f"{turn}(hard_drop,1)")  # where the turned piece is before sliding
            shift = placement.column - start.column
            slide = f"(right,{shift})" if shift > 0 else f"(left,{-shift})" if shift < 0 else ""
            answer = f"{turn}{slide}(hard_drop,1)"
            assert game.parse_action(answer) == placement, (letter, answer)
            assert game.parse_action(f"<answer>{game.format_action(placement)}</answer>") == placement


def test_equivalent_rotations_parse_to_the_canonical_one():
    game = _game("S")
    assert game.parse_action("rotate 2, column 3") == (0, 3, 18)
    assert game.parse_action("rotate 3, column 3") == (1, 3, 17)
    assert game.parse_action("(rotate_right,2)(hard_drop,1)") == (0, 4, 18)  # rotation 2 is a row lower in its box
    assert game.parse_action("(rotate_right,6)(hard_drop,1)") == (0, 4, 18)
    assert _game("O").parse_action("rotate 3, column 0") == (0, 0, 18)


def test_parse_accepts_the_documented_forms_only():
    game = _game("T")
    for text in ["rotate 1, column 4", "Rotation: 1, Column: 4", "column 4, rotate 1", "ROTATE 1 COLUMN 4."]:
        assert game.parse_action(text) == (1, 4, 17), text
    assert game.parse_action("(left,2)(rotate_right,1)(hard_drop,1)") == (1, 3, 17)
    assert game.parse_action("(hard_drop,1)(left,3)") == (0, 4, 18)  # moves after the piece locks are ignored
    assert game.parse_action("(move_left,9999)") == (0, 0, 18)  # no hard drop: dropped at the end
    assert game.parse_action("(left,0)") == (0, 3, 18)  # lmgame-Bench plays a count of 0 once
    assert game.parse_action("(soft_drop,1)(left,1)") == game.parse_action("(no_op,2)(left,1)")  # a soft drop: 2 rows
    for text in ["rotate 4, column 1", "rotate 1", "column 4", "left", "(left,2)(jump,1)", "(left)", ""]:
        assert game.parse_action(text) is None, text
    assert game.parse_action("x" * 100000) is None
    assert game.parse_action("<answer>rotate 9, column 99</answer>") is None
    assert game.step(game.parse_action("rotate 0, column 42")).reward == -1.0  # well formed, not legal
    assert game.step(([0], 4, 18)).reward == -1.0 and not game.board.any()  # not a placement at all


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
    assert set(game.legal_actions()) == {(0, 3, 0), (0, 4, 0), (0, 5, 0)}  # gravity locks it after one move
    result = game.step(Placement(0, 4, 0))
    assert result.reward == 1.0 and result.terminated and game.terminated
    assert game.legal_actions() == []
    assert game.step(Placement(0, 0, 18)).reward == -1.0


def test_random_play_ends_on_a_small_board():
    game = Tetris(seed=1, rows=6, cols=4, preview=0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        legal = game.legal_actions()
        if not legal:
            break
        game.step(legal[rng.integers(len(legal))])
    assert game.terminated and game.legal_actions() == []


def test_straight_drops_match_a_cell_by_cell_drop_on_boards_with_holes():
    rng = np.random.default_rng(0)
    for trial in range(40):
        board = np.where(rng.random((ROWS, COLS)) < 0.5, 1, 0).astype(np.int8)
        board[: rng.integers(4, 15)] = 0  # stack with holes and overhangs
        board[:, [0, COLS - 1]] = 0  # no piece spans both edges: no line clears
        letter = PIECES[trial % len(PIECES)]
        game, empty = _game(letter, board), _game(letter)
        for placement in game.legal_actions():
            answer = f"rotate {placement.rotation}, column {placement.column}"
            if game.parse_action(answer) != placement:
                continue  # slid under an overhang: not a straight drop
            shape = empty.clone()
            shape.step(shape.parse_action(answer))
            cells = _drop_from_above(board, np.argwhere(shape.board))  # the placement's cells, dropped on `board`
            expected = board.copy()
            expected[cells[:, 0], cells[:, 1]] = 1
            played = game.clone()
            played.step(placement)
            np.testing.assert_array_equal(played.board != 0, expected != 0)


def test_text_observation_lists_the_board_and_the_pieces():
    game = _game("O", preview=3)
    game.step(Placement(0, 0, 18))
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
