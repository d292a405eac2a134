"""Tetris: one decision places one piece; the moves, spawn and gravity are lmgame-Bench's, and so is the score.

Rules: a board of `rows` x `cols` (20 x 10 by default), the tetrominoes of `piece_set` (default all seven,
"IOTSZJL") dealt by a 7-bag randomizer (each bag is a random permutation of the piece set, dealt in order), a
preview of the next `preview` pieces, and line clears (a full row disappears and the rows above move down).

The engine is lmgame-Bench's (GamingAgent's `custom_04_tetris/tetrisEnv.py`, built on tetris-gymnasium). A piece
appears with the top of its rotation box on row 0 and the box at column `cols // 2 - box // 2`: columns 3-6 of 10
for I (on row 1), 4-5 for O, 4-6 for T, S, Z, J and L. A turn rotates the piece inside its box (SRS shapes, no wall
kicks); a turn or slide into a wall or a block is refused and does nothing. Gravity acts after every move: each
frame the piece makes its move, then falls one row, and where it cannot fall it locks. `hard_drop` drops and locks it
at once; `soft_drop` moves it one row down before gravity (or locks it where it cannot). So a piece turns and slides
while it falls, and where it can end up depends on the order of its moves and the stack below it.

A placement is a resting position (`Placement(rotation, column, row)`: the canonical rotation, the leftmost column
and the top row of its cells). The legal placements are every resting position that some sequence of moves reaches
from the spawn under that gravity: a search over piece states (rotation, row, column), row by row, since every frame
falls one row. It finds turns that fit only after a slide, and slides under an overhang just above the stack.

Answers take two forms, and both name a legal placement or none:
- `rotate R, column C`: turned R quarter turns clockwise (R = 3 is one counter-clockwise turn; rotations that give
  the same shape name the same placements: `rotate 2` of an S is `rotate 0`), leftmost cell in column C, at the
  highest resting spot of that column that the moves can reach, i.e. dropped straight down wherever that is reachable.
- lmgame-Bench's move sequences, e.g. `(left,2)(rotate_right,1)(hard_drop,1)`, with its action names left, right,
  rotate_left, rotate_right, soft_drop, hard_drop and no_op, the long names move_left, move_right,
  rotate_counterclockwise and rotate_clockwise too, and a repeat count each (0 counts as 1, as there). They are played
  frame by frame from the spawn as above; the answer is where the piece locks, and a sequence that ends before it
  locks is finished with a hard drop. A placement that only a move sequence names (one slid under an overhang) is
  written as one by `format_action`.

The game is over when the next piece has no room to appear.

Rewards (lmgame-Bench):

| event                        | training reward (`StepResult.reward`) | benchmark score (`score`) |
|------------------------------|---------------------------------------|---------------------------|
| piece placed                 | +1                                    | +1                        |
| each line cleared            | +10                                   | +1                        |
| unreadable or illegal answer | -1, board unchanged                   | 0                         |

Expert (`expert_move`): a one-piece placement search in the style of Dellacherie and El-Tetris: every legal
placement is played on a copy of the board and scored by El-Tetris's weights on landing height, eroded piece cells,
row and column transitions, holes and wells. Its reasoning names each column's height, then the placement chosen,
the lines it clears and the holes it leaves. It is still playing at bench/experts.py's 1,000-piece cap in every seeded
episode (score ~1,400; at 2,000 pieces ~2,800) where random legal placements top out after ~21 pieces.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from envs.base import ExpertMove, Game, Knob, StepResult, int_in
from envs.render import COLOURS, PERCEPTION_KNOBS, BoardRenderer, Style, Tile, cached_renderer, photo_class_count

PIECES = "IOTSZJL"
# Spawn orientation (rotation 0) of each piece in its rotation box (SRS, as lmgame-Bench's matrices): (box, cells).
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
# lmgame-Bench's action names (its game_env_config.json), and the long names its docs and the G1-style prompts use.
_MOVE_NAMES = {
    **{name: name for name in ("left", "right", "rotate_left", "rotate_right", "soft_drop", "hard_drop", "no_op")},
    "move_left": "left",
    "move_right": "right",
    "rotate_counterclockwise": "rotate_left",
    "rotate_clockwise": "rotate_right",
}
# Searched moves, in the order a shortest move sequence prefers them (soft and hard drops reach nothing new).
_SEARCH_MOVES = ("no_op", "left", "right", "rotate_right", "rotate_left")
_SHIFT = {"left": (0, -1), "right": (0, 1), "rotate_right": (1, 0), "rotate_left": (3, 0), "no_op": (0, 0)}
# Box columns a piece can take left of the board (an I turned vertical is 2 columns right in its box): bit offset.
_PAD = 3
# Answer forms: "rotate 1, column 4" (either order, loose spacing); a move sequence "(left,2)(hard_drop,1)".
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
# El-Tetris's feature weights (Islam El-Ashi, 2011, tuned by a genetic search on Dellacherie's features).
_EL_TETRIS = {
    "landing_height": -4.500158825082766,
    "eroded_cells": 3.4181268101392694,
    "row_transitions": -3.2178882868487753,
    "column_transitions": -9.348695305445199,
    "holes": -7.899265427351652,
    "wells": -3.3855972247263626,
}


class Placement(NamedTuple):
    """An action: where the piece rests. Rotation (clockwise quarter turns from the spawn orientation, canonical),
    leftmost column and top row of its cells; row -1 (never legal) for an answer that names no resting spot."""

    rotation: int
    column: int
    row: int


class _State(NamedTuple):
    """A falling piece: its rotation and the board (row, column) of its rotation box's top-left corner."""

    rotation: int
    row: int
    col: int


@dataclass(frozen=True)
class _Rotation:
    """One orientation of a piece inside its rotation box."""

    cells: tuple[tuple[int, int], ...]  # (row, col) in the box
    left: int  # leftmost box column it occupies
    top: int  # topmost box row it occupies
    canonical: int  # the smallest rotation of the same shape: it gives the same placements
    dr: np.ndarray  # (4,) box rows of the cells
    dc: np.ndarray  # (4,) box cols of the cells


@dataclass(frozen=True)
class _Piece:
    letter: str
    value: int  # what its cells hold on the board: 1 + index in PIECES
    box: int
    rotations: tuple[_Rotation, ...]  # 4, clockwise from the spawn orientation

    def spawn(self, cols: int) -> _State:
        """lmgame-Bench's spawn: box top on row 0, box at `width_padded // 2 - box // 2` less its padding."""
        return _State(0, 0, cols // 2 - self.box // 2)

    def placement(self, state: _State) -> Placement:
        shape = self.rotations[state.rotation]
        return Placement(shape.canonical, state.col + shape.left, state.row + shape.top)


def _build_piece(letter: str) -> _Piece:
    box, cells = _SPAWN_SHAPES[letter]
    rotations: list[_Rotation] = []
    shapes: list[frozenset[tuple[int, int]]] = []
    for _ in range(4):
        top, left = min(r for r, _ in cells), min(c for _, c in cells)
        shape = frozenset((r - top, c - left) for r, c in cells)
        rotations.append(
            _Rotation(
                cells=cells,
                left=left,
                top=top,
                canonical=shapes.index(shape) if shape in shapes else len(shapes),
                dr=np.array([r for r, _ in cells]),
                dc=np.array([c for _, c in cells]),
            )
        )
        shapes.append(shape)
        cells = tuple((c, box - 1 - r) for r, c in cells)  # a clockwise quarter turn in the box (np.rot90(k=-1))
    return _Piece(letter, PIECES.index(letter) + 1, box, tuple(rotations))


_PIECE = {letter: _build_piece(letter) for letter in PIECES}


def _fits_at(piece: _Piece, occupied: list[int], row: int, mask: int) -> list[int]:
    """Where the piece fits with its box on `row`: per rotation, a bit mask of box columns (bit = column + _PAD).

    `occupied[r]` has bit `c + _PAD` set where board column c of row r is filled or a wall (rows past the floor are
    all set); a cell `dc` right of the box's left edge is blocked where `occupied >> dc` is set.
    """
    o = occupied  # every tetromino has 4 cells: one shifted row mask each
    return [
        ~((o[row + a] >> b) | (o[row + c] >> d) | (o[row + e] >> f) | (o[row + g] >> h)) & mask
        for (a, b), (c, d), (e, f), (g, h) in (rotation.cells for rotation in piece.rotations)
    ]


def _fall(
    piece: _Piece, occupied: list[int], cols: int, row: int, falling: list[int]
) -> Iterator[tuple[int, list[int]]]:
    """The search under gravity, row by row, from the box columns (per rotation) the piece can be in on `row`.

    Every frame the piece makes one move (a slide or a turn, refused where blocked, or none) on its row, then falls
    one row, or locks where it cannot. Yields (row, per rotation the box columns where it locks on that row); after
    each yield `falling` holds the sets on the next row. Sets of columns are bit masks, so a row costs a few dozen
    integer operations rather than a collision check per state and move: the search runs on every step.
    """
    mask = (1 << (cols + _PAD)) - 1  # the box columns, -_PAD .. cols - 1
    here = _fits_at(piece, occupied, row, mask)
    while any(falling):
        # Rotation r after one move: stayed, slid from r, or turned from r - 1 (clockwise) or r + 1 (counter-).
        moved = [
            bits | (((bits << 1) | (bits >> 1) | falling[r - 1] | falling[(r + 1) % 4]) & here[r])
            for r, bits in enumerate(falling)
        ]
        here = _fits_at(piece, occupied, row + 1, mask)
        falling[:] = [bits & fit for bits, fit in zip(moved, here, strict=True)]
        yield row, [bits & ~fit for bits, fit in zip(moved, here, strict=True)]
        row += 1


def _occupied(filled: np.ndarray) -> list[int]:
    """`_fits_at`'s rows: (rows, cols) bool -> per row a bit mask of filled cells and walls, then 4 rows of floor."""
    rows, cols = filled.shape
    walls = (1 << _PAD) - 1 | ((1 << 4) - 1) << (cols + _PAD)
    cells = filled @ (1 << np.arange(_PAD, cols + _PAD, dtype=np.int64))  # (rows,)
    return [c | walls for c in cells.tolist()] + [(1 << (cols + _PAD + 4)) - 1] * 4


@functools.lru_cache(maxsize=256)
def _open_falling(letter: str, rows: int, cols: int) -> tuple[tuple[int, ...], ...]:
    """The search's falling sets on each row of an empty board: the start on a board whose stack is lower."""
    piece = _PIECE[letter]
    spawn = piece.spawn(cols)
    falling = [1 << (spawn.col + _PAD), 0, 0, 0]
    out = [tuple(falling)]
    for _ in _fall(piece, _occupied(np.zeros((rows, cols), bool)), cols, spawn.row, falling):
        out.append(tuple(falling))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _named_states(letter: str, rows: int, cols: int) -> tuple[tuple[tuple[tuple[Placement, _State], ...], ...], ...]:
    """[rotation][row][bit]: the placement and the state of a piece resting there, built once per board size."""
    piece = _PIECE[letter]
    return tuple(
        tuple(
            tuple(
                (piece.placement(_State(r, row, bit - _PAD)), _State(r, row, bit - _PAD)) for bit in range(cols + _PAD)
            )
            for row in range(rows)
        )
        for r in range(4)
    )


def _resting_placements(board: np.ndarray, letter: str) -> dict[Placement, _State]:
    """Every resting position that moves under gravity reach from the spawn (which must fit), with a state there.

    Above the stack the search is the empty board's: it starts 4 rows (a box) above the highest filled cell.
    """
    rows, cols = board.shape
    filled = board != 0
    start = max(int(filled.any(axis=1).argmax()) if filled.any() else rows, 4) - 4
    falling = list(_open_falling(letter, rows, cols)[start])
    named = _named_states(letter, rows, cols)
    out: dict[Placement, _State] = {}
    for row, resting in _fall(_PIECE[letter], _occupied(filled), cols, start, falling):
        for r, bits in enumerate(resting):
            while bits:
                bit = bits & -bits
                bits ^= bit
                placement, state = named[r][row][bit.bit_length() - 1]
                out.setdefault(placement, state)
    return out


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


def _features(filled: np.ndarray) -> dict[str, np.ndarray]:
    """Dellacherie's board features of a batch of boards, (n, rows, cols) bool -> name: (n,) counts.

    Walls and floor count as filled; a hole is an empty cell under a filled one; a well cell is an empty cell whose
    left and right neighbours are filled, and a well of depth d counts 1 + 2 + ... + d.
    """
    n, rows, _ = filled.shape
    walled = np.pad(filled, ((0, 0), (0, 0), (1, 1)), constant_values=True)
    floored = np.pad(filled, ((0, 0), (0, 1), (0, 0)), constant_values=True)
    covered = np.maximum.accumulate(filled, axis=1)
    well = ~filled & walled[:, :, :-2] & walled[:, :, 2:]
    wells = np.zeros(n, dtype=np.int64)
    depth = np.zeros(well[:, 0].shape, dtype=np.int64)
    for r in range(rows):
        depth = (depth + 1) * well[:, r]
        wells += depth.sum(axis=1)
    return {
        "row_transitions": (walled[:, :, 1:] != walled[:, :, :-1]).sum(axis=(1, 2)),
        "column_transitions": (floored[:, 1:] != floored[:, :-1]).sum(axis=(1, 2)),
        "holes": (covered & ~filled).sum(axis=(1, 2)),
        "wells": wells,
    }


def _run_lengths(moves: list[str]) -> str:
    """A move list as an lmgame-Bench answer: `["left", "left", "no_op"]` -> `(left,2)(no_op,1)`."""
    return "".join(f"({move},{len(list(run))})" for move, run in itertools.groupby(moves))


class Tetris(Game):
    """Tetris where one action places the current piece at a resting `Placement`; see the module docstring."""

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
        self.queue: list[str] = []  # the next pieces, whole 7-bags, front first
        self.piece = ""  # letter of the piece to place
        self._placements: dict[Placement, _State] | None = None  # the legal placements: see _resting
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
        self.piece = piece or self.piece
        self._placements = None
        self.terminated = not self._fits(self._spawn())

    def _spawn_next(self) -> None:
        while len(self.queue) <= self.difficulty["preview"]:
            self.queue.extend(self.rng.permutation(list(self.difficulty["piece_set"])).tolist())
        self.piece = self.queue.pop(0)
        self._placements = None  # computed on first use: a board and a piece, one search
        if not self._fits(self._spawn()):
            self.terminated = True

    def _spawn(self) -> _State:
        return _PIECE[self.piece].spawn(self.board.shape[1])

    def _fits(self, state: _State) -> bool:
        """Whether the current piece in `state` stays inside the walls and floor and off filled cells."""
        rows, cols = self.board.shape
        for dr, dc in _PIECE[self.piece].rotations[state.rotation].cells:
            r, c = state.row + dr, state.col + dc
            if c < 0 or c >= cols or r >= rows or self.board[r, c]:
                return False
        return True

    def _frame(self, state: _State, move: str) -> tuple[_State, bool]:
        """One lmgame-Bench frame: the move (refused, doing nothing, where it is blocked), then gravity.

        Returns the new state and whether the piece locked in it: where it cannot fall after its move, at the end of
        a hard drop, or where a soft drop cannot move it.
        """
        if move in ("hard_drop", "soft_drop"):
            below = state._replace(row=state.row + 1)
            if not self._fits(below):
                return state, True
            if move == "hard_drop":
                return self._frame(below, move)
            state = below
        else:
            turn, shift = _SHIFT[move]
            moved = _State((state.rotation + turn) % 4, state.row, state.col + shift)
            state = moved if self._fits(moved) else state
        below = state._replace(row=state.row + 1)
        return (below, False) if self._fits(below) else (state, True)

    # ---- actions -----------------------------------------------------------------------------------------------------
    def legal_actions(self) -> list[Placement]:
        return [] if self.terminated else list(self._resting())

    def _resting(self) -> dict[Placement, _State]:
        """The legal placements (the search's, cached until the board or the piece changes)."""
        if self._placements is None:
            self._placements = _resting_placements(self.board, self.piece) if not self.terminated else {}
        return self._placements

    def _highest(self, rotation: int, column: int) -> Placement:
        """What `rotate R, column C` names: the highest legal placement there; row -1 when there is none."""
        rows = [p.row for p in self._resting() if p.rotation == rotation and p.column == column]
        return Placement(rotation, column, min(rows, default=-1))

    def parse_answer(self, answer: str) -> Placement | None:
        for pattern in _PLACEMENT_RES:
            match = pattern.fullmatch(answer)
            if match:
                rotation, column = int(match["rot"]), int(match["col"])
                return self._highest(_PIECE[self.piece].rotations[rotation].canonical, column) if rotation < 4 else None
        if _MOVE_SEQUENCE_RE.fullmatch(answer):
            return self._play_moves([(name.lower(), int(n)) for name, n in _MOVE_RE.findall(answer)])
        return None

    def _play_moves(self, moves: list[tuple[str, int]]) -> Placement | None:
        """Where a move sequence locks the piece, played frame by frame from the spawn; None for an unknown move."""
        if any(name not in _MOVE_NAMES for name, _ in moves) or self.terminated:
            return None
        state = self._spawn()
        frames = [_MOVE_NAMES[name] for name, count in moves for _ in range(min(max(count, 1), self.board.shape[0]))]
        for move in [*frames, "hard_drop"]:  # every frame but a refused drop falls a row: at most `rows` of them
            state, locked = self._frame(state, move)
            if locked:
                return _PIECE[self.piece].placement(state)
        raise AssertionError("a hard drop always locks")

    def moves_to(self, placement: Placement) -> str:
        """A shortest lmgame-Bench move sequence that locks the piece at a legal `placement`, e.g. `(left,2)(no_op,3)`.

        A breadth-first search over falling states, frame by frame: the few placements that `rotate R, column C`
        cannot name (slid under an overhang) are written this way.
        """
        paths: dict[_State, list[str]] = {self._spawn(): []}
        frontier = list(paths)
        while frontier:
            later = []
            for state in frontier:
                for move in _SEARCH_MOVES:
                    after, locked = self._frame(state, move)
                    if locked and _PIECE[self.piece].placement(after) == placement:
                        return _run_lengths([*paths[state], move])
                    if not locked and after not in paths:
                        paths[after] = [*paths[state], move]
                        later.append(after)
            frontier = later
        raise ValueError(f"{placement} is not a legal placement of {self.piece}")

    def format_action(self, action: Placement) -> str:
        rotation, column, _ = action
        if self._highest(rotation, column) == action:
            return f"rotate {rotation}, column {column}"
        return self.moves_to(action)

    def step(self, action: Any) -> StepResult:
        try:
            state = self._resting().get(action) if isinstance(action, tuple) and not self.terminated else None
        except TypeError:  # a tuple holding something unhashable: no placement
            state = None
        if state is None:
            return StepResult(self.invalid_penalty, self.terminated, {"valid": False})
        piece = _PIECE[self.piece]
        shape = piece.rotations[state.rotation]
        rows = state.row + shape.dr
        self.board[rows, state.col + shape.dc] = piece.value
        full = [r for r in sorted(set(rows.tolist())) if self.board[r].all()]
        if full:
            keep = np.ones(self.board.shape[0], dtype=bool)
            keep[full] = False
            self.board = np.concatenate([np.zeros((len(full), self.board.shape[1]), np.int8), self.board[keep]])
        self.pieces += 1
        self.lines += len(full)
        self.score += 1 + len(full)
        self.steps += 1
        self._spawn_next()
        return StepResult(1.0 + 10.0 * len(full), self.terminated, {"valid": True, "lines_cleared": len(full)})

    # ---- expert ------------------------------------------------------------------------------------------------------
    def expert_move(self) -> ExpertMove:
        """El-Tetris's one-piece search: every legal placement is played on a copy of the board and the one with the
        best weighted sum of Dellacherie's features wins (ties: the first in `legal_actions` order)."""
        placements = self.legal_actions()
        if not placements:
            raise ValueError("tetris: the episode is over; there is no move to make")
        rows, cols = self.board.shape
        piece = _PIECE[self.piece]
        boards = np.repeat((self.board != 0)[None], len(placements), axis=0)  # (n, rows, cols)
        landing = np.empty(len(placements))
        cleared = np.zeros(len(placements), dtype=np.int64)
        eroded = np.zeros(len(placements), dtype=np.int64)
        for i, placement in enumerate(placements):
            state = self._resting()[placement]
            shape = piece.rotations[state.rotation]
            cell_rows = state.row + shape.dr
            boards[i, cell_rows, state.col + shape.dc] = True
            landing[i] = rows - (cell_rows.min() + cell_rows.max()) / 2  # height of the piece's middle
            full = boards[i].all(axis=1)
            if full.any():
                cleared[i] = full.sum()
                eroded[i] = cleared[i] * full[cell_rows].sum()  # lines cleared x the piece's cells they removed
                boards[i] = np.concatenate([np.zeros((cleared[i], cols), bool), boards[i][~full]])
        features = {"landing_height": landing, "eroded_cells": eroded, **_features(boards)}
        value = sum(weight * features[name] for name, weight in _EL_TETRIS.items())
        best = int(np.argmax(value))
        choice = placements[best]
        bottom = choice.row + int(np.ptp(piece.rotations[self._resting()[choice].rotation].dr))
        lines = "1 line" if cleared[best] == 1 else f"{cleared[best]} lines"
        holes = "1 hole" if features["holes"][best] == 1 else f"{features['holes'][best]} holes"
        reason = (
            f"Column heights {' '.join(map(str, self.column_heights()))}. The {self.piece} goes on rows {choice.row}-"
            f"{bottom} with {self.format_action(choice)}: it clears {lines} and leaves {holes}, the best of "
            f"{len(placements)} placements."
        )
        return ExpertMove(choice, reason)

    def column_heights(self) -> list[int]:
        """Each column's stack height, left to right: rows from the floor up to its highest filled cell (0: empty).

        The expert's `<think>` starts with them: what a placement is chosen from, said before the choice."""
        filled = self.board != 0
        rows = self.board.shape[0]
        return [int(rows - np.argmax(column)) if column.any() else 0 for column in filled.T]

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
                grid[3 * i + r - spawn.top][c - spawn.left] = tiles[piece.value]
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
            + ". Each turn you place the current piece. It falls one row after every move: a move left or right, a "
            "quarter turn, or none. A turn or slide into a wall or a block does nothing (no wall kicks), and the "
            "piece locks where it cannot fall. Answer 'rotate R, column C': the piece turned R quarter turns "
            "clockwise (R from 0 to 3; 3 is one counter-clockwise turn) with its leftmost cell in column C, where it "
            "lands when dropped straight down (it must be able to get there as it falls). A full row is cleared and "
            "the rows above it move down. The game ends when a new piece has no room at the top. You get +1 for each "
            "piece placed and +10 for each line cleared; an invalid answer gets -1 and changes nothing.\n\n"
            "First describe what you see inside <perception></perception>: one line per board row from top to "
            f"bottom, cells separated by |, {FILLED} for a filled cell and {EMPTY} for an empty one, then a line "
            "'current: X' with the current piece's letter"
            + (" and a line 'next: A, B, ...' with the next pieces' letters" if preview else "")
            + ". For example, the last rows and the pieces could read:\n"
            + "\n".join(example)
            + "\n"
            "Then reason about where to place the piece inside <think></think>. Finally give your move inside "
            "<answer></answer> as 'rotate R, column C', for example <answer>rotate 1, column 4</answer>. A move "
            "sequence such as <answer>(left,2)(rotate_right,1)(hard_drop,1)</answer> is also accepted (moves left, "
            "right, rotate_left, rotate_right, soft_drop, hard_drop, no_op)."
        )
