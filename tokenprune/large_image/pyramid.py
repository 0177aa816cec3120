"""Dynamic Image Pyramid geometry of a very large image (LRS-VQA, Luo et al., ICCV 2025, arXiv 2503.07588).

Levels, coarse to fine (official code VisionXLab/LRS-VQA, ``process_images``' ``pyramid_crop`` branch):

* the pyramid ratios are ``1, 1/2, 1/4, ...`` while they stay ``>= min_scale``, where ``min_scale = base_tiles *
  tile / long side`` (capped at 1: the base level fits ``base_tiles`` tiles on its long side, 3 x 336 = 1008 px in
  the official code); ``min_scale`` itself is added when the halving skipped past it, and the global ratio
  ``min(tile / H, tile / W)`` (the whole image in one tile) comes last;
* at ratio ``r`` the image is resized to ``h = round(H r)``, ``w = round(W r)``, then scaled by
  ``min(ceil(h / tile) tile / h, ceil(w / tile) tile / w)`` (so one side fills the tile grid exactly) and padded on the
  right/bottom to ``ceil(. / tile)`` tiles.

Worked example (tested): 8,000 x 8,000 px, tile 336 -> levels 1x1 (global), 3x3 (1008 px), 6x6 (2016 px),
12x12 (4032 px), 24x24 (8064 px): 766 tiles, of which the coarse-to-fine search encodes a few dozen.

Nothing here holds pixels: a tile is rendered from the original PIL image on demand (:func:`render_tile`), so the
full-resolution image is never converted to a float tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Level:
    """One pyramid level: the image resized to ``size`` ``(h, w)`` px, cut into ``grid`` ``(rows, cols)`` tiles of
    ``tile`` px (the last row/column padded). ``index`` 0 is the global thumbnail, the last is the finest."""

    index: int
    ratio: float
    size: tuple[int, int]
    grid: tuple[int, int]
    tile: int

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    def tiles(self) -> list[tuple[int, int]]:
        """Every ``(row, col)`` of the level, raster order."""
        return [(r, c) for r in range(self.grid[0]) for c in range(self.grid[1])]

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the image part of tile ``(row, col)`` in level pixels (edge tiles: clipped)."""
        if not (0 <= row < self.grid[0] and 0 <= col < self.grid[1]):
            rows, cols = self.grid
            raise IndexError(f"tile ({row}, {col}) outside the {rows}x{cols} grid of level {self.index}")
        h, w = self.size
        t = self.tile
        return col * t, row * t, min((col + 1) * t, w), min((row + 1) * t, h)

    def source_box(self, row: int, col: int, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of tile ``(row, col)`` in the ORIGINAL image's pixels (``image_size`` ``(H, W)``)."""
        x0, y0, x1, y1 = self.tile_box(row, col)
        sy, sx = image_size[0] / self.size[0], image_size[1] / self.size[1]
        return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def _level(index: int, ratio: float, height: int, width: int, tile: int) -> Level:
    h, w = max(1, round(height * ratio)), max(1, round(width * ratio))
    fit = min(math.ceil(h / tile) * tile / h, math.ceil(w / tile) * tile / w)
    rh, rw = round(h * fit), round(w * fit)
    return Level(index, ratio, (rh, rw), (math.ceil(rh / tile), math.ceil(rw / tile)), tile)


def build_pyramid(height: int, width: int, tile: int, base_tiles: int = 3) -> list[Level]:
    """The pyramid levels of an ``height x width`` image, coarse (global thumbnail) to fine (ratio 1)."""
    if tile < 1 or base_tiles < 1:
        raise ValueError(f"tile and base_tiles must be >= 1; got tile={tile}, base_tiles={base_tiles}")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive; got {height}x{width}")
    if max(height, width) <= tile:
        raise ValueError(
            f"a {width}x{height} image fits one {tile}-px tile: there is no pyramid to search "
            "(answer_large_image takes the model's plain path for it)"
        )
    min_scale = min(base_tiles * tile / max(height, width), 1.0)
    ratios, r = [], 1.0
    while r >= min_scale:
        ratios.append(r)
        r /= 2
    if ratios[-1] > min_scale:
        ratios.append(min_scale)
    ratios.append(min(tile / height, tile / width))
    ratios = sorted(set(ratios))  # coarse to fine
    return [_level(i, ratio, height, width, tile) for i, ratio in enumerate(ratios)]


def child_tile(parent: Level, child: Level, x: float, y: float) -> tuple[int, int] | None:
    """The tile of ``child`` under the point ``(x, y)`` given in ``parent``'s level pixels; ``None`` when the point
    lies on ``parent``'s padding (outside the image)."""
    h, w = parent.size
    if not (0 <= x < w and 0 <= y < h):
        return None
    col = min(int(x / w * child.size[1] // child.tile), child.grid[1] - 1)
    row = min(int(y / h * child.size[0] // child.tile), child.grid[0] - 1)
    return row, col


def render_tile(
    image: Image.Image, level: Level, row: int, col: int, fill: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Tile ``(row, col)`` of ``level`` as a ``tile x tile`` RGB image: the matching part of ``image`` resized
    (bilinear, from the original pixels) and pasted top-left on a ``fill`` canvas (the padding of edge tiles)."""
    x0, y0, x1, y1 = level.tile_box(row, col)
    part = image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR,
                        box=level.source_box(row, col, (image.height, image.width)))
    canvas = Image.new("RGB", (level.tile, level.tile), fill)
    canvas.paste(part.convert("RGB"), (0, 0))
    return canvas
