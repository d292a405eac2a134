"""Board rendering shared by every game: a labelled grid of tiles drawn fast with Pillow and numpy.

A `BoardRenderer` lays out one board (row labels on the left, column labels on top, grid lines, optional title, side
panels such as Tetris's "Next" queue, a caption line below) and draws the static part once. Each frame is then a copy
of that background plus numpy slice assignments of tile sprites, which are drawn once per (tile, size, style) and
cached. That keeps a 640x840 frame well under a millisecond, so rendering never bounds the RL loop.

Perception difficulty lives here, shared by the games: the image size, the icon style (flat glyphs, procedural
textures, or photos from a folder of class subfolders such as CIFAR-10), and Gaussian pixel noise.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from envs.base import Knob, float_in, one_of

COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (220, 40, 40)),
    ("green", (30, 160, 60)),
    ("blue", (40, 80, 220)),
    ("yellow", (235, 200, 20)),
    ("magenta", (200, 40, 200)),
    ("cyan", (20, 190, 200)),
    ("orange", (245, 130, 20)),
    ("purple", (110, 50, 160)),
    ("brown", (130, 80, 40)),
    ("pink", (250, 150, 190)),
]
SHAPES: list[str] = ["circle", "square", "triangle", "diamond", "cross", "star", "hexagon", "ring"]
ICON_STYLES = ("glyph", "texture", "photo")
LAYOUTS = ("labelled", "cells")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

PAGE_BG = (250, 250, 250)
GRID_LINE = (70, 70, 70)
EMPTY_CELL = (222, 222, 222)
CARD_BG = (252, 252, 252)  # the cell behind a glyph, so that glyph colours stand out
NEUTRAL = (150, 150, 150)  # a tile with no colour
LABEL_FG = (20, 20, 20)
NOISE_PAD = 64  # noise frames are windows of one cached field, shifted by up to this many pixels per seed
SUPERSAMPLE = 3  # sprites are drawn at 3x and downsampled, for smooth edges
MIN_CELL_PX = 8


def _check_image_size(v: Any) -> str | None:
    ok = (
        isinstance(v, tuple)
        and len(v) == 2
        and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 56 <= x <= 4096 for x in v)
    )
    return None if ok else "a (width, height) pair of integers, each in [56, 4096]"


def _check_photo_dir(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str) and os.path.isdir(v) and _photo_classes(v):
        return None
    return "None or a folder whose subfolders (one per class) hold images"


PERCEPTION_KNOBS: dict[str, Knob] = {
    "image_size": Knob((644, 840), _check_image_size, "(width, height) of the frame in pixels; multiples of 28 suit"),
    "icon_style": Knob("glyph", one_of(*ICON_STYLES), "glyph: flat shapes; texture: patterned; photo: photo_dir"),
    "photo_dir": Knob(None, _check_photo_dir, "folder of class subfolders of images (CIFAR-10 layout) for 'photo'"),
    "noise": Knob(0.0, float_in(0.0, 0.5), "std of Gaussian pixel noise, as a fraction of 255"),
    "layout": Knob(
        "labelled", one_of(*LAYOUTS), "labelled: title, labels, caption; cells: the grid alone, edge to edge"
    ),
}


@dataclass(frozen=True)
class Tile:
    """What one cell shows; hashable, so its sprite is drawn once and cached."""

    colour: int | None = None  # index into COLOURS; None = neutral grey
    shape: int | None = None  # index into SHAPES (a glyph on a light card); None = the whole cell filled
    text: str | None = None  # text drawn centred in the cell, e.g. "128"
    photo_class: int | None = None  # with icon_style "photo": index of the class subfolder whose image fills the cell


@dataclass(frozen=True)
class Style:
    """The perception knobs that change how a board looks."""

    image_size: tuple[int, int]  # (width, height)
    icon_style: str
    photo_dir: str | None
    noise: float
    layout: str = "labelled"

    @classmethod
    def from_difficulty(cls, difficulty: dict) -> Style:
        """The style of a game's (already checked) difficulty; raises ValueError when 'photo' has no photo_dir."""
        style = cls(
            image_size=tuple(int(x) for x in difficulty["image_size"]),
            icon_style=difficulty["icon_style"],
            photo_dir=difficulty["photo_dir"],
            noise=float(difficulty["noise"]),
            layout=difficulty["layout"],
        )
        if style.icon_style == "photo" and style.photo_dir is None:
            raise ValueError(
                "difficulty key 'photo_dir' must be a folder of class subfolders when icon_style is 'photo'; got None"
            )
        return style


# ---- fonts, photos, sprites (cached module-wide: every renderer of the same size and style shares them) ----------
@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(1, size))


@functools.lru_cache(maxsize=16)
def _photo_classes(photo_dir: str) -> tuple[str, ...]:
    """Class subfolders that hold at least one image, sorted by name (the class index is the position)."""
    classes = []
    for name in sorted(os.listdir(photo_dir)):
        path = os.path.join(photo_dir, name)
        if os.path.isdir(path) and _photo_files(path):
            classes.append(path)
    return tuple(classes)


def photo_class_count(photo_dir: str) -> int:
    """How many classes (subfolders holding images) `photo_dir` has; games map tile types onto them."""
    return len(_photo_classes(photo_dir))


@functools.lru_cache(maxsize=256)
def _photo_files(class_dir: str) -> tuple[str, ...]:
    return tuple(
        os.path.join(class_dir, f) for f in sorted(os.listdir(class_dir)) if f.lower().endswith(PHOTO_SUFFIXES)
    )


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _text_colours(bg: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(fill, outline) with the best contrast on `bg`."""
    return ((20, 20, 20), (255, 255, 255)) if _luminance(bg) > 140 else ((255, 255, 255), (20, 20, 20))


def _shape_polygon(name: str, n: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygon shape inside an n x n box (None for shapes drawn otherwise)."""
    c, r = n / 2, n * 0.4
    if name == "triangle":
        return [(c, c - r), (c + r, c + r * 0.8), (c - r, c + r * 0.8)]
    if name == "diamond":
        return [(c, c - r), (c + r, c), (c, c + r), (c - r, c)]
    if name == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        return [(c + rad * np.cos(a), c - rad * np.sin(a)) for a, rad in zip(angles, radii, strict=True)]
    if name == "hexagon":
        angles = np.arange(6) * np.pi / 3
        return [(c + r * np.cos(a), c + r * np.sin(a)) for a in angles]
    return None


def _shape_mask(shape: int, n: int) -> Image.Image:
    """An 'L' mask (255 inside) of SHAPES[shape] in an n x n box."""
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    name = SHAPES[shape]
    c, r = n / 2, n * 0.4
    box = (c - r, c - r, c + r, c + r)
    polygon = _shape_polygon(name, n)
    if polygon is not None:
        draw.polygon(polygon, fill=255)
    elif name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, fill=255)
        draw.ellipse((c - r * 0.55, c - r * 0.55, c + r * 0.55, c + r * 0.55), fill=0)
    elif name == "square":
        draw.rectangle((c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85), fill=255)
    elif name == "cross":
        w = r * 0.35
        draw.rectangle((c - r, c - w, c + r, c + w), fill=255)
        draw.rectangle((c - w, c - r, c + w, c + r), fill=255)
    return mask


def _texture(colour: int, n: int) -> np.ndarray:
    """(n, n, 3) uint8 procedural texture of a colour: its pattern (stripes, checks, dots, diagonals) by index."""
    rgb = np.array(COLOURS[colour][1], dtype=np.float32)
    light = (rgb + (255 - rgb) * 0.6).astype(np.uint8)
    dark = (rgb * 0.75).astype(np.uint8)
    y, x = np.mgrid[0:n, 0:n]
    period = max(4, n // 6)
    kind = colour % 4
    if kind == 0:
        on = (y // (period // 2)) % 2 == 0  # horizontal stripes
    elif kind == 1:
        on = ((y // period) + (x // period)) % 2 == 0  # checks
    elif kind == 2:
        on = ((y % period - period / 2) ** 2 + (x % period - period / 2) ** 2) > (period * 0.3) ** 2  # dots
    else:
        on = ((x + y) // (period // 2)) % 2 == 0  # diagonal stripes
    return np.where(on[..., None], dark, light)


def _fill_rgb(tile: Tile) -> tuple[int, int, int]:
    return NEUTRAL if tile.colour is None else COLOURS[tile.colour][1]


def _photo(photo_dir: str, photo_class: int, n: int) -> Image.Image:
    classes = _photo_classes(photo_dir)
    if not 0 <= photo_class < len(classes):
        raise ValueError(
            f"photo_class {photo_class} needs more class subfolders than photo_dir {photo_dir!r} has ({len(classes)})"
        )
    with Image.open(_photo_files(classes[photo_class])[0]) as img:  # the first image by name: deterministic
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        return img.crop((left, top, left + side, top + side)).resize((n, n), Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=1024)  # ~64 KB each at the default sizes
def tile_sprite(tile: Tile, size: int, icon_style: str, photo_dir: str | None) -> np.ndarray:
    """(size, size, 3) uint8 read-only image of one tile; cached, so each distinct tile is drawn once."""
    n = size * SUPERSAMPLE
    fill = _fill_rgb(tile)
    if icon_style == "photo" and tile.photo_class is not None and photo_dir is not None:
        img = _photo(photo_dir, tile.photo_class, n)
        text_bg = (128, 128, 128)
    elif tile.shape is None:  # the whole cell in the tile's colour (or texture)
        if icon_style == "texture" and tile.colour is not None:
            img = Image.fromarray(_texture(tile.colour, n))
        else:
            img = Image.new("RGB", (n, n), fill)
        text_bg = fill
    else:  # a glyph on a light card
        img = Image.new("RGB", (n, n), CARD_BG)
        mask = _shape_mask(tile.shape, n)
        if icon_style == "texture" and tile.colour is not None:
            img.paste(Image.fromarray(_texture(tile.colour, n)), (0, 0), mask)
        else:
            img.paste(fill, (0, 0, n, n), mask)
        text_bg = fill
    if tile.text:
        font = _font(int(min(n * 0.5, n * 0.85 / (0.6 * len(tile.text)))))
        fg, outline = _text_colours(text_bg)
        ImageDraw.Draw(img).text(
            (n / 2, n / 2), tile.text, fill=fg, font=font, anchor="mm", stroke_width=SUPERSAMPLE, stroke_fill=outline
        )
    out = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=256)
def _text_strip(text: str, font_size: int, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 strip with `text` centred on the page colour (captions change rarely: cached)."""
    img = Image.new("RGB", (width, height), PAGE_BG)
    ImageDraw.Draw(img).text((width / 2, height / 2), text, fill=LABEL_FG, font=_font(font_size), anchor="mm")
    out = np.asarray(img, dtype=np.uint8).copy()
    out.flags.writeable = False
    return out


@dataclass(frozen=True)
class _Grid:
    """Pixel geometry of one grid: top-left corner, cell pitch, and the line width between cells."""

    x: int
    y: int
    rows: int
    cols: int
    cell: int
    line: int

    def cell_origins(self) -> tuple[list[int], list[int]]:
        """(ys, xs): top-left pixel of each cell's interior, by row and by column."""
        ys = [self.y + r * self.cell + self.line for r in range(self.rows)]
        xs = [self.x + c * self.cell + self.line for c in range(self.cols)]
        return ys, xs

    def box(self) -> tuple[int, int, int, int]:
        return (
            self.x,
            self.y,
            self.x + self.cols * self.cell + self.line - 1,
            self.y + self.rows * self.cell + self.line - 1,
        )


class BoardRenderer:
    """Draws one board layout fast: built once per game (cache it), then `draw_array` per frame.

    Args:
        rows, cols: the board's grid.
        style: image size, icon style, photo folder, noise.
        title: text above the board (e.g. the game's name), or "".
        panels: side panels to the right of the board, stacked top to bottom: (label, rows, cols), e.g.
            ("Next", 8, 4); drawn with the board's cell size, without row/column labels.

    Raises:
        ValueError: when the image is too small to show the board with readable cells.
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        style: Style,
        title: str = "",
        panels: Sequence[tuple[str, int, int]] = (),
    ) -> None:
        self.rows, self.cols, self.style = rows, cols, style
        self.panels = tuple(panels)
        width, height = style.image_size
        panel_cols = max((c for _, _, c in self.panels), default=0)
        panel_rows = sum(r for _, r, _ in self.panels)
        img = Image.new("RGB", (width, height), PAGE_BG)
        draw = ImageDraw.Draw(img)
        if style.layout == "cells":
            # The grid alone from the top-left corner, each cell a square `cell` px wide (its grid line included),
            # so with cell = 28 every cell is exactly one of Qwen2.5-VL's image tokens (2x2 patches of 14 px,
            # merged): a vision tower has nothing to read but the tiles, each in a token of its own. Nothing in the
            # pixels then says where a token is: its cell comes from M-RoPE alone, which turns by at most 0.03 rad
            # per row and 2e-4 per column in Qwen2.5-VL. The tiny model did not learn to use that (2048, same cold
            # start: cells read right 0.32, against 0.80 on the labelled frame, whose labels and margins place
            # every token), so this layout is a perception knob of its own, not a shortcut.
            cell = min(width // (cols + panel_cols), height // rows, height // panel_rows if panel_rows else height)
            line = max(1, cell // 24)
            self._check_cell(cell)
            self.board = _Grid(0, 0, rows, cols, cell, line)
            self.caption_box: tuple[int, int, int, int] | None = None
            self.panel_grids: list[_Grid] = []
            for _, prows, pcols in self.panels:
                self.panel_grids.append(
                    _Grid(cols * cell, sum(g.rows for g in self.panel_grids) * cell, prows, pcols, cell, line)
                )
            for grid in [self.board, *self.panel_grids]:
                self._draw_grid(draw, grid)
        else:
            self._draw_labelled(draw, title, panel_cols, panel_rows)
        self.cell, self.sprite_px = self.board.cell, self.board.cell - self.board.line
        self._background = np.asarray(img, dtype=np.uint8).copy()  # (H, W, 3)
        self._origins = [grid.cell_origins() for grid in [self.board, *self.panel_grids]]
        self._sprites: dict[Tile, np.ndarray] = {}
        self._noise: np.ndarray | None = None  # (H + NOISE_PAD, W + NOISE_PAD, 3) int16, built on first use

    def _check_cell(self, cell: int) -> None:
        if cell < MIN_CELL_PX:
            raise ValueError(
                f"difficulty key 'image_size' {self.style.image_size} is too small for a {self.rows}x{self.cols} board"
                f"{' with panels' if self.panels else ''}: cells would be {cell} px (at least {MIN_CELL_PX})"
            )

    def _draw_labelled(self, draw: ImageDraw.ImageDraw, title: str, panel_cols: int, panel_rows: int) -> None:
        """The labelled layout: title, row and column labels, the board centred, labelled panels, a caption band."""
        rows, cols = self.rows, self.cols
        width, height = self.style.image_size
        fs = int(np.clip(min(width, height) // 32, 9, 32))  # label font size
        margin = max(3, fs // 2)
        label_w = int(_font(fs).getlength(str(rows - 1))) + fs // 2
        title_h = int(fs * 1.7) if title else 0
        band_h = int(fs * 1.5)  # column labels above; caption below; panel labels
        panel_gap = fs if self.panels else 0
        avail_w = width - 2 * margin - label_w - panel_gap
        avail_h = height - 2 * margin - title_h - 2 * band_h
        line = max(1, min(avail_w // (cols + panel_cols), avail_h // rows) // 24)  # grid line width
        cell = min((avail_w - 2 * line) // (cols + panel_cols), (avail_h - line) // rows)
        if self.panels:
            panels_h = height - 2 * margin - title_h - len(self.panels) * (band_h + line)
            cell = min(cell, panels_h // panel_rows)
        self._check_cell(cell)
        board_w = cols * cell + line
        used_w = label_w + board_w + (panel_gap + panel_cols * cell + line if self.panels else 0)
        x0 = margin + label_w + (width - 2 * margin - used_w) // 2
        y0 = margin + title_h + band_h + (avail_h - rows * cell - line) // 2
        self.board = _Grid(x0, y0, rows, cols, cell, line)
        self.caption_box = (margin, y0 + rows * cell + line, width - 2 * margin, band_h)  # x, y, w, h
        self.caption_font = int(fs * 1.1)

        font = _font(fs)
        if title:
            draw.text(
                (width / 2, y0 - band_h - title_h / 2), title, fill=LABEL_FG, font=_font(int(fs * 1.3)), anchor="mm"
            )
        self._draw_grid(draw, self.board)
        for r in range(rows):
            draw.text((x0 - fs // 4, y0 + r * cell + cell / 2), str(r), fill=LABEL_FG, font=font, anchor="rm")
        for c in range(cols):
            draw.text((x0 + c * cell + cell / 2, y0 - band_h / 2), str(c), fill=LABEL_FG, font=font, anchor="mm")
        self.panel_grids = []
        panels_total_h = sum(band_h + r * cell + line for _, r, _ in self.panels)
        py, px = min(y0 - band_h, height - margin - panels_total_h), x0 + board_w + panel_gap
        for label, prows, pcols in self.panels:
            draw.text((px, py + band_h / 2), label, fill=LABEL_FG, font=font, anchor="lm")
            grid = _Grid(px, py + band_h, prows, pcols, cell, line)
            self._draw_grid(draw, grid)
            self.panel_grids.append(grid)
            py += band_h + prows * cell + line

    @staticmethod
    def _draw_grid(draw: ImageDraw.ImageDraw, grid: _Grid) -> None:
        draw.rectangle(grid.box(), fill=GRID_LINE)
        ys, xs = grid.cell_origins()
        s = grid.cell - grid.line
        for y in ys:
            for x in xs:
                draw.rectangle((x, y, x + s - 1, y + s - 1), fill=EMPTY_CELL)

    def _sprite(self, tile: Tile) -> np.ndarray:
        sprite = self._sprites.get(tile)
        if sprite is None:
            if not isinstance(tile, Tile):
                raise TypeError(f"cells must hold Tile or None, got {type(tile).__name__}")
            sprite = tile_sprite(tile, self.sprite_px, self.style.icon_style, self.style.photo_dir)
            self._sprites[tile] = sprite
        return sprite

    def _paint(self, out: np.ndarray, index: int, cells: Sequence[Sequence[Tile | None]]) -> None:
        ys, xs = self._origins[index]
        if len(cells) != len(ys) or any(len(row) != len(xs) for row in cells):
            what = "board" if index == 0 else f"panel {self.panels[index - 1][0]!r}"
            raise ValueError(f"{what} cells must be {len(ys)} rows x {len(xs)} columns")
        s, sprites = self.sprite_px, self._sprites
        for y, row in zip(ys, cells, strict=True):
            for x, tile in zip(xs, row, strict=True):
                if tile is not None:
                    sprite = sprites.get(tile)  # inlined lookup: this loop is the hot path of every frame
                    out[y : y + s, x : x + s] = self._sprite(tile) if sprite is None else sprite

    def draw_array(
        self,
        cells: Sequence[Sequence[Tile | None]],
        panel_cells: Sequence[Sequence[Sequence[Tile | None]]] = (),
        caption: str = "",
        noise_seed: int = 0,
    ) -> np.ndarray:
        """The frame as an (H, W, 3) uint8 array: background copy plus cached sprites (the fast path).

        Args:
            cells: rows x cols of Tile (or None for an empty cell).
            panel_cells: one rows x cols grid per panel, in the order given at construction (may be left empty).
            caption: one line below the board, e.g. "Score: 12".
            noise_seed: picks the noise pattern when the style has noise; the same seed gives the same frame.
        """
        out = self._background.copy()
        self._paint(out, 0, cells)
        if len(panel_cells) > len(self.panels):
            raise ValueError(f"got {len(panel_cells)} panel grids for {len(self.panels)} panels")
        for i, grid_cells in enumerate(panel_cells):
            self._paint(out, i + 1, grid_cells)
        if caption and self.caption_box is not None:  # the cells layout has no caption band
            x, y, w, h = self.caption_box
            out[y : y + h, x : x + w] = _text_strip(caption, self.caption_font, w, h)
        if self.style.noise > 0:
            out = self._add_noise(out, noise_seed)
        return out

    def draw(
        self,
        cells: Sequence[Sequence[Tile | None]],
        panel_cells: Sequence[Sequence[Sequence[Tile | None]]] = (),
        caption: str = "",
        noise_seed: int = 0,
    ) -> Image.Image:
        """The frame as an RGB PIL image of exactly `style.image_size`; see `draw_array`."""
        return Image.fromarray(self.draw_array(cells, panel_cells, caption, noise_seed), mode="RGB")

    def _add_noise(self, frame: np.ndarray, noise_seed: int) -> np.ndarray:
        # Drawing fresh Gaussian noise for a 640x840 frame costs ~20 ms; a window of one cached field at a
        # seed-chosen offset costs ~2 ms and is as deterministic.
        h, w, _ = frame.shape
        if self._noise is None:
            field = np.random.default_rng(0).standard_normal((h + NOISE_PAD, w + NOISE_PAD, 3), dtype=np.float32)
            self._noise = np.rint(field * self.style.noise * 255).astype(np.int16)
        dy, dx = np.random.default_rng(noise_seed).integers(0, NOISE_PAD, size=2)
        noisy = frame.astype(np.int16) + self._noise[dy : dy + h, dx : dx + w]
        return np.clip(noisy, 0, 255).astype(np.uint8)


# One renderer per (board size, style, title, panels), shared by every game of that kind: building one draws the
# background and its labels, which costs far more than a board.
cached_renderer = functools.lru_cache(maxsize=64)(BoardRenderer)
