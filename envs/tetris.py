"""Tetris: one decision places one piece, named by its rotation and column; scored as lmgame-Bench scores Tetris.

Rules: a board of `rows` x `cols` (20 x 10 by default), the tetrominoes of `piece_set` (default all seven,
"IOTSZJL") dealt by a 7-bag randomizer (each bag is a random permutation of the piece set, dealt in order), a
preview of the next `preview` pieces, and line clears (a full row disappears and the rows above move down).

A piece appears at the top, centred (columns 3-6 of 10 for I, 4-5 for O, 3-5 for the others), in the spawn
orientation of the Super Rotation System. The answer `rotate R, column C` turns it R quarter turns clockwise at the
top (R = 3 is one counter-clockwise turn), slides it sideways until its leftmost cell is in column C, and drops it
straight down. Rotations have no wall kicks: a rotation that would overlap a wall or a block is refused, and so is a
slide into one; an answer whose path is refused is illegal. Rotations that give the same shape give the same
placements, so only the smallest of them is canonical (I, S and Z have rotations 0 and 1, O only 0): `rotate 2` of
an S parses to `rotate 0`. `legal_actions` lists every distinct reachable (rotation, column) placement.

lmgame-Bench's move sequences are accepted too, e.g. `(move_left,2)(rotate_clockwise,1)(hard_drop,1)`, with the
actions move_left, move_right, rotate_clockwise, rotate_counterclockwise, soft_drop and hard_drop and a repeat count
each. They are simulated from the spawn position with the same wall and collision checks (a refused move does
nothing, as a key press against a wall does); the sequence ends at its first hard_drop (or its end), and the answer is
the placement given by the rotation and leftmost column the piece then has.

The game is over when the next piece has no room to appear, or a piece comes to rest partly above the board.

Rewards (lmgame-Bench):

| event                        | training reward (`StepResult.reward`) | benchmark score (`score`) |
|------------------------------|---------------------------------------|---------------------------|
| piece placed                 | +1                                    | +1                        |
| each line cleared            | +10                                   | +1                        |
| unreadable or illegal answer | -1, board unchanged                   | 0                         |
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from envs.base import Game, Knob, StepResult, int_in
from envs.render import COLOURS, PERCEPTION_KNOBS, BoardRenderer, Style, Tile, cached_renderer, photo_class_count

PIECES = "IOTSZJL"
# Spawn orientation (rotation 0) of each piece in its rotation box (SRS): (box size, (row, col) cells).
_SPAWN_SHAPES: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {
    "I": (4, ((1, 0), (1, 1), (1, 2), (1, 3))),
    "O": (2, ((0, 0), (0, 1), (1, 0), (1, 1))),
    "T": (3, ((0, 1), (1, 0), (1, 1), (1, 2))),
    "S": (3, ((0, 1), (0, 2), (1, 0), (1, 1))),
    "Z": (3, ((0, 0), (0, 1), (1, 1), (1, 2))),
    "J": (3, ((0, 0), (1, 0), (1, 1), (1, 2))),
    "L": (3, ((0, 2), (1, 0), (1, 1), (1, 2))),
}
# The Tetris Guideline colours, in PIECES order; with n_colours = k, piece i takes colour i % k of this list.
_GUIDELINE_COLOURS = ("cyan", "yellow", "purple", "green", "red", "blue", "orange")
FILLED, EMPTY = "#", "-"
_MOVES = ("move_left", "move_right", "rotate_clockwise", "rotate_counterclockwise", "soft_drop", "hard_drop")
# Answer forms: "rotate 1, column 4" (either order, loose spacing); a move sequence "(move_left,2)(hard_drop,1)".
# Each optional separator owns the spaces after it, so that no two `\s*` meet: no slow backtracking on junk.
_ROTATE = r"rotat(?:e|ion)?\s*(?:[:=]\s*)?(?P<rot>\d{1,3})"
_COLUMN = r"col(?:umn)?\s*(?:[:=]\s*)?(?P<col>\d{1,3})"
_AND = r"\s*(?:[,;]\s*)?(?:and\s+)?"
_PLACEMENT_RES = tuple(
    re.compile(rf"\s*{first}{_AND}{second}\s*(?:\.\s*)?", re.IGNORECASE)
    for first, second in ((_ROTATE, _COLUMN), (_COLUMN, _ROTATE))
)
_MOVE_RE = re.compile(r"\(\s*([a-z_]+)\s*,\s*(\d{1,4})\s*\)", re.IGNORECASE)
_MOVE_SEQUENCE_RE = re.compile(r"(?:[\s,;]*\(\s*[a-z_]+\s*,\s*\d{1,4}\s*\))+[\s,;.]*", re.IGNORECASE)


class Placement(NamedTuple):
    """An action: rotation (clockwise quarter turns from the spawn orientation, canonical) and leftmost column."""

    rotation: int
    column: int


@dataclass(frozen=True)
class _Rotation:
    """One orientation of a piece inside its rotation box."""

    cells: tuple[tuple[int, int], ...]  # (row, col) in the box
    left: int  # leftmost box column it occupies
    width: int
    canonical: int  # the smallest rotation of the same shape: it gives the same placements
    bottoms: tuple[tuple[int, int], ...]  # (box col, lowest box row) per occupied column
    tops: tuple[tuple[int, int], ...]  # (box col, highest box row) per occupied column
    dr: np.ndarray  # (4,) box rows of the cells
    dc: np.ndarray  # (4,) box cols of the cells


@dataclass(frozen=True)
class _Piece:
    letter: str
    value: int  # what its cells hold on the board: 1 + index in PIECES
    box: int
    spawn_row: int  # box row at spawn: the top of the spawn orientation is on board row 0
    rotations: tuple[_Rotation, ...]  # 4, clockwise from the spawn orientation

    @property
    def canonical_rotations(self) -> tuple[int, ...]:
        return tuple(r for r, rot in enumerate(self.rotations) if rot.canonical == r)

    def spawn_col(self, cols: int) -> int:
        return (cols - self.box) // 2


def _build_piece(letter: str) -> _Piece:
    box, cells = _SPAWN_SHAPES[letter]
    rotations: list[_Rotation] = []
    shapes: list[frozenset[tuple[int, int]]] = []
    for _ in range(4):
        top, left = min(r for r, _ in cells), min(c for _, c in cells)
        shape = frozenset((r - top, c - left) for r, c in cells)
        columns = sorted({c for _, c in cells})
        rotations.append(
            _Rotation(
                cells=cells,
                left=left,
                width=len(columns),
                canonical=shapes.index(shape) if shape in shapes else len(shapes),
                bottoms=tuple((c, max(r for r, cc in cells if cc == c)) for c in columns),
                tops=tuple((c, min(r for r, cc in cells if cc == c)) for c in columns),
                dr=np.array([r for r, _ in cells]),
                dc=np.array([c for _, c in cells]),
            )
        )
        shapes.append(shape)
        cells = tuple((c, box - 1 - r) for r, c in cells)  # a clockwise quarter turn in the box
    spawn_row = -min(r for r, _ in rotations[0].cells)
    return _Piece(letter, PIECES.index(letter) + 1, box, spawn_row, tuple(rotations))


_PIECE = {letter: _build_piece(letter) for letter in PIECES}
# Board rows a piece can cover at spawn, in any rotation: while they are empty every in-wall placement is reachable.
_SPAWN_BAND = max(p.spawn_row + p.box for p in _PIECE.values())


@functools.lru_cache(maxsize=256)
def _free_placements(letter: str, cols: int) -> tuple[Placement, ...]:
    """Every in-wall placement of a piece: the legal actions while nothing is in the spawn band."""
    piece = _PIECE[letter]
    return tuple(Placement(r, c) for r in piece.canonical_rotations for c in range(cols - piece.rotations[r].width + 1))


def _check_piece_set(v: Any) -> str | None:
    ok = isinstance(v, str) and v != "" and len(set(v)) == len(v) and set(v) <= set(PIECES)
    return None if ok else f"a non-empty string of distinct piece letters from {PIECES!r}"


@functools.lru_cache(maxsize=64)
def _tiles(n_colours: int, photo_classes: int) -> tuple[Tile | None, ...]:
    """Tile of each board value (0 = empty: None), coloured by piece type."""
    names = [name for name, _ in COLOURS]
    tiles = [
        Tile(
            colour=names.index(_GUIDELINE_COLOURS[i % n_colours]),
            photo_class=i % photo_classes if photo_classes else None,
        )
        for i in range(len(PIECES))
    ]
    return (None, *tiles)


class Tetris(Game):
    """Tetris where one action places the current piece: `Placement(rotation, column)`; see the module docstring."""

    name: ClassVar[str] = "tetris"
    knobs: ClassVar[dict[str, Knob]] = {
        **PERCEPTION_KNOBS,
        "rows": Knob(20, int_in(6, 40), "board height"),
        "cols": Knob(10, int_in(4, 20), "board width"),
        "piece_set": Knob(PIECES, _check_piece_set, "the pieces dealt, e.g. 'I' or 'IO' (a reasoning knob)"),
        "preview": Knob(3, int_in(0, 6), "how many next pieces the image and the text show"),
        "n_colours": Knob(7, int_in(1, 7), "piece colours: piece type i gets colour i % n_colours"),
    }
    invalid_penalty: ClassVar[float] = -1.0

    @classmethod
    def check_combination(cls, values: dict[str, Any]) -> dict[str, Any]:
        cls._make_renderer(values)  # fails early when the image is too small or 'photo' has no photo_dir
        return values

    @staticmethod
    def _make_renderer(difficulty: dict[str, Any]) -> BoardRenderer:
        panels = [("Current", 2, 4)] + ([("Next", 3 * difficulty["preview"] - 1, 4)] if difficulty["preview"] else [])
        style = Style.from_difficulty(difficulty)
        return cached_renderer(difficulty["rows"], difficulty["cols"], style, "Tetris", tuple(panels))

    # ---- state -------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        rows, cols = self.difficulty["rows"], self.difficulty["cols"]
        self.board = np.zeros((rows, cols), dtype=np.int8)  # (rows, cols): 0 empty, else 1 + index in PIECES
        self._tops = np.full(cols, rows, dtype=np.int64)  # (cols,) row of the highest filled cell (rows: none)
        self.queue: list[str] = []  # the next pieces, whole 7-bags, front first
        self.piece = ""  # letter of the piece to place
        self.lines = 0
        self.pieces = 0
        self.terminated = False
        self.score = 0.0
        self.steps = 0
        self._spawn_next()

    def set_board(self, board: np.ndarray, piece: str | None = None) -> None:
        """Replaces the board (and the current piece) with a hand-made one, e.g. for tests and curricula.

        Args:
            board: (rows, cols) ints, 0 empty, else 1 + the piece's index in PIECES (any nonzero counts as filled).
            piece: the letter of the piece to place next; None keeps the current one.
        """
        board = np.asarray(board)
        if board.shape != self.board.shape:
            raise ValueError(f"board must have shape {self.board.shape}; got {board.shape}")
        if piece is not None and piece not in PIECES:
            raise ValueError(f"piece must be one of {', '.join(PIECES)}; got {piece!r}")
        self.board = np.clip(board, 0, len(PIECES)).astype(np.int8)
        self._recompute_tops()
        self.piece = piece or self.piece
        self.terminated = not self._fits(self.piece, 0, *self._spawn_position())

    def _recompute_tops(self) -> None:
        filled = self.board != 0
        self._tops = np.where(filled.any(axis=0), filled.argmax(axis=0), self.board.shape[0])

    def _spawn_next(self) -> None:
        while len(self.queue) <= self.difficulty["preview"]:
            self.queue.extend(self.rng.permutation(list(self.difficulty["piece_set"])).tolist())
        self.piece = self.queue.pop(0)
        if not self._fits(self.piece, 0, *self._spawn_position()):
            self.terminated = True

    def _spawn_position(self) -> tuple[int, int]:
        """(box row, box col) of the current piece when it appears."""
        piece = _PIECE[self.piece]
        return piece.spawn_row, piece.spawn_col(self.board.shape[1])

    def _fits(self, letter: str, rotation: int, row: int, col: int) -> bool:
        """Whether the piece, its box at (row, col), stays inside the walls and floor and off filled cells.

        Rows above the board (negative) are open space, as in the hidden rows of real Tetris.
        """
        rows, cols = self.board.shape
        for dr, dc in _PIECE[letter].rotations[rotation].cells:
            r, c = row + dr, col + dc
            if c < 0 or c >= cols or r >= rows or (r >= 0 and self.board[r, c]):
                return False
        return True

    # ---- actions -----------------------------------------------------------------------------------------------------
    def legal_actions(self) -> list[Placement]:
        if self.terminated:
            return []
        if self._tops.min() >= _SPAWN_BAND:  # the common case: the stack is below anything a spawned piece touches
            return list(_free_placements(self.piece, self.board.shape[1]))
        return self._reachable_placements()

    def _reachable_placements(self) -> list[Placement]:
        """Placements whose path (rotate at the top, then slide) is free: the stack reaches the spawn band."""
        piece = _PIECE[self.piece]
        out = []
        for r in piece.canonical_rotations:
            start = self._rotated_spawn(r)
            if start is None:
                continue
            row, col = start
            lo = hi = col
            while self._fits(self.piece, r, row, lo - 1):
                lo -= 1
            while self._fits(self.piece, r, row, hi + 1):
                hi += 1
            out.extend(Placement(r, c + piece.rotations[r].left) for c in range(lo, hi + 1))
        return out

    def _rotated_spawn(self, rotation: int) -> tuple[int, int] | None:
        """The box position after turning the new piece to `rotation` at the top; None when a turn is refused."""
        row, col = self._spawn_position()
        turns = [3] if rotation == 3 else list(range(1, rotation + 1))  # 3 = one counter-clockwise turn
        if any(not self._fits(self.piece, r, row, col) for r in turns):
            return None
        return row, col

    def parse_answer(self, answer: str) -> Placement | None:
        for pattern in _PLACEMENT_RES:
            match = pattern.fullmatch(answer)
            if match:
                rotation, column = int(match["rot"]), int(match["col"])
                return Placement(_PIECE[self.piece].rotations[rotation].canonical, column) if rotation < 4 else None
        if _MOVE_SEQUENCE_RE.fullmatch(answer):
            return self._simulate_moves([(name.lower(), int(n)) for name, n in _MOVE_RE.findall(answer)])
        return None

    def _simulate_moves(self, moves: list[tuple[str, int]]) -> Placement | None:
        """The placement that a move sequence leads to, from the spawn position; None for an unknown move."""
        rows, cols = self.board.shape
        rotation, (row, col) = 0, self._spawn_position()
        for name, count in moves:
            if name not in _MOVES:
                return None
            if name == "hard_drop":
                break
            if name.startswith("rotate"):
                turn = 1 if name == "rotate_clockwise" else 3
                # A refused turn is refused again on every later try; with none refused, 4 turns come back round.
                for _ in range(min(count, 4 + count % 4)):
                    if not self._fits(self.piece, (rotation + turn) % 4, row, col):
                        break
                    rotation = (rotation + turn) % 4
            else:
                drow, dcol = {"move_left": (0, -1), "move_right": (0, 1), "soft_drop": (1, 0)}[name]
                for _ in range(min(count, rows + cols)):
                    if not self._fits(self.piece, rotation, row + drow, col + dcol):
                        break
                    row, col = row + drow, col + dcol
        shape = _PIECE[self.piece].rotations[rotation]
        return Placement(shape.canonical, col + shape.left)

    def format_action(self, action: Placement) -> str:
        rotation, column = action
        return f"rotate {rotation}, column {column}"

    def step(self, action: Any) -> StepResult:
        if not isinstance(action, tuple) or action not in self.legal_actions():
            return StepResult(self.invalid_penalty, self.terminated, {"valid": False})
        piece = _PIECE[self.piece]
        rotation = piece.rotations[action[0]]
        col = action[1] - rotation.left
        row = self._landing_row(action[0], col)
        rows = row + rotation.dr
        cols = col + rotation.dc
        visible = rows >= 0
        self.board[rows[visible], cols[visible]] = piece.value
        full = [r for r in sorted(set(rows[visible].tolist())) if self.board[r].all()]
        if full:
            keep = np.ones(self.board.shape[0], dtype=bool)
            keep[full] = False
            self.board = np.concatenate([np.zeros((len(full), self.board.shape[1]), np.int8), self.board[keep]])
            self._recompute_tops()
        else:
            for c, top in rotation.tops:
                self._tops[col + c] = min(self._tops[col + c], max(row + top, 0))
        self.pieces += 1
        self.lines += len(full)
        self.score += 1 + len(full)
        self.steps += 1
        if not visible.all():  # came to rest partly above the board
            self.terminated = True
        else:
            self._spawn_next()
        return StepResult(1.0 + 10.0 * len(full), self.terminated, {"valid": True, "lines_cleared": len(full)})

    def _landing_row(self, rotation: int, col: int) -> int:
        """Box row where the current piece, turned and slid at the top (box column `col`), comes to rest."""
        shape = _PIECE[self.piece].rotations[rotation]
        spawn_row = _PIECE[self.piece].spawn_row
        row = min(int(self._tops[col + c]) - 1 - bottom for c, bottom in shape.bottoms)
        if row >= spawn_row:  # it falls onto the highest block of its columns
            return row
        # A block is above the piece's bottom in its columns: only with the stack in the spawn band, where a slide
        # can go under an overhang. Fall cell by cell.
        row = spawn_row
        while self._fits(self.piece, rotation, row + 1, col):
            row += 1
        return row

    # ---- observation -------------------------------------------------------------------------------------------------
    def text_observation(self) -> str:
        lines = ["|".join(FILLED if v else EMPTY for v in row) for row in self.board.tolist()]
        lines.append(f"current: {self.piece}")
        if self.difficulty["preview"]:
            lines.append("next: " + ", ".join(self.queue[: self.difficulty["preview"]]))
        return "\n".join(lines)

    def _piece_panel(self, letters: list[str], tiles: tuple[Tile | None, ...]) -> list[list[Tile | None]]:
        """Panel cells: each piece in its spawn orientation, in a 2 x 4 slot, slots one row apart."""
        grid: list[list[Tile | None]] = [[None] * 4 for _ in range(3 * len(letters) - 1)]
        for i, letter in enumerate(letters):
            piece = _PIECE[letter]
            spawn = piece.rotations[0]
            for r, c in spawn.cells:
                grid[3 * i + r + piece.spawn_row][c - spawn.left] = tiles[piece.value]
        return grid

    def render_array(self) -> np.ndarray:
        """(H, W, 3) uint8 frame: the board, the current piece and the preview; the fast path (no PIL image)."""
        d = self.difficulty
        tiles = _tiles(d["n_colours"], photo_class_count(d["photo_dir"]) if d["photo_dir"] else 0)
        cells = [[tiles[v] for v in row] for row in self.board.tolist()]
        panels = [self._piece_panel([self.piece], tiles)]
        if d["preview"]:
            panels.append(self._piece_panel(self.queue[: d["preview"]], tiles))
        caption = f"Pieces: {self.pieces}   Lines: {self.lines}"
        return self._make_renderer(d).draw_array(cells, panels, caption=caption, noise_seed=self.seed + self.steps)

    @property
    def prompt(self) -> str:
        d = self.difficulty
        rows, cols, preview = d["rows"], d["cols"], d["preview"]
        stack = [FILLED] * 3 + [EMPTY] * (cols - 3)
        pieces = d["piece_set"] * (preview + 1)  # example letters, from the game's own pieces
        example = ["|".join([EMPTY] * cols)] * 2 + ["|".join(stack), f"current: {pieces[0]}"]
        if preview:
            example.append(f"next: {', '.join(pieces[1 : preview + 1])}")
        return (
            f"You are playing Tetris on a board of {rows} rows x {cols} columns (row 0 at the top, column 0 at the "
            f"left; the numbers are drawn on the image). The pieces are {', '.join(d['piece_set'])}, named after the "
            "letters they look like (I: four in a line, O: a 2x2 square, T, S, Z, J, L). The 'Current' panel shows "
            "the piece to place, in the orientation in which it appears at the top centre of the board"
            + (f"; the 'Next' panel shows the {preview} pieces after it, first on top" if preview else "")
            + ". Each turn you place the current piece: it turns R quarter turns clockwise at the top (R from 0 to 3; "
            "3 is one counter-clockwise turn), slides sideways until its leftmost cell is in column C, then drops "
            "straight down until it lands. A turn or slide into a wall or a block is not allowed (no wall kicks). A "
            "full row is cleared and the rows above it move down. The game ends when a new piece has no room at the "
            "top. You get +1 for each piece placed and +10 for each line cleared; an invalid answer gets -1 and "
            "changes nothing.\n\n"
            "First describe what you see inside <perception></perception>: one line per board row from top to "
            f"bottom, cells separated by |, {FILLED} for a filled cell and {EMPTY} for an empty one, then a line "
            "'current: X' with the current piece's letter"
            + (" and a line 'next: A, B, ...' with the next pieces' letters" if preview else "")
            + ". For example, the last rows and the pieces could read:\n"
            + "\n".join(example)
            + "\n"
            "Then reason about where to place the piece inside <think></think>. Finally give your move inside "
            "<answer></answer> as 'rotate R, column C', for example <answer>rotate 1, column 4</answer>. A move "
            "sequence such as <answer>(move_left,2)(rotate_clockwise,1)(hard_drop,1)</answer> is also accepted."
        )
