"""Tetris's scripted expert (El-Tetris placement search): legal, honest, takes the line clears, outlives random play."""

from __future__ import annotations

import numpy as np

from envs.tetris import Placement, Tetris

ROWS, COLS = 20, 10


def _pieces_placed(seed: int, policy: str, max_pieces: int) -> Tetris:
    """One episode (up to `max_pieces`) with the expert or uniformly random legal placements; returns the game."""
    game = Tetris(seed=seed)
    rng = np.random.default_rng(seed)
    while not game.terminated and game.pieces < max_pieces:
        game.step(game.expert_move().action if policy == "expert" else game.random_legal_action(rng))
    return game


def test_expert_outlives_random_play_and_clears_lines():
    """Random placements top out after ~20 pieces; the expert is still playing after 150 and has cleared lines."""
    experts = [_pieces_placed(seed, "expert", max_pieces=150) for seed in range(3)]
    randoms = [_pieces_placed(seed, "random", max_pieces=150) for seed in range(3)]
    assert all(game.pieces == 150 and not game.terminated for game in experts)
    assert np.mean([game.pieces for game in randoms]) < 40
    assert all(game.lines >= 50 for game in experts)  # 150 pieces x 4 cells fill 60 rows of 10: most are cleared


def test_expert_moves_are_legal_and_their_reasons_name_them():
    rng = np.random.default_rng(0)
    game = Tetris(seed=4)
    for _ in range(40):
        move = game.expert_move()
        assert move.action in game.legal_actions()
        assert game.format_action(move.action) in move.reason
        assert f"rows {move.action.row}-" in move.reason
        game.step(move.action if rng.random() < 0.5 else game.random_legal_action(rng))  # varied, rough boards
        if game.terminated:
            break


def test_expert_takes_the_line_clear_and_avoids_holes():
    board = np.zeros((ROWS, COLS), np.int8)
    board[19, 4:] = 1  # an I laid flat in columns 0-3 completes row 19
    game = Tetris(seed=0)
    game.set_board(board, piece="I")
    move = game.expert_move()
    assert move.action == Placement(0, 0, 19) and "clears 1 line " in move.reason
    board = np.zeros((ROWS, COLS), np.int8)
    board[19, [0, 1, 2, 3, 6, 7, 8, 9]] = 1  # a 2-wide gap at columns 4-5: only the O fills it without a hole
    game.set_board(board, piece="O")
    move = game.expert_move()
    assert move.action == Placement(0, 4, 18) and "leaves 0 holes" in move.reason


def test_expert_reasons_from_the_column_heights_it_saw():
    """The <think> starts with each column's stack height (a covered hole does not lower it), then the choice."""
    board = np.zeros((ROWS, COLS), np.int8)
    board[19, 4:] = 1
    board[17, 0] = 1  # column 0: a block over two empty cells is 3 high
    game = Tetris(seed=0)
    game.set_board(board, piece="O")
    assert game.column_heights() == [3, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert game.expert_move().reason.startswith("Column heights 3 0 0 0 1 1 1 1 1 1. The O goes on rows ")
