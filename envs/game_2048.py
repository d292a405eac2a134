"""2048: slide the tiles of a grid in one of four directions; equal neighbours merge into their sum.

Rules (G1's 2048, the same as the `gymnasium-2048` package): a move slides every tile as far as it goes; two equal
tiles that meet merge once per move (the pair nearest the wall first, so `2 2 2 2` left gives `4 4 - -`); after a
move that changed the board a 2 (p 0.9) or a 4 (p 0.1) appears on a random empty cell. The game is over when no
move changes the board. Score: the sum of the merged tiles (the usual 2048 score).

Training reward (G1's shaping): +1 if the move merged tiles, else -1. A move that changes nothing is not legal
here (`legal_actions` lists only moves that change the board) and, like an unreadable answer, gets the invalid
penalty of -1 with the board unchanged; G1's fork maps such answers to a "still" no-op with the same -1.

Expert (`expert_move`): expectimax two moves deep (move, every spawn weighted by its probability, best reply) over
`apply_move`, scoring boards with nneonneo/2048-ai's line heuristic and a pull of large tiles to the bottom-left
corner (`_CORNER`). On 5 seeds it reaches tiles of 2048 and more (mean score ~28,000-38,000) where random legal moves
reach 1,200, at 3-7 ms of CPU per move (bench/experts.py). With the `expert` knob at `corner` it plays a fixed
rule instead, the first of down, left, right, up that changes the board: weaker, but every choice is one a small
student can learn from the board alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from envs.base import ExpertMove, Game, Knob, StepResult, int_in, one_of
from envs.render import COLOURS, PERCEPTION_KNOBS, Style, Tile, cached_renderer, photo_class_count

ACTIONS = ("up", "right", "down", "left")  # index = action id, as in G1 and gymnasium-2048
EMPTY = "-"
# The corner expert's order: the first of these that changes the board (8 seeds x 200 moves: 2,146 where random legal
# moves score 1,302 and the expectimax expert 2,522; its moves are down 72%, left 24%, right 4%, up 0.1%).
CORNER_ORDER = (2, 3, 1, 0)  # down, left, right, up
EXPERTS = ("expectimax", "corner")


@functools.lru_cache(maxsize=1 << 16)
def slide_line(line: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Slides one line towards its start, merging equal neighbours once each (memoized: lines repeat a lot).

    Args:
        line: tile values, index 0 at the wall the tiles move to (0 = empty).

    Returns:
        (the new line, same length; the sum of the merged tiles).
    """
    tiles = [v for v in line if v]
    out: list[int] = []
    gained = 0
    i = 0
    while i < len(tiles):
        if i + 1 < len(tiles) and tiles[i] == tiles[i + 1]:
            out.append(2 * tiles[i])
            gained += 2 * tiles[i]
            i += 2
        else:
            out.append(tiles[i])
            i += 1
    return tuple(out) + (0,) * (len(line) - len(out)), gained


def apply_move(board: list[list[int]], action: int) -> tuple[list[list[int]], int]:
    """The board after `action` (0 up, 1 right, 2 down, 3 left), before the spawn, and the merge score.

    Plain lists and memoized lines, not numpy: on boards this small, array calls cost more than the work.
    """
    # Read each line starting at the wall the tiles move to, slide it, and write it back the same way.
    vertical, reverse = action in (0, 2), action in (1, 2)
    lines = list(zip(*board, strict=True)) if vertical else [tuple(row) for row in board]
    if reverse:
        slid = [slide_line(line[::-1]) for line in lines]
        moved = [line[::-1] for line, _ in slid]
    else:
        slid = [slide_line(line) for line in lines]
        moved = [line for line, _ in slid]
    gained = sum(g for _, g in slid)
    rows = zip(*moved, strict=True) if vertical else moved
    return [list(row) for row in rows], gained


# The expert's board heuristic, line by line (the weights of nneonneo/2048-ai, a strong, widely used expectimax
# player): empty cells and equal neighbours are good; non-monotone lines and large tiles scattered are bad.
_LOST_PENALTY, _EMPTY, _MERGES = 200_000.0, 270.0, 700.0
_MONO_POWER, _MONO, _SUM_POWER, _SUM = 4.0, 47.0, 3.5, 11.0
# A pull of the large tiles towards the bottom-left corner, on top of those symmetric weights: each tile adds
# _CORNER x log2(tile)^2 x its distance in cells from the top-right corner. It barely changes the expert's strength
# (8 seeds x 200 moves: 2,522 vs 2,547; full games about as long), but it makes the expert play one strategy a small
# model can learn: down and left 87% of the moves, not a near-even spread over all four (12-36% each), whose choice
# only the search itself can explain. A student that learns "down, else left, else ..." plays well (2,146 at 200
# moves, random legal moves 1,108).
_CORNER = 30.0
_FOUR_PROBABILITY = 0.1  # a spawn is a 4 with this probability, else a 2 (see _spawn)


@functools.lru_cache(maxsize=1 << 16)
def _line_value(line: tuple[int, ...]) -> float:
    """Heuristic value of one row or column (memoized: lines repeat a lot)."""
    ranks = [v.bit_length() - 1 if v else 0 for v in line]  # log2 of the tiles, 0 = empty
    tiles = [r for r in ranks if r]
    merges = sum(a == b for a, b in zip(tiles, tiles[1:], strict=False))
    rising = falling = 0.0
    for a, b in zip(ranks, ranks[1:], strict=False):
        if a > b:
            falling += a**_MONO_POWER - b**_MONO_POWER
        else:
            rising += b**_MONO_POWER - a**_MONO_POWER
    return (
        _LOST_PENALTY
        + _EMPTY * (len(line) - len(tiles))
        + _MERGES * merges
        - _MONO * min(rising, falling)
        - _SUM * sum(r**_SUM_POWER for r in tiles)
    )


@functools.lru_cache(maxsize=1 << 16)
def _line_mass(line: tuple[int, ...]) -> float:
    """The sum of log2(tile)^2 over one row or column (memoized), which the corner pull weights by position."""
    return float(sum((v.bit_length() - 1) ** 2 for v in line if v))


def board_value(board: list[list[int]]) -> float:
    """The expert's heuristic value of a board: its rows' and columns' line values, plus the corner pull.

    The pull, _CORNER x sum over tiles of log2(tile)^2 x (row + cols - 1 - column), is summed line by line: each
    row's mass weighted by its row index, each column's by its distance from the right edge.
    """
    cols = list(zip(*board, strict=True))
    lines = sum(_line_value(tuple(row)) for row in board) + sum(_line_value(col) for col in cols)
    corner = sum(r * _line_mass(tuple(row)) for r, row in enumerate(board))
    corner += sum((len(cols) - 1 - c) * _line_mass(col) for c, col in enumerate(cols))
    return lines + _CORNER * corner


def expectimax_values(board: list[list[int]], moves: dict[int, tuple[list[list[int]], int]]) -> dict[int, float]:
    """Expected heuristic value of each legal move, searched two moves deep (move, random spawn, best next move).

    Args:
        board: the current board (it is not changed).
        moves: the board after each legal move, before its spawn, and the merge score (`Game2048._moves`).

    Returns:
        {action: the spawn-averaged value of the best reply's board; dead boards count as 0}.
    """
    values = {}
    for action, (moved, _) in moves.items():
        after = [row[:] for row in moved]  # spawns are tried in place on a copy
        empty = [(r, c) for r, row in enumerate(after) for c, v in enumerate(row) if v == 0]
        total = 0.0
        for r, c in empty:
            for tile, p in ((2, 1 - _FOUR_PROBABILITY), (4, _FOUR_PROBABILITY)):
                after[r][c] = tile
                replies = [apply_move(after, a)[0] for a in range(4)]
                total += p * max((board_value(b) for b in replies if b != after), default=0.0)
            after[r][c] = 0
        values[action] = total / len(empty)
    return values


class Game2048(Game):
    """2048 on a rows x cols board; actions 0 Up, 1 Right, 2 Down, 3 Left."""

    name: ClassVar[str] = "2048"
    knobs: ClassVar[dict[str, Knob]] = {
        **PERCEPTION_KNOBS,
        "rows": Knob(4, int_in(2, 8), "board rows"),
        "cols": Knob(4, int_in(2, 8), "board columns"),
        "expert": Knob(
            "expectimax",
            one_of(*EXPERTS),
            "expectimax: two moves ahead (the teacher row); corner: the first of down, left, right, up that moves (a "
            "weaker rule whose every choice a small student can learn)",
        ),
    }
    invalid_penalty: ClassVar[float] = -1.0

    @classmethod
    def check_combination(cls, values: dict[str, Any]) -> dict[str, Any]:
        # Fails now, at construction, when 'photo' has no photo_dir or the image is too small for the board.
        cached_renderer(values["rows"], values["cols"], Style.from_difficulty(values), "2048")
        return values

    def reset(self) -> None:
        rows, cols = self.difficulty["rows"], self.difficulty["cols"]
        self._style = Style.from_difficulty(self.difficulty)
        self.board = [[0] * cols for _ in range(rows)]  # rows x cols tile values, 0 = empty
        self.terminated = False
        self.score = 0.0
        self.steps = 0
        self._spawn()
        self._spawn()
        self._legal: dict[int, tuple[list[list[int]], int]] | None = None  # see _moves

    def set_board(self, board: Sequence[Sequence[int]]) -> None:
        """Replaces the board with a hand-made one (tests, curricula); the episode goes on from it.

        Args:
            board: rows x cols tile values, each 0 (empty) or a power of two >= 2.
        """
        rows, cols = self.difficulty["rows"], self.difficulty["cols"]
        values = [[int(v) for v in row] for row in board]
        shape_ok = len(values) == rows and all(len(row) == cols for row in values)
        if not shape_ok or any(v and (v < 2 or v & (v - 1)) for row in values for v in row):
            raise ValueError(f"board must be {rows} x {cols} values, each 0 or a power of two >= 2; got {values}")
        self.board, self._legal = values, None
        self.terminated = not self.legal_actions()

    def _spawn(self) -> None:
        empty = [(r, c) for r, row in enumerate(self.board) for c, v in enumerate(row) if v == 0]
        r, c = empty[self.rng.integers(len(empty))]
        self.board[r][c] = 2 if self.rng.random() < 0.9 else 4

    # ---- actions -----------------------------------------------------------------------------------------------------
    def _moves(self) -> dict[int, tuple[list[list[int]], int]]:
        """The board and merge score after each move that changes the board (computed once per board)."""
        if self._legal is None:
            results = {a: apply_move(self.board, a) for a in range(4)}
            self._legal = {a: result for a, result in results.items() if result[0] != self.board}
        return self._legal

    def legal_actions(self) -> list[int]:
        return [] if self.terminated else list(self._moves())

    def expert_move(self) -> ExpertMove:
        """The `expert` knob's choice: two-move expectimax over the spawns with a line heuristic (empty cells, merges,
        monotone rows and columns), or the corner rule (the first move of CORNER_ORDER that changes the board).

        Raises:
            ValueError: the episode is over (no legal move).
        """
        moves = self._moves() if not self.terminated else {}
        if not moves:
            raise ValueError("2048: the episode is over; there is no move to choose")
        if self.difficulty["expert"] == "corner":
            # Its reason is the check itself, move by move in the rule's order, so that a student writes out the one
            # question each answer depends on (does this move change the board?) before answering.
            action = next(a for a in CORNER_ORDER if a in moves)
            tried = CORNER_ORDER[: CORNER_ORDER.index(action)]
            checks = [f"{ACTIONS[a]} blocked" for a in tried] + [f"{ACTIONS[action]} moves"]
            order = ", ".join(ACTIONS[a] for a in CORNER_ORDER)
            return ExpertMove(action, f"Try {order} in turn: {', '.join(checks)}.")
        values = expectimax_values(self.board, moves)
        action = max(values, key=values.get)
        # Short on purpose: the legal moves (what a small model must read off the board to answer validly) and the
        # choice; a longer account (empty cells, the largest tile's corner) doubled the response the tiny model
        # learns and samples (72 think tokens, not 36), and it read the board no better for it (held-out cells read
        # right after 300 SFT steps: 0.43 with the long account, 0.46 with this one).
        gained = moves[action][1]
        merge = f"merging tiles for +{gained}" if gained else "merging nothing"
        legal = ", ".join(ACTIONS[a] for a in sorted(moves))
        return ExpertMove(
            action, f"Legal moves: {legal}. Best two moves ahead, big tiles bottom-left: {ACTIONS[action]}, {merge}."
        )

    def parse_answer(self, answer: str) -> int | None:
        word = answer.strip().strip(".!\"'`()[]{}").strip().lower()
        if word in ACTIONS:
            return ACTIONS.index(word)
        if word in ("0", "1", "2", "3"):
            return int(word)
        return None

    def format_action(self, action: int) -> str:
        return ACTIONS[action]

    def step(self, action: Any) -> StepResult:
        valid = isinstance(action, (int, np.integer)) and not isinstance(action, bool)
        if self.terminated or not valid or action not in self._moves():
            return StepResult(self.invalid_penalty, self.terminated, {"valid": False})
        self.board, gained = self._moves()[int(action)]
        self.score += gained
        self.steps += 1
        self._spawn()
        self._legal = None
        self.terminated = not self.legal_actions()
        reward = 1.0 if gained > 0 else -1.0
        return StepResult(reward, self.terminated, {"valid": True, "merged": gained > 0, "score_gain": gained})

    # ---- observation -------------------------------------------------------------------------------------------------
    def text_observation(self) -> str:
        return "\n".join("|".join(str(v) if v else EMPTY for v in row) for row in self.board)

    def render_array(self) -> np.ndarray:
        """(H, W, 3) uint8 frame; the fast path (no PIL image)."""
        renderer = cached_renderer(len(self.board), len(self.board[0]), self._style, "2048")
        photo_dir = self.difficulty["photo_dir"]
        cells = [[_tile(v, photo_dir) if v else None for v in row] for row in self.board]
        return renderer.draw_array(cells, caption=f"Score: {int(self.score)}", noise_seed=self.seed + self.steps)

    @property
    def prompt(self) -> str:
        rows, cols = self.difficulty["rows"], self.difficulty["cols"]
        example = "\n".join(
            "|".join(["2", "-", "4", "-", "8", "-", "16", "-"][(r + c) % 8] for c in range(cols)) for r in range(rows)
        )
        return (
            f"You are playing 2048 on a grid of {rows} rows and {cols} columns (row 0 at the top, column 0 at the "
            "left). Each move slides every tile as far as it can go in one direction: up, right, down or left. Two "
            "tiles of the same value that meet merge into one tile of their sum; a tile merges at most once per move. "
            "After every move that changes the board, a new 2 or 4 appears on a random empty cell. A move that changes "
            "nothing is invalid. The game ends when no move changes the board. You get +1 for a move that merges "
            "tiles and -1 otherwise.\n\n"
            "First describe the board inside <perception></perception>: one line per row from top to bottom, cells "
            "separated by |, tile values as numbers and empty cells as -. For example:\n"
            f"<perception>\n{example}\n</perception>\n"
            "Then reason about the best move inside <think></think>. Finally give the move inside <answer></answer> "
            "as one word, up, right, down or left (or its number 0, 1, 2, 3), e.g. <answer>left</answer>."
        )


@functools.lru_cache(maxsize=1024)
def _tile(value: int, photo_dir: str | None) -> Tile:
    """The tile of a value: the number on a colour of its own (cycling through COLOURS), or on a photo."""
    level = value.bit_length() - 2  # 2 -> 0, 4 -> 1, ...
    photo = level % photo_class_count(photo_dir) if photo_dir else None
    return Tile(colour=level % len(COLOURS), text=str(value), photo_class=photo)
