"""Shisen-Sho: remove pairs of equal tiles that can be joined by a path of at most two turns.

Rules (G1's Shisen-Sho): a `rows` x `cols` board (6 x 6 by default) of tiles; a tile type is a (colour, shape), and
each type in play appears exactly 4 times. An action names two tiles, `(r1, c1) (r2, c2)`, 0-indexed from the top
left. It scores +1 and removes both tiles when they are of the same type and can be joined by a path of horizontal
and vertical segments with at most two turns through empty cells, where the path may leave the board by one cell
around its border; anything else scores -1 and leaves the board unchanged. The episode ends when the board is empty
or no pair can be joined. Score: the number of pairs removed.

Tile types: with C = n_colours and S = n_shapes, type t has colour t % C and shape (t // C + t) % S, a bijection of
the C x S types that runs along diagonals, so that a small board (it uses the first rows * cols / 4 types) still
shows every colour and shape. Deals are random; a deal without any joinable pair is dealt again (deals are not
guaranteed to be solvable to the end).
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from envs.base import Game, Knob, StepResult, int_in
from envs.render import COLOURS, PERCEPTION_KNOBS, SHAPES, BoardRenderer, Style, Tile, photo_class_count

EMPTY = -1  # board value of an empty cell
EMPTY_TEXT = "-"
Pair = tuple[tuple[int, int], tuple[int, int]]  # ((r1, c1), (r2, c2)), the first cell first in row-major order
_CELL = r"[(\[]\s*(\d{1,3})\s*,\s*(\d{1,3})\s*[)\]]"
# Each optional separator owns the spaces after it, so that no two `\s*` meet: no slow backtracking on junk.
_PAIR_RE = re.compile(rf"\s*{_CELL}\s*(?:(?:,|;|&|and|to|->|-|with)\s*)?{_CELL}\s*(?:\.\s*)?", re.IGNORECASE)


def tile_type(t: int, n_colours: int, n_shapes: int) -> tuple[int, int]:
    """(colour, shape) of tile type t: along diagonals, so that the first types vary in both colour and shape."""
    return t % n_colours, (t // n_colours + t) % n_shapes


def _via_rows(filled: np.ndarray, ar: np.ndarray, ac: np.ndarray, br: np.ndarray, bc: np.ndarray) -> np.ndarray:
    """Whether a path down/up, along some row k, then up/down joins each pair a -> b through empty cells.

    Args:
        filled: (n, m) bool, True where a tile is (the caller pads the board with a ring of empty cells).
        ar, ac, br, bc: (P,) coordinates of the two tiles of each pair.

    Returns:
        (P,) bool. Straight lines and single turns are the cases where row k is a's or b's own row.
    """
    n, m = filled.shape
    k = np.arange(n)
    # up[r, c] / down[r, c]: first / last row of the run of empty cells through column c that (r, c) can reach
    # vertically (the cell itself counts as the run's member even when it holds a tile).
    above = np.maximum.accumulate(np.where(filled, k[:, None], -1), axis=0)  # (n, m) last filled row <= r
    below = np.minimum.accumulate(np.where(filled, k[:, None], n)[::-1], axis=0)[::-1]  # (n, m) first filled >= r
    up = np.vstack([np.full((1, m), -1), above[:-1]]) + 1
    down = np.vstack([below[1:], np.full((1, m), n)]) - 1
    lo = np.maximum(up[ar, ac], up[br, bc])  # (P,) rows both tiles reach
    hi = np.minimum(down[ar, ac], down[br, bc])
    # prefix[k, c]: filled cells of row k in columns < c; between: filled cells strictly between the two columns
    # (for a pair in one column this is -filled[k, c] <= 0: a vertical path has no horizontal part to check).
    prefix = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(filled, axis=1)], axis=1)  # (n, m + 1)
    c1, c2 = np.minimum(ac, bc), np.maximum(ac, bc)
    between = prefix[k[None, :], c2[:, None]] - prefix[k[None, :], c1[:, None] + 1]  # (P, n)
    ok = (between <= 0) & (k[None, :] >= lo[:, None]) & (k[None, :] <= hi[:, None])
    return ok.any(axis=1)


def connectable_pairs(board: np.ndarray) -> np.ndarray:
    """Every pair of same-type tiles joinable by a path of at most two turns (leaving the board by one cell at most).

    Args:
        board: (rows, cols) ints, tile type or EMPTY.

    Returns:
        (P, 4) int64 rows (r1, c1, r2, c2), the first cell first in row-major order, pairs in lexicographic order.
    """
    cols = board.shape[1]
    flat = board.ravel()
    idx = np.flatnonzero(flat != EMPTY)  # (N,) cells holding a tile, row-major
    types = flat[idx]
    i, j = np.nonzero(types[:, None] == types[None, :])  # same type; row-major, so i < j puts the first cell first
    i, j = i[i < j], j[i < j]
    ar, ac = np.divmod(idx[i], cols)
    br, bc = np.divmod(idx[j], cols)
    filled = np.pad(board != EMPTY, 1)  # the ring of empty cells that paths may use around the border
    # Every path of at most two turns is vertical-horizontal-vertical or horizontal-vertical-horizontal
    # (segments may be empty): check both, the second on the transposed board.
    ok = _via_rows(filled, ar + 1, ac + 1, br + 1, bc + 1) | _via_rows(filled.T, ac + 1, ar + 1, bc + 1, br + 1)
    return np.stack([ar, ac, br, bc], axis=1)[ok]


@functools.lru_cache(maxsize=64)
def _type_views(
    n_colours: int, n_shapes: int, n_types: int, photo_classes: int
) -> tuple[tuple[Tile | None, ...], tuple[str, ...]]:
    """(tile, text) of each type; both end with the empty cell's, so that index EMPTY (-1) picks it."""
    tiles, words = [], []
    for t in range(n_types):
        colour, shape = tile_type(t, n_colours, n_shapes)
        tiles.append(Tile(colour=colour, shape=shape, photo_class=t if photo_classes else None))
        words.append(f"{COLOURS[colour][0]} {SHAPES[shape]}")
    return (*tiles, None), (*words, EMPTY_TEXT)


_renderer = functools.lru_cache(maxsize=32)(BoardRenderer)  # building one draws the background: games share it


class ShisenSho(Game):
    """Shisen-Sho; an action is a `Pair` of cells; see the module docstring."""

    name: ClassVar[str] = "shisen_sho"
    knobs: ClassVar[dict[str, Knob]] = {
        **PERCEPTION_KNOBS,
        "rows": Knob(6, int_in(2, 20), "board rows"),
        "cols": Knob(6, int_in(2, 20), "board columns"),
        "n_colours": Knob(6, int_in(1, len(COLOURS)), "tile colours (a perception knob)"),
        "n_shapes": Knob(6, int_in(1, len(SHAPES)), "tile shapes (a perception knob)"),
    }
    invalid_penalty: ClassVar[float] = -1.0

    @classmethod
    def check_combination(cls, values: dict[str, Any]) -> dict[str, Any]:
        rows, cols, n_colours, n_shapes = values["rows"], values["cols"], values["n_colours"], values["n_shapes"]
        cells = rows * cols
        if cells % 4:
            raise ValueError(
                f"{cls.name}: difficulty keys 'rows' x 'cols' must give a cell count divisible by 4 (every tile type "
                f"appears 4 times); got {rows} x {cols} = {cells}"
            )
        if cells > 4 * n_colours * n_shapes:
            raise ValueError(
                f"{cls.name}: a {rows} x {cols} board needs {cells // 4} tile types, but difficulty keys 'n_colours' "
                f"x 'n_shapes' give {n_colours} x {n_shapes} = {n_colours * n_shapes}: raise them or shrink 'rows' "
                "x 'cols'"
            )
        if (
            values["icon_style"] == "photo"
            and values["photo_dir"]
            and photo_class_count(values["photo_dir"]) < cells // 4
        ):
            raise ValueError(
                f"{cls.name}: a {rows} x {cols} board needs {cells // 4} tile types, but difficulty key 'photo_dir' "
                f"has {photo_class_count(values['photo_dir'])} classes: add classes or shrink 'rows' x 'cols'"
            )
        cls._make_renderer(values)  # fails early when the image is too small or 'photo' has no photo_dir
        return values

    @staticmethod
    def _make_renderer(difficulty: dict[str, Any]) -> BoardRenderer:
        return _renderer(difficulty["rows"], difficulty["cols"], Style.from_difficulty(difficulty), "Shisen-Sho")

    # ---- state -------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        rows, cols = self.difficulty["rows"], self.difficulty["cols"]
        self.removed = 0
        self.terminated = False
        self.score = 0.0
        self.steps = 0
        tiles = np.repeat(np.arange(rows * cols // 4, dtype=np.int16), 4)  # the first rows * cols / 4 types
        while True:  # re-deal the rare board where no pair can be joined
            self.board = self.rng.permutation(tiles).reshape(rows, cols)  # (rows, cols) tile type or EMPTY
            self._pairs = connectable_pairs(self.board)  # (P, 4) the legal actions, kept up to date by step
            if len(self._pairs):
                return

    def set_board(self, board: np.ndarray) -> None:
        """Replaces the board with a hand-made one (tests, curricula); the episode goes on from it.

        Args:
            board: (rows, cols) ints: a tile type in [0, n_colours * n_shapes) or EMPTY (-1).
        """
        board = np.asarray(board)
        n_types = self.difficulty["n_colours"] * self.difficulty["n_shapes"]
        if board.shape != self.board.shape or board.min(initial=0) < EMPTY or board.max(initial=0) >= n_types:
            raise ValueError(f"board must be {self.board.shape} ints in [-1, {n_types}); got {board.shape}")
        self.board = board.astype(np.int16)
        self._pairs = connectable_pairs(self.board)
        self.terminated = len(self._pairs) == 0

    # ---- actions -----------------------------------------------------------------------------------------------------
    def legal_actions(self) -> list[Pair]:
        if self.terminated:
            return []
        return [((r1, c1), (r2, c2)) for r1, c1, r2, c2 in self._pairs.tolist()]

    def parse_answer(self, answer: str) -> Pair | None:
        match = _PAIR_RE.fullmatch(answer)
        if not match:
            return None
        r1, c1, r2, c2 = (int(g) for g in match.groups())
        return _ordered((r1, c1), (r2, c2))

    def format_action(self, action: Pair) -> str:
        (r1, c1), (r2, c2) = action
        return f"({r1}, {c1}) ({r2}, {c2})"

    def step(self, action: Any) -> StepResult:
        pair = _as_pair(action)
        legal = (
            pair is not None and not self.terminated and bool((self._pairs == [*pair[0], *pair[1]]).all(axis=1).any())
        )
        if not legal:
            return StepResult(self.invalid_penalty, self.terminated, {"valid": False})
        (r1, c1), (r2, c2) = pair
        self.board[r1, c1] = self.board[r2, c2] = EMPTY
        self._pairs = connectable_pairs(self.board)
        self.terminated = len(self._pairs) == 0
        self.removed += 1
        self.score += 1
        self.steps += 1
        cleared = not (self.board != EMPTY).any()
        return StepResult(1.0, self.terminated, {"valid": True, "cleared": cleared})

    # ---- observation -------------------------------------------------------------------------------------------------
    def _views(self) -> tuple[tuple[Tile | None, ...], tuple[str, ...]]:
        d = self.difficulty
        photo_classes = photo_class_count(d["photo_dir"]) if d["icon_style"] == "photo" and d["photo_dir"] else 0
        return _type_views(d["n_colours"], d["n_shapes"], d["n_colours"] * d["n_shapes"], photo_classes)

    def text_observation(self) -> str:
        words = self._views()[1]
        return "\n".join("|".join(words[v] for v in row) for row in self.board.tolist())

    def render_array(self) -> np.ndarray:
        """(H, W, 3) uint8 frame; the fast path (no PIL image)."""
        tiles = self._views()[0]
        cells = [[tiles[v] for v in row] for row in self.board.tolist()]
        caption = f"Pairs removed: {self.removed}"
        return self._make_renderer(self.difficulty).draw_array(
            cells, caption=caption, noise_seed=self.seed + self.steps
        )

    def render(self) -> Image.Image:
        return Image.fromarray(self.render_array())

    @property
    def prompt(self) -> str:
        rows, cols = self.board.shape
        words = self._views()[1]
        example = "\n".join(
            "|".join(
                EMPTY_TEXT if (r + c) % 3 == 0 else words[(r * cols + c) % (rows * cols // 4)] for c in range(cols)
            )
            for r in range(min(rows, 2))
        )
        return (
            f"You are playing Shisen-Sho on a board of {rows} rows x {cols} columns (row 0 at the top, column 0 at "
            "the left; the numbers are drawn on the image). Each tile shows a shape in a colour, and its type is the "
            "pair (colour, shape); every type appears 4 times. Choose two tiles of the same type that can be joined "
            "by a path of horizontal and vertical lines with at most two turns, passing only through empty cells; "
            "the path may go outside the board, by one cell, around its border. Both tiles are then removed and you "
            "get +1; any other choice gets -1 and changes nothing. The game ends when the board is empty or no pair "
            "can be joined.\n\n"
            "First describe the board inside <perception></perception>: one line per row from top to bottom, cells "
            f"separated by |, each tile as its colour and shape (e.g. 'red circle') and an empty cell as "
            f"{EMPTY_TEXT}. For example, the first rows could read:\n{example}\n"
            "Then reason about which pair to remove inside <think></think>. Finally give the two tiles inside "
            "<answer></answer> as (row, column) pairs, for example <answer>(0, 1) (3, 1)</answer>."
        )


def _ordered(a: tuple[int, int], b: tuple[int, int]) -> Pair:
    return (a, b) if a <= b else (b, a)


def _as_pair(action: Any) -> Pair | None:
    """The action as a canonical Pair of Python ints, or None when it is not two (row, col) cells."""
    try:
        (r1, c1), (r2, c2) = action
        cells = [r1, c1, r2, c2]
    except (TypeError, ValueError):
        return None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in cells):
        return None
    return _ordered((int(r1), int(c1)), (int(r2), int(c2)))
