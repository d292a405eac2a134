"""The shared board renderer: sizes, layout, determinism, styles (glyph, texture, photo), noise, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from envs.render import COLOURS, PERCEPTION_KNOBS, SHAPES, BoardRenderer, Style, Tile, photo_class_count


def _style(**kw) -> Style:
    values = {"image_size": (644, 840), "icon_style": "glyph", "photo_dir": None, "noise": 0.0, "layout": "labelled"}
    return Style(**{**values, **kw})


def _cell_pixels(renderer: BoardRenderer, frame: np.ndarray, r: int, c: int) -> np.ndarray:
    ys, xs = renderer.board.cell_origins()
    s = renderer.sprite_px
    return frame[ys[r] : ys[r] + s, xs[c] : xs[c] + s]


def test_palettes_start_with_the_paper_names():
    assert [name for name, _ in COLOURS[:6]] == ["red", "green", "blue", "yellow", "magenta", "cyan"]
    assert SHAPES[:6] == ["circle", "square", "triangle", "diamond", "cross", "star"]
    assert len(COLOURS) >= 8 and len(SHAPES) >= 6
    assert len({rgb for _, rgb in COLOURS}) == len(COLOURS)


@pytest.mark.parametrize("size", [(644, 840), (640, 840), (336, 336), (1008, 560)])
def test_frame_has_exactly_the_image_size(size):
    renderer = BoardRenderer(8, 8, _style(image_size=size), title="Swap", panels=[("Next", 4, 4)])
    frame = renderer.draw_array([[Tile(colour=1)] * 8] * 8, caption="Score: 3")
    assert frame.shape == (size[1], size[0], 3) and frame.dtype == np.uint8
    image = renderer.draw([[None] * 8] * 8)
    assert image.size == size and image.mode == "RGB"


def test_draw_and_draw_array_agree_and_are_deterministic():
    renderer = BoardRenderer(4, 4, _style(), title="2048")
    cells = [
        [Tile(colour=(r + c) % 6, text=str(2 ** (r + c + 1))) if (r + c) % 3 else None for c in range(4)]
        for r in range(4)
    ]
    a = renderer.draw_array(cells, caption="Score: 12")
    b = np.asarray(renderer.draw(cells, caption="Score: 12"))
    assert np.array_equal(a, b)
    assert np.array_equal(a, BoardRenderer(4, 4, _style(), title="2048").draw_array(cells, caption="Score: 12"))
    assert not np.array_equal(a, renderer.draw_array(cells, caption="Score: 13"))  # the caption is drawn


def test_tiles_change_only_their_own_cell():
    renderer = BoardRenderer(3, 3, _style())
    empty = renderer.draw_array([[None] * 3] * 3)
    cells = [[None] * 3 for _ in range(3)]
    cells[1][2] = Tile(colour=0, shape=0)
    frame = renderer.draw_array(cells)
    changed = np.argwhere((frame != empty).any(axis=2))
    ys, xs = renderer.board.cell_origins()
    assert changed[:, 0].min() >= ys[1] and changed[:, 0].max() < ys[1] + renderer.sprite_px
    assert changed[:, 1].min() >= xs[2] and changed[:, 1].max() < xs[2] + renderer.sprite_px
    # A filled tile shows its colour; a glyph shows its colour on a light card.
    cells[1][2] = Tile(colour=2)
    filled = _cell_pixels(renderer, renderer.draw_array(cells), 1, 2)
    assert np.abs(filled.reshape(-1, 3).mean(0) - COLOURS[2][1]).max() < 2


def test_distinct_tiles_look_distinct():
    renderer = BoardRenderer(2, 2, _style())
    sprites = {}
    for colour in range(6):
        for shape in range(6):
            sprites[colour, shape] = renderer._sprite(Tile(colour=colour, shape=shape))
    flat = [s.tobytes() for s in sprites.values()]
    assert len(set(flat)) == len(flat)


def test_texture_style_patterns_each_colour_differently():
    renderer = BoardRenderer(2, 2, _style(icon_style="texture"))
    textures = [renderer._sprite(Tile(colour=c)) for c in range(4)]
    for tex in textures:
        assert len(np.unique(tex.reshape(-1, 3), axis=0)) > 1  # a pattern, not a flat fill
    assert len({t.tobytes() for t in textures}) == 4


def test_photo_style_fills_cells_with_the_class_image(photo_dir):
    assert photo_class_count(photo_dir) == 6  # the empty subfolder and the stray file are not classes
    renderer = BoardRenderer(2, 2, _style(icon_style="photo", photo_dir=photo_dir))
    frame = renderer.draw_array([[Tile(colour=0, photo_class=2), None], [None, Tile(colour=0, photo_class=4)]])
    assert np.abs(_cell_pixels(renderer, frame, 0, 0).reshape(-1, 3).mean(0) - (30, 30, 200)).max() < 2
    assert np.abs(_cell_pixels(renderer, frame, 1, 1).reshape(-1, 3).mean(0) - (30, 200, 200)).max() < 2
    with pytest.raises(ValueError, match="photo_class 9"):
        renderer.draw_array([[Tile(photo_class=9), None], [None, None]])


def test_noise_is_seeded_and_bounded():
    cells = [[Tile(colour=1)] * 4] * 4
    clean = BoardRenderer(4, 4, _style()).draw_array(cells)
    noisy = BoardRenderer(4, 4, _style(noise=0.1))
    a, b, c = (
        noisy.draw_array(cells, noise_seed=1),
        noisy.draw_array(cells, noise_seed=1),
        noisy.draw_array(cells, noise_seed=2),
    )
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    diff = a.astype(np.int16) - clean
    assert 0.05 * 255 < diff.std() < 0.15 * 255


def test_panels_are_drawn_right_of_the_board():
    renderer = BoardRenderer(20, 10, _style(), title="Tetris", panels=[("Next", 8, 4), ("Hold", 4, 4)])
    empty = renderer.draw_array([[None] * 10] * 20)
    panel = [[None] * 4 for _ in range(8)]
    panel[0][0] = Tile(colour=3)
    frame = renderer.draw_array([[None] * 10] * 20, [panel])
    changed = np.argwhere((frame != empty).any(axis=2))
    board_right = renderer.board.box()[2]
    assert changed[:, 1].min() > board_right


def test_cells_layout_puts_each_cell_in_its_own_28_px_image_token():
    """layout=cells: the grid alone from the top-left corner; at 28 px a cell is one Qwen2.5-VL token (2x2 patches)."""
    renderer = BoardRenderer(4, 4, _style(image_size=(112, 112), layout="cells"), title="2048")
    assert renderer.cell == 28 and renderer.board.x == renderer.board.y == 0
    empty = renderer.draw_array([[None] * 4] * 4, caption="Score: 12")
    assert np.array_equal(empty, renderer.draw_array([[None] * 4] * 4))  # no caption band, no title, no labels
    for r, c in [(0, 0), (1, 2), (3, 3)]:
        cells = [[None] * 4 for _ in range(4)]
        cells[r][c] = Tile(colour=0, text="2")
        changed = np.argwhere((renderer.draw_array(cells) != empty).any(axis=2))
        token = np.array([28 * r, 28 * c])
        assert (changed.min(axis=0) >= token).all() and (changed.max(axis=0) < token + 28).all()
        assert len(changed) > 0.8 * 28 * 28  # the tile fills its token, grid line aside
    # Panels sit right of the board, in the same cell pitch; a frame too small for 8 px cells is refused.
    with_panel = BoardRenderer(4, 4, _style(image_size=(168, 112), layout="cells"), panels=[("Next", 2, 2)])
    assert with_panel.cell == 28 and (with_panel.panel_grids[0].x, with_panel.panel_grids[0].y) == (112, 0)
    with pytest.raises(ValueError, match="image_size"):
        BoardRenderer(8, 8, _style(image_size=(60, 60), layout="cells"))


def test_wrong_cell_grids_and_types_raise():
    renderer = BoardRenderer(3, 3, _style(), panels=[("Next", 2, 2)])
    with pytest.raises(ValueError, match="3 rows x 3 columns"):
        renderer.draw_array([[None] * 3] * 2)
    with pytest.raises(ValueError, match="panel 'Next'"):
        renderer.draw_array([[None] * 3] * 3, [[[None] * 3] * 2])
    with pytest.raises(ValueError, match="panel grids"):
        renderer.draw_array([[None] * 3] * 3, [[[None] * 2] * 2] * 2)
    with pytest.raises(TypeError, match="Tile or None"):
        renderer.draw_array([["red"] * 3] * 3)


def test_too_small_an_image_names_image_size():
    with pytest.raises(ValueError, match="'image_size'"):
        BoardRenderer(40, 40, _style(image_size=(56, 56)))


def test_perception_knob_checks(photo_dir, tmp_path):
    size = PERCEPTION_KNOBS["image_size"]
    assert size.check(size.default) is None and size.default[0] % 28 == 0 and size.default[1] % 28 == 0
    for bad in [(55, 100), (100, 5000), (100,), (100.0, 100), "640x840", (True, 100)]:
        assert size.check(bad) is not None
    assert PERCEPTION_KNOBS["icon_style"].check("photo") is None
    assert PERCEPTION_KNOBS["icon_style"].check("emoji") is not None
    assert PERCEPTION_KNOBS["photo_dir"].check(photo_dir) is None
    assert PERCEPTION_KNOBS["photo_dir"].check(None) is None
    assert PERCEPTION_KNOBS["photo_dir"].check(str(tmp_path / "missing")) is not None
    assert PERCEPTION_KNOBS["photo_dir"].check(str(tmp_path)) is not None  # no class subfolders
    assert PERCEPTION_KNOBS["noise"].check(0.5) is None and PERCEPTION_KNOBS["noise"].check(0.6) is not None


def test_photo_style_without_a_folder_names_photo_dir():
    difficulty = {
        "image_size": (644, 840),
        "icon_style": "photo",
        "photo_dir": None,
        "noise": 0.0,
        "layout": "labelled",
    }
    with pytest.raises(ValueError, match="'photo_dir'"):
        Style.from_difficulty(difficulty)


def test_sprites_are_read_only_and_cached():
    renderer = BoardRenderer(2, 2, _style())
    sprite = renderer._sprite(Tile(colour=1, text="8"))
    assert sprite is renderer._sprite(Tile(colour=1, text="8"))
    with pytest.raises(ValueError):
        sprite[0, 0] = 0
    assert isinstance(renderer.draw([[None] * 2] * 2), Image.Image)
