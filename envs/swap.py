"""Swap (match-3): swap two adjacent tiles to line up three or more equal tiles.

Rules (G1's Swap): tiles are (colour, shape) pairs, equal only when both agree. A swap is made only if it lines up
3+ equal tiles in a row or column; those clear, the tiles above fall, new tiles (from the game's rng) drop in from the
top, and the new lines that form clear in turn (cascades). The start board has no ready-made lines, and a board left
with no scoring swap is reshuffled (its tiles permuted until a scoring swap exists and nothing lines up by itself).

Training reward: +1 for a scoring swap, else -1 (a non-adjacent, off-board or non-scoring swap leaves the board as it
was). Score: tiles cleared, cascades included. Swap has no natural end, so an episode lasts `max_moves` steps.

Expert (`expert_move`): the scoring swap that clears the most tiles that can be seen (`visible_clears`: cascades of
the tiles on the board, the new tiles counted as unknown), ties to the lowest swap. Most swaps clear exactly 3 tiles,
so the margin is small: ~7% more tiles than random legal swaps over 100 moves. Peeking at the real refills (the
game's rng) or looking a second swap ahead gains nothing more on the default board.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from envs.base import ExpertMove, Game, Knob, StepResult, int_in
from envs.render import COLOURS, PERCEPTION_KNOBS, SHAPES, Style, Tile, cached_renderer, photo_class_count

Cell = tuple[int, int]
Action = tuple[Cell, Cell]  # ((r1, c1), (r2, c2)) with (r1, c1) < (r2, c2)
_PAIR = re.compile(r"\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)")
_RESHUFFLE_TRIES = 100


def find_matches(board: np.ndarray) -> np.ndarray:
    """(rows, cols) bool mask of the tiles in horizontal or vertical lines of 3+ equal tiles."""
    mask = np.zeros(board.shape, dtype=bool)
    for grid, out in ((board, mask), (board.T, mask.T)):  # rows, then columns through the transposed views
        three = (grid[:, :-2] == grid[:, 1:-1]) & (grid[:, 1:-1] == grid[:, 2:])  # (R, C-2): a line starts here
        for offset in range(3):
            out[:, offset : offset + three.shape[1]] |= three
    return mask


def scoring_swaps(board: np.ndarray) -> list[Action]:
    """Every adjacent swap that lines up 3+ equal tiles, in row-major order of the first cell (right before down).

    Vectorized over the board: a tile moved one step in direction d lands on t; it makes a line if the two cells
    beyond t along d equal it, or two cells next to t across d do (one on each side, or two on one side). Only
    those cells matter, and none of them is the other swapped cell, so the board before the swap can be read.
    """
    rows, cols = board.shape
    pad = np.pad(board, 3, constant_values=-1)  # tiles are >= 0, so the padding never matches

    def at(dr: int, dc: int) -> np.ndarray:  # (rows, cols): the tile at (r + dr, c + dc) for each cell (r, c)
        return pad[3 + dr : 3 + dr + rows, 3 + dc : 3 + dc + cols]

    def makes_line(dr: int, dc: int) -> np.ndarray:  # (rows, cols) bool: moving the tile at (r, c) by (dr, dc)
        er, ec = dc, dr  # across the move
        same = {k: at(dr + k * er, dc + k * ec) == board for k in (-2, -1, 1, 2)}
        ahead = (at(2 * dr, 2 * dc) == board) & (at(3 * dr, 3 * dc) == board)
        return ahead | (same[-1] & same[-2]) | (same[-1] & same[1]) | (same[1] & same[2])

    found = np.zeros((rows, cols, 2), dtype=bool)  # [r, c, 0]: swap with the right neighbour; [r, c, 1]: below
    differ_h = board[:, :-1] != board[:, 1:]
    differ_v = board[:-1, :] != board[1:, :]
    found[:, :-1, 0] = differ_h & (makes_line(0, 1)[:, :-1] | makes_line(0, -1)[:, 1:])
    found[:-1, :, 1] = differ_v & (makes_line(1, 0)[:-1, :] | makes_line(-1, 0)[1:, :])
    return [((r, c), (r, c + 1) if k == 0 else (r + 1, c)) for r, c, k in np.argwhere(found).tolist()]


def resolve(board: np.ndarray, fresh: Callable[[int], np.ndarray]) -> tuple[int, int]:
    """Clears lines, drops tiles and refills, in place, until nothing lines up; returns (tiles cleared, waves).

    Args:
        board: (rows, cols) tile types, changed in place.
        fresh: n -> (n,) the new tiles that drop into the top of a column, top to bottom.
    """
    cleared = waves = 0
    while True:
        mask = find_matches(board)
        if not mask.any():
            return cleared, waves
        cleared += int(mask.sum())
        waves += 1
        rows = board.shape[0]
        for c in np.flatnonzero(mask.any(axis=0)).tolist():
            kept = board[~mask[:, c], c]  # survivors of the column, top to bottom
            board[:, c] = np.concatenate([fresh(rows - len(kept)), kept])


def visible_clears(board: np.ndarray, action: Action) -> tuple[int, int]:
    """(tiles cleared, waves) of a swap counting only the tiles on the board: new tiles are unknown, none matches.

    What a player can work out from the board alone (the game's rng decides what drops in), and the expert's measure.
    """
    (r1, c1), (r2, c2) = action
    board = board.copy()
    board[r1, c1], board[r2, c2] = board[r2, c2], board[r1, c1]
    unknown = itertools.count(-1, -1)  # distinct negative stand-ins: never equal to each other or to a tile
    return resolve(board, lambda n: np.fromiter(itertools.islice(unknown, n), dtype=board.dtype, count=n))


class Swap(Game):
    """Match-3 on a rows x cols board of n_colours x n_shapes tile types; an action swaps two adjacent cells."""

    name: ClassVar[str] = "swap"
    knobs: ClassVar[dict[str, Knob]] = {
        **PERCEPTION_KNOBS,
        "rows": Knob(8, int_in(3, 16), "board rows"),
        "cols": Knob(8, int_in(3, 16), "board columns"),
        "n_colours": Knob(4, int_in(1, len(COLOURS)), "tile colours (the first n of render.COLOURS)"),
        "n_shapes": Knob(3, int_in(1, len(SHAPES)), "tile shapes (the first n of render.SHAPES)"),
        "max_moves": Knob(100, int_in(1, 100_000), "steps per episode"),
    }
    invalid_penalty: ClassVar[float] = -1.0

    @classmethod
    def check_combination(cls, values: dict[str, Any]) -> dict[str, Any]:
        if values["n_colours"] * values["n_shapes"] < 3:
            raise ValueError(
                "swap: difficulty keys 'n_colours' x 'n_shapes' must give at least 3 tile types (a board without "
                f"ready-made lines needs 3); got {values['n_colours']} x {values['n_shapes']}"
            )
        style = Style.from_difficulty(values)  # 'photo' needs a photo_dir
        cached_renderer(
            values["rows"], values["cols"], style, "Swap"
        )  # fails now if the image is too small for the board
        n_types = values["n_colours"] * values["n_shapes"]
        if style.icon_style == "photo" and photo_class_count(style.photo_dir) < n_types:
            raise ValueError(
                f"swap: difficulty key 'photo_dir' must have a class subfolder per tile type ('n_colours' x "
                f"'n_shapes' = {n_types}); {style.photo_dir!r} has {photo_class_count(style.photo_dir)}"
            )
        return values

    @property
    def n_types(self) -> int:
        return self.difficulty["n_colours"] * self.difficulty["n_shapes"]

    def reset(self) -> None:
        self._style = Style.from_difficulty(self.difficulty)
        self.terminated = False
        self.score = 0.0
        self.steps = 0
        self.board = self._new_board()  # (rows, cols) int tile types; type t = colour t // n_shapes, shape t % n_shapes
        self._legal = scoring_swaps(self.board)
        if not self._legal:
            self._reshuffle()

    def set_board(self, board: np.ndarray) -> None:
        """Replaces the board with a hand-made one (tests, curricula), reshuffled if it has no scoring swap.

        Args:
            board: (rows, cols) ints, tile types in [0, n_colours * n_shapes), with no line of 3 already.
        """
        board = np.array(board, dtype=np.int64)
        shape = (self.difficulty["rows"], self.difficulty["cols"])
        if board.shape != shape or board.min() < 0 or board.max() >= self.n_types or find_matches(board).any():
            raise ValueError(f"board must be {shape} ints in [0, {self.n_types}) with no line of 3; got {board}")
        self.board = board
        self._legal = scoring_swaps(board)
        if not self._legal:
            self._reshuffle()

    def _new_board(self) -> np.ndarray:
        """A random board with no line of 3 (each cell avoids the type that would complete one to its left or above)."""
        rows, cols = self.difficulty["rows"], self.difficulty["cols"]
        board = np.zeros((rows, cols), dtype=np.int64)
        for r in range(rows):
            for c in range(cols):
                banned = set()
                if c >= 2 and board[r, c - 1] == board[r, c - 2]:
                    banned.add(board[r, c - 1])
                if r >= 2 and board[r - 1, c] == board[r - 2, c]:
                    banned.add(board[r - 1, c])
                allowed = [t for t in range(self.n_types) if t not in banned]
                board[r, c] = allowed[self.rng.integers(len(allowed))]
        return board

    def _reshuffle(self) -> None:
        """Permutes the tiles until a scoring swap exists and nothing lines up; a fresh board if that keeps failing."""
        for _ in range(_RESHUFFLE_TRIES):
            board = self.rng.permutation(self.board.ravel()).reshape(self.board.shape)
            if not find_matches(board).any():
                legal = scoring_swaps(board)
                if legal:
                    self.board, self._legal = board, legal
                    return
        for _ in range(_RESHUFFLE_TRIES):
            board = self._new_board()
            legal = scoring_swaps(board)
            if legal:
                self.board, self._legal = board, legal
                return
        raise ValueError(
            "swap: found no board with a scoring swap; use fewer tile types (difficulty keys 'n_colours', "
            "'n_shapes') or a larger board ('rows', 'cols')"
        )

    # ---- actions -----------------------------------------------------------------------------------------------------
    def legal_actions(self) -> list[Action]:
        return [] if self.terminated else list(self._legal)

    def expert_move(self) -> ExpertMove:
        """The scoring swap that clears the most tiles that can be seen (`visible_clears`); ties go to the lowest
        swap, where more tiles fall and unseen cascades are likelier.

        Raises:
            ValueError: the episode is over.
        """
        if self.terminated:
            raise ValueError("swap: the episode is over; there is no swap to choose")
        clears = {action: visible_clears(self.board, action) for action in self._legal}
        action = max(self._legal, key=lambda a: (clears[a][0], a[1][0]))
        cleared, waves = clears[action]
        cascade = f" in {waves} waves" if waves > 1 else ""
        tied = sum(c == cleared for c, _ in clears.values()) > 1
        rank = "tied for the most, and the lowest of those swaps (more tiles fall)" if tied else "the most of any swap"
        reason = (
            f"{len(clears)} swaps line up tiles. Swapping {self.format_action(action)} clears {cleared} of the tiles "
            f"on the board{cascade}: {rank}."
        )
        return ExpertMove(action, reason)

    def parse_answer(self, answer: str) -> Action | None:
        pairs = _PAIR.findall(answer)
        if len(pairs) != 2:
            return None
        a, b = ((int(r), int(c)) for r, c in pairs)
        return (a, b) if a <= b else (b, a)

    def format_action(self, action: Action) -> str:
        (r1, c1), (r2, c2) = action
        return f"({r1}, {c1}) ({r2}, {c2})"

    def step(self, action: Any) -> StepResult:
        if self.terminated or not isinstance(action, tuple) or action not in self._legal:
            return StepResult(self.invalid_penalty, self.terminated, {"valid": False})
        (r1, c1), (r2, c2) = action
        board = self.board
        board[r1, c1], board[r2, c2] = board[r2, c2], board[r1, c1]
        cleared, waves = resolve(board, lambda n: self.rng.integers(self.n_types, size=n))
        self.score += cleared
        self.steps += 1
        self._legal = scoring_swaps(self.board)
        if not self._legal:
            self._reshuffle()
        self.terminated = self.steps >= self.difficulty["max_moves"]
        return StepResult(1.0, self.terminated, {"valid": True, "cleared": cleared, "cascades": waves - 1})

    # ---- observation -------------------------------------------------------------------------------------------------
    def tile_name(self, t: int) -> str:
        n_shapes = self.difficulty["n_shapes"]
        return f"{COLOURS[t // n_shapes][0]} {SHAPES[t % n_shapes]}"

    def text_observation(self) -> str:
        return "\n".join("|".join(self.tile_name(t) for t in row) for row in self.board.tolist())

    def render_array(self) -> np.ndarray:
        """(H, W, 3) uint8 frame; the fast path (no PIL image)."""
        rows, cols = self.board.shape
        tiles = _tiles(self.difficulty["n_colours"], self.difficulty["n_shapes"], self.difficulty["photo_dir"])
        cells = [[tiles[t] for t in row] for row in self.board.tolist()]
        renderer = cached_renderer(rows, cols, self._style, "Swap")
        return renderer.draw_array(cells, caption=f"Score: {int(self.score)}", noise_seed=self.seed + self.steps)

    @property
    def prompt(self) -> str:
        rows, cols = self.board.shape
        n_shapes, n_colours = self.difficulty["n_shapes"], self.difficulty["n_colours"]
        colours = ", ".join(name for name, _ in COLOURS[:n_colours])
        shapes = ", ".join(SHAPES[:n_shapes])
        example = "\n".join(
            "|".join(self.tile_name((r * 2 + c) % self.n_types) for c in range(min(cols, 3))) for r in range(2)
        )
        return (
            f"You are playing Swap, a match-3 game, on a grid of {rows} rows and {cols} columns (row 0 at the top, "
            f"column 0 at the left). Every tile has a colour ({colours}) and a shape ({shapes}); two tiles are equal "
            "only when both agree. Swap two tiles that are next to each other (left-right or up-down) so that 3 or "
            "more equal tiles line up in a row or a column. Lined-up tiles disappear, the tiles above fall down, new "
            "tiles drop in from the top, and new lines clear too. You get +1 for a swap that lines up tiles and -1 for "
            "any other swap (the board then stays as it was).\n\n"
            f"First describe the whole board inside <perception></perception>: {rows} lines, one per row from top to "
            f"bottom, each with {cols} cells separated by |, each tile as its colour and shape. For example, the "
            f"top-left corner of a board (2 rows, 3 columns) would read:\n<perception>\n{example}\n</perception>\n"
            "Then reason about which swap lines up tiles inside <think></think>. Finally give the two cells to swap "
            "inside <answer></answer> as (row, column) pairs, e.g. <answer>(2, 3) (2, 4)</answer>."
        )


@functools.lru_cache(maxsize=64)
def _tiles(n_colours: int, n_shapes: int, photo_dir: str | None) -> tuple[Tile, ...]:
    """The Tile of each tile type: its colour and shape, and a photo class per type when photos are used."""
    n_photo = photo_class_count(photo_dir) if photo_dir else 0  # check_combination ensured enough with 'photo'
    return tuple(
        Tile(colour=t // n_shapes, shape=t % n_shapes, photo_class=t if n_photo > t else None)
        for t in range(n_colours * n_shapes)
    )
