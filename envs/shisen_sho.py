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

Expert (`expert_move`): a safe pair when there is one (the tiles left of its type can all be paired now, which can
never cost a clearing), else the first pair of the longest removal order that a bounded depth-first search finds
(`ClearingSearch`), ideally one that clears the board. It cleared all 10 8 x 12 deals tried (seeds 0-9), where random
play got stuck on 6; on G1's 12 x 12 board most deals cannot be cleared by any order, and it gains ~6% over random.
"""

from __future__ import annotations

import bisect
import copy
import functools
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from envs.base import ExpertMove, Game, Knob, StepResult, int_in
from envs.render import (
    COLOURS,
    PERCEPTION_KNOBS,
    SHAPES,
    BoardRenderer,
    Style,
    Tile,
    cached_renderer,
    photo_class_count,
)

EMPTY = -1  # board value of an empty cell
EMPTY_TEXT = "-"
Pair = tuple[tuple[int, int], tuple[int, int]]  # ((r1, c1), (r2, c2)), the first cell first in row-major order
_CELL = r"[(\[]\s*(\d{1,3})\s*,\s*(\d{1,3})\s*[)\]]"
# States the expert's clearing search may expand per move: ~20 us each on 6 x 6 boards, so at most ~0.1 s a move.
EXPERT_SEARCH_STATES = 1000
# Each optional separator owns the spaces after it, so that no two `\s*` meet: no slow backtracking on junk.
_PAIR_RE = re.compile(rf"\s*{_CELL}\s*(?:(?:,|;|&|and|to|->|-|with)\s*)?{_CELL}\s*(?:\.\s*)?", re.IGNORECASE)


def tile_type(t: int, n_colours: int, n_shapes: int) -> tuple[int, int]:
    """(colour, shape) of tile type t: along diagonals, so that the first types vary in both colour and shape."""
    return t % n_colours, (t // n_colours + t) % n_shapes


class JoinablePairs:
    """The joinable pairs of a board (Shisen-Sho's legal actions), kept up to date as pairs are removed.

    Why incremental: a pool batch plays 32,000 random moves (250 per state), and listing every pair from scratch
    after each one cost ~200 us (numpy, 12 x 12 board); this update costs ~20 us in plain Python, where numpy's
    per-call overhead would dominate on boards this small. Removing tiles only empties cells, so a joinable pair
    stays joinable until it is removed, and a new one has a path through a cell just emptied.

    How paths are found: cells are indexed on the board padded with the ring of empty cells that paths may use. A
    *run* is a maximal segment of empty cells of a row or a column; a tile is *attached* to a run when it lies just
    past either end of the run, or is the first tile straight across from one of its cells (up or down from a row's
    run, left or right from a column's). Any two tiles attached to one run are joined through it with at most two
    turns (along the run, turning off it at most once at each end); conversely every path between tiles that are not
    adjacent has its middle segment (or its corner, or its one straight segment) inside such a run. So the joinable
    pairs are the adjacent same-type pairs and the same-type pairs attached to a common run.

    After emptying a cell x, a new path through x either has its middle segment in x's row or column run (both are
    joined again), or passes x on a leg from the tile just beyond x's run, turning at a corner in x's run: only that
    tile's pairs are looked for there. Rows and columns are bitmasks, so a run's ends and the first tile across are a
    few integer operations. Orientation o = 0 means rows (a cell's line is its row, its position its column), o = 1
    columns.

    Args:
        board: (rows, cols) ints, tile type or EMPTY.
    """

    def __init__(self, board: np.ndarray) -> None:
        rows, cols = np.shape(board)
        height, width = rows + 2, cols + 2
        self.width, self.size = width, height * width
        self.lengths = (width, height)  # cells per line, of each orientation
        self.strides = ((width, 1), (1, width))  # cell index = line * stride[0] + pos * stride[1], per orientation
        self.cells: list[int] = [EMPTY] * self.size  # (height * width) tile type or EMPTY, row-major
        for r, row in enumerate(np.asarray(board).tolist(), 1):
            self.cells[r * width + 1 : r * width + 1 + cols] = row
        # bits[0][r] has bit c set where (r, c) holds a tile; bits[1][c] has bit r set there.
        self.bits: tuple[list[int], list[int]] = ([0] * height, [0] * width)
        self.by_type: dict[int, list[int]] = {}  # cells of each tile type still on the board
        # keys: i * size + j for each joinable pair of cells i < j, sorted: row-major order, as legal_actions lists.
        self.keys: list[int] = []
        for i, t in enumerate(self.cells):
            if t != EMPTY:
                r, c = divmod(i, width)
                self.bits[0][r] |= 1 << c
                self.bits[1][c] |= 1 << r
                self.by_type.setdefault(t, []).append(i)
                if self.cells[i + 1] == t:  # adjacent tiles of one type: joined without a run
                    self.keys.append(i * self.size + i + 1)
                if self.cells[i + width] == t:
                    self.keys.append(i * self.size + i + width)
        self.keys.sort()
        self.tiles = sum(len(cells) for cells in self.by_type.values())
        for o, length in enumerate(self.lengths):
            edges = 1 | 1 << (length - 1)
            for line, bits in enumerate(self.bits[o]):
                # A lone empty cell at either end of a line (the ring, next to a tile) attaches one tile at most.
                empty = ~bits & ((1 << length) - 1) & ~(edges & (bits >> 1 | bits << 1))
                while empty:
                    start = (empty & -empty).bit_length() - 1
                    after = bits >> start
                    end = start + (after & -after).bit_length() - 1 if after else length
                    self._join_run(o, line, start, end)
                    empty &= -1 << end

    def __len__(self) -> int:
        return len(self.keys)

    def __deepcopy__(self, memo: dict) -> JoinablePairs:
        """A copy of the containers (their items are ints): far quicker than a generic deep copy, and as exact."""
        new = copy.copy(self)
        new.cells, new.bits, new.keys = self.cells[:], (self.bits[0][:], self.bits[1][:]), self.keys[:]
        new.by_type = {t: cells[:] for t, cells in self.by_type.items()}
        return new

    # ---- the pairs, in board coordinates ---------------------------------------------------------------------------
    def pairs(self) -> list[Pair]:
        """Every joinable pair, in row-major order."""
        return [self._pair(key) for key in self.keys]

    def pair_at(self, k: int) -> Pair:
        """The k-th joinable pair in row-major order (`pairs()[k]` without listing them all)."""
        return self._pair(self.keys[k])

    def safe_pair(self) -> Pair | None:
        """A joinable pair that removing can never make regrettable, or None when there is none.

        Removing tiles only empties cells, so a pair joinable now stays joinable, and removing a pair earlier than a
        solution does keeps the rest of that solution valid: only how each type's tiles are paired matters, not the
        order. So when the tiles left of a type can all be paired by pairs joinable now (2 tiles joinable, or 4 tiles
        as two disjoint joinable pairs), removing one of those pairs keeps a clearable board clearable.
        """
        joinable: dict[int, list[tuple[int, int]]] = {}
        for key in self.keys:
            i, j = divmod(key, self.size)
            joinable.setdefault(self.cells[i], []).append((i, j))
        for t, cell_pairs in joinable.items():
            left = len(self.by_type[t])
            for k, (i, j) in enumerate(cell_pairs):
                if left == 2 or any(not {i, j} & {a, b} for a, b in cell_pairs[k + 1 :]):
                    return self._pair(i * self.size + j)
        return None

    def remove(self, pair: Pair) -> bool:
        """Removes the two tiles of `pair` (canonical: first cell first) if they are joinable, and updates the
        joinable pairs; returns whether they were."""
        (r1, c1), (r2, c2) = pair
        width, size = self.width, self.size
        rows, cols = self.lengths[1] - 2, width - 2
        if not (0 <= r1 < rows and 0 <= r2 < rows and 0 <= c1 < cols and 0 <= c2 < cols):
            return False
        i, j = (r1 + 1) * width + c1 + 1, (r2 + 1) * width + c2 + 1
        k = bisect.bisect_left(self.keys, i * size + j)
        if k == len(self.keys) or self.keys[k] != i * size + j:
            return False
        del self.keys[k]
        same = self.by_type[self.cells[i]]
        same.remove(i)
        same.remove(j)
        for q in same:
            self._discard(i, q)
            self._discard(j, q)
        for x in (i, j):
            r, c = divmod(x, width)
            self.cells[x] = EMPTY
            self.bits[0][r] &= ~(1 << c)
            self.bits[1][c] &= ~(1 << r)
        self.tiles -= 2
        # The path that joined x to its partner left x through an empty cell (or straight into its partner), so one
        # run through x has another cell; a one-cell run attaches only tiles that the other run attaches too.
        joined = set()
        for x in (i, j):
            r, c = divmod(x, width)
            for o, line, pos in ((0, r, c), (1, c, r)):  # x's row run [start, end), then its column run
                bits, length = self.bits[o][line], self.lengths[o]
                start, after = (bits & ((1 << pos) - 1)).bit_length(), bits >> pos
                end = pos + (after & -after).bit_length() - 1 if after else length
                if end - start > 1 and (o, line, start) not in joined:
                    joined.add((o, line, start))
                    self._join_run(o, line, start, end)
                if start < pos and end < length:  # corners before x, reached from the tile after the run
                    self._join_beyond(o, line, end, start, pos)
                if pos + 1 < end and start:  # corners after x, reached from the tile before the run
                    self._join_beyond(o, line, start - 1, pos + 1, end)
        return True

    # ---- mechanism -------------------------------------------------------------------------------------------------
    def _pair(self, key: int) -> Pair:
        i, j = divmod(key, self.size)
        (r1, c1), (r2, c2) = divmod(i, self.width), divmod(j, self.width)
        return (r1 - 1, c1 - 1), (r2 - 1, c2 - 1)

    def _add(self, i: int, j: int) -> None:
        key = i * self.size + j if i < j else j * self.size + i
        k = bisect.bisect_left(self.keys, key)
        if k == len(self.keys) or self.keys[k] != key:
            self.keys.insert(k, key)

    def _discard(self, i: int, j: int) -> None:
        key = i * self.size + j if i < j else j * self.size + i
        k = bisect.bisect_left(self.keys, key)
        if k < len(self.keys) and self.keys[k] == key:
            del self.keys[k]

    def _join_run(self, o: int, line: int, start: int, end: int) -> None:
        """Adds the same-type pairs among the tiles attached to the run [start, end) of line `line`."""
        step_line, step_pos = self.strides[o]
        across, before_line, shift = self.bits[1 - o][start:end], (1 << line) - 1, line + 1
        attached = [
            ((b & before_line).bit_length() - 1) * step_line + pos * step_pos
            for pos, b in enumerate(across, start)
            if b & before_line
        ]
        attached += [
            (line + (a & -a).bit_length()) * step_line + pos * step_pos
            for pos, b in enumerate(across, start)
            if (a := b >> shift)
        ]
        if start:
            attached.append(line * step_line + (start - 1) * step_pos)
        if end < self.lengths[o]:
            attached.append(line * step_line + end * step_pos)
        types = [self.cells[i] for i in attached]
        if len(set(types)) == len(types):  # most runs attach no two tiles of one type
            return
        seen: dict[int, list[int]] = {}
        for i, t in zip(attached, types, strict=True):
            for j in seen.setdefault(t, []):
                self._add(i, j)
            seen[t].append(i)

    def _join_beyond(self, o: int, line: int, beyond: int, lo: int, hi: int) -> None:
        """Adds the pairs of the tile at `beyond` on line `line` whose path runs along the line to a corner in
        [lo, hi) (empty cells), then across, then (turning once more) along the partner's own line."""
        step_line, step_pos = self.strides[o]
        p = line * step_line + beyond * step_pos
        across, lines = self.bits[1 - o], self.bits[o]
        for q in self.by_type[self.cells[p]]:
            q_line, q_pos = divmod(q, self.width)
            if o:
                q_line, q_pos = q_pos, q_line
            if q_line == line:  # the same line (or p itself): only the run's other end, joined with the run
                continue
            # Walk the corners from the first one that q's line reaches, while its line stays clear of tiles.
            bits = lines[q_line]
            if q_pos < lo:
                if bits >> (q_pos + 1) & ((1 << (lo - q_pos)) - 1):  # a tile between q and the corners
                    continue
                y = lo
            else:
                y = max(lo, (bits & ((1 << q_pos) - 1)).bit_length())
            a, b = (line, q_line) if line < q_line else (q_line, line)
            between = ((1 << b) - 1) ^ ((1 << (a + 1)) - 1)  # the cells strictly between the two lines
            while y < hi and (y == q_pos or not bits >> y & 1):
                if not across[y] & between:  # clear across from the corner to q's line
                    self._add(p, q)
                    break
                y += 1


@dataclass
class ClearingSearch:
    """A depth-first search for the longest order of removals (ideally one that clears the board), bounded by a
    number of expanded boards.

    Each board tries a safe pair alone when it has one (`JoinablePairs.safe_pair`: nothing is lost), else every
    joinable pair. A board reached again in another order is not searched again: how many pairs are removed and
    what can follow depend on the board alone.

    Attributes:
        budget: boards that may still be expanded; `budget > 0` after `run` means the search was complete.
        best: the longest order of removals found, from the board `run` started at.
    """

    budget: int
    best: list[Pair] = field(default_factory=list)
    seen: set[tuple[int, ...]] = field(default_factory=set)  # row bitmasks of the boards expanded

    def run(self, pairs: JoinablePairs) -> bool:
        """Searches from `pairs` (not changed); returns whether `best` clears the board."""
        return self._search(pairs, [])

    def _search(self, pairs: JoinablePairs, path: list[Pair]) -> bool:
        if len(path) > len(self.best):
            self.best = path[:]
        if not pairs.tiles:
            return True
        key = tuple(pairs.bits[0])
        if key in self.seen or self.budget <= 0:
            return False
        self.seen.add(key)
        self.budget -= 1
        safe = pairs.safe_pair()
        for pair in [safe] if safe else pairs.pairs():
            child = copy.deepcopy(pairs)
            child.remove(pair)
            path.append(pair)
            if self._search(child, path):
                return True
            path.pop()
        return False


def connectable_pairs(board: np.ndarray) -> np.ndarray:
    """Every pair of same-type tiles joinable by a path of at most two turns (leaving the board by one cell at most).

    Args:
        board: (rows, cols) ints, tile type or EMPTY.

    Returns:
        (P, 4) int64 rows (r1, c1, r2, c2), the first cell first in row-major order, pairs in lexicographic order.
    """
    return np.array([[*a, *b] for a, b in JoinablePairs(board).pairs()], dtype=np.int64).reshape(-1, 4)


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
        return cached_renderer(difficulty["rows"], difficulty["cols"], Style.from_difficulty(difficulty), "Shisen-Sho")

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
            self._pairs = JoinablePairs(self.board)  # the legal actions, kept up to date by step
            if self._pairs:
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
        self._pairs = JoinablePairs(self.board)
        self.terminated = not self._pairs

    # ---- actions -----------------------------------------------------------------------------------------------------
    def legal_actions(self) -> list[Pair]:
        if self.terminated:
            return []
        return self._pairs.pairs()

    def random_legal_action(self, rng: np.random.Generator) -> Pair | None:
        """The base class's draw (one index into `legal_actions()`), without listing the pairs."""
        n = 0 if self.terminated else len(self._pairs)
        return self._pairs.pair_at(int(rng.integers(n))) if n else None

    def expert_move(self) -> ExpertMove:
        """A joinable pair that keeps the board clearable: a safe pair if there is one, else the first pair of a
        clearing order found by a bounded search; failing both, the pair that leaves the most pairs joinable.

        Raises:
            ValueError: the episode is over (no joinable pair).
        """
        if self.terminated:
            raise ValueError("shisen_sho: the episode is over; there is no pair to choose")
        words = self._views()[1]
        n = len(self._pairs)
        safe = self._pairs.safe_pair()
        if safe:
            (r1, c1), _ = safe
            why = f"the {words[self.board[r1, c1]]} tiles left can all be paired now, so this blocks nothing"
            return ExpertMove(safe, f"{n} pairs can be joined. I remove {self.format_action(safe)}: {why}.")
        search = ClearingSearch(EXPERT_SEARCH_STATES)
        if search.run(self._pairs):
            why = f"a search found an order of {len(search.best)} removals starting with it that clears the board"
        else:
            verdict = "no order clears the board" if search.budget > 0 else "my search found no order that clears it"
            why = f"{verdict}, and this starts the longest order of removals I found ({len(search.best)} pairs)"
        action = search.best[0]
        return ExpertMove(action, f"{n} pairs can be joined. I remove {self.format_action(action)}: {why}.")

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
        if pair is None or self.terminated or not self._pairs.remove(pair):
            return StepResult(self.invalid_penalty, self.terminated, {"valid": False})
        (r1, c1), (r2, c2) = pair
        self.board[r1, c1] = self.board[r2, c2] = EMPTY
        self.terminated = not self._pairs
        self.removed += 1
        self.score += 1
        self.steps += 1
        return StepResult(1.0, self.terminated, {"valid": True, "cleared": self._pairs.tiles == 0})

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
    for v in cells:
        if type(v) is not int and (isinstance(v, bool) or not isinstance(v, np.integer)):
            return None
    return _ordered((int(r1), int(c1)), (int(r2), int(c2)))
