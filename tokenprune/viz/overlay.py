"""See what was kept: the kept visual tokens of a pruned prefill drawn over the picture (Pillow only, headless).

Drawing reads only the geometry of an :class:`~tokenprune.record.ImageRecord` (``boxes``, ``view``, ``segments``,
``merged``), so every model family draws the same way:

* kept tokens show the picture as it is; pruned tokens are dimmed; tokens folded into a merged token are tinted
  with that merged token's colour (one colour per merged token); the part of the picture the model never saw (outside
  LLaVA-1.5's centre crop) is darkened further;
* one panel per view of the picture (``segments``): LLaVA-NeXT's base tile and its high-resolution crops side by
  side, both over the original image; one panel per frame of a video; InternVL's tiles (``view="tiles"``) each at
  its place in the picture in one panel, the thumbnail in a second;
* tokens without a place in the picture (NaN boxes: LLaVA-NeXT's row-end newline tokens) are counted, not drawn.

Layout (what the tests rely on): panels of ``size`` px on the longest side, each under a caption strip of
:data:`HEADER` px, separated by :data:`GAP` px; an optional legend strip below.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tokenprune.record import ImageRecord, PruneRecord, grid_boxes

HEADER = 20                     # px: caption strip above each panel
GAP = 6                         # px: between panels
LEGEND = 20                     # px: legend strip below the panels (legend=True)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
DIM = 0.3                       # pruned tokens: the picture times DIM (darker)
UNSEEN = 0.12                   # outside the model's view (LLaVA-1.5's centre crop): times UNSEEN
TINT = 0.6                      # merged tokens: DIM-ed picture blended with the merged token's colour at TINT
PALETTE = (                     # merged-token colours, cycled by merged-token index
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
)
NEXT_VIEWS = {0: "base tile", 1: "high-res crops"}  # captions of an image's segments (LLaVA-NeXT)


def font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (no font files needed)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def image_record(record: Any, image_index: int = 0) -> ImageRecord:
    """The :class:`ImageRecord` to draw from an ImageRecord, a PruneRecord (``handle.last``) or a handle."""
    record = getattr(record, "last", record)  # a PruningHandle
    if isinstance(record, PruneRecord):
        if not 0 <= image_index < len(record.images):
            raise IndexError(f"image_index={image_index} but the record has {len(record.images)} image(s)")
        return record.images[image_index]
    if isinstance(record, ImageRecord):
        return record
    raise TypeError(
        f"expected an ImageRecord, a PruneRecord or a PruningHandle with a pruned prefill; got {type(record).__name__}"
        " (run a prefill with pruning enabled first: handle.last is None before)"
    )


def _boxes(rec: ImageRecord) -> np.ndarray:
    boxes = rec.boxes if rec.boxes is not None else grid_boxes(rec.grid, rec.n)
    if boxes is None:
        raise ValueError(
            f"this record has no geometry (no boxes and no grid matching its {rec.n} tokens); its adapter does not "
            "say where the tokens are in the picture, so they cannot be drawn"
        )
    boxes = torch.as_tensor(boxes, dtype=torch.float64).cpu().numpy()
    if boxes.shape != (rec.n, 4):
        raise ValueError(f"record.boxes must be [n, 4] = [{rec.n}, 4]; got {list(boxes.shape)}")
    return boxes


def _view_rect(view: str, width: int, height: int) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` in panel pixels of the picture the boxes are fractions of."""
    if view in ("image", "tiles"):  # tile boxes are placed in the picture by draw_kept
        return 0.0, 0.0, float(width), float(height)
    if view == "center_crop":  # the square the CLIP processor keeps: shortest edge, centred
        side = float(min(width, height))
        return (width - side) / 2, (height - side) / 2, side, side
    raise ValueError(f"unknown record.view {view!r}; expected 'image' or 'center_crop'")


def _pixel_box(box: np.ndarray, rect: tuple[float, float, float, float], width: int, height: int) -> tuple[int, ...]:
    x, y, w, h = rect
    x0, x1 = (min(max(round(x + f * w), 0), width) for f in (box[0], box[2]))
    y0, y1 = (min(max(round(y + f * h), 0), height) for f in (box[1], box[3]))
    return x0, y0, x1, y1


def _panel(picture: Image.Image, rec: ImageRecord, boxes: np.ndarray, tokens: np.ndarray, size: int,
           outline: tuple[int, int, int] | None) -> Image.Image:
    """One view: ``tokens`` (indices into the record) drawn over ``picture`` scaled to ``size`` on its longest side."""
    scale = size / max(picture.size)
    width, height = max(1, round(picture.width * scale)), max(1, round(picture.height * scale))
    original = np.asarray(picture.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    rect = _view_rect(rec.view, width, height)
    out = original * UNSEEN
    vx0, vy0, vx1, vy1 = _pixel_box(np.array([0.0, 0.0, 1.0, 1.0]), rect, width, height)
    out[vy0:vy1, vx0:vx1] = original[vy0:vy1, vx0:vx1] * DIM
    kept = rec.kept_mask().numpy()
    merged = rec.merged.cpu().numpy() if rec.merged is not None else np.full(rec.n, -1)
    kept_boxes = []
    for i in tokens[~kept[tokens] & (merged[tokens] >= 0)]:  # merged first: kept tokens win any overlap
        x0, y0, x1, y1 = _pixel_box(boxes[i], rect, width, height)
        colour = np.array(PALETTE[int(merged[i]) % len(PALETTE)], dtype=np.float32)
        out[y0:y1, x0:x1] = original[y0:y1, x0:x1] * DIM * (1 - TINT) + colour * TINT
    for i in tokens[kept[tokens]]:
        x0, y0, x1, y1 = _pixel_box(boxes[i], rect, width, height)
        out[y0:y1, x0:x1] = original[y0:y1, x0:x1]
        kept_boxes.append((x0, y0, x1, y1))
    panel = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    if outline is not None:
        draw = ImageDraw.Draw(panel)
        for x0, y0, x1, y1 in kept_boxes:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=outline)
    return panel


def _caption(rec: ImageRecord, tokens: np.ndarray, name: str | None) -> str:
    kept = rec.kept_mask().numpy()[tokens]
    text = f"{int(kept.sum())}/{len(tokens)} kept"
    if rec.merged is not None:
        folded = int((rec.merged.cpu().numpy()[tokens] >= 0).sum())
        if folded:
            text += f", {folded} merged into {rec.n_merged}"
    return f"{name}: {text}" if name else text


def draw_kept(
    image: Image.Image | Sequence[Image.Image],
    record: Any,
    *,
    image_index: int = 0,
    size: int = 336,
    title: str | None = None,
    outline: tuple[int, int, int] | None = None,
    legend: bool = True,
    save: str | Path | None = None,
) -> Image.Image:
    """Draw which visual tokens of one image survived pruning, over the original picture.

    ``record``: ``handle.last`` (pick the image with ``image_index``), one of its ``images``, or the handle itself.
    ``image``: the picture given to the processor (a list of frames for a video: the ``j``-th of ``m`` segments is
    drawn over frame ``j * len(frames) // m``). ``title`` prefixes the caption (default: the method's name when known);
    ``outline`` an RGB colour to frame each kept token. Returns the figure; ``save`` also writes it as PNG.
    """
    rec = image_record(record, image_index)
    if title is None:
        title = getattr(getattr(record, "last", record), "method", None)
    boxes = _boxes(rec)
    placed = ~np.isnan(boxes).any(axis=1)
    segments = rec.segments.cpu().numpy() if rec.segments is not None else np.zeros(rec.n, dtype=np.int64)
    frames = [image] if isinstance(image, Image.Image) else list(image)
    names = {}
    if rec.view == "tiles":
        boxes, segments, names = place_tiles(boxes, segments, *frames[0].size)
    views = sorted(set(segments[placed].tolist()))
    panels, captions = [], []
    for j, seg in enumerate(views):
        tokens = np.flatnonzero(placed & (segments == seg))
        frame = frames[min(len(frames) - 1, j * len(frames) // len(views))]
        panels.append(_panel(frame, rec, boxes, tokens, size, outline))
        name = names.get(seg)
        if rec.segments is not None and name is None:
            name = f"t={seg}" if rec.kind == "video" else NEXT_VIEWS.get(seg, f"view {seg}")
        captions.append(_caption(rec, tokens, name))
    unplaced = int((~placed).sum())
    if unplaced:
        captions[-1] += f" (+{int(rec.kept_mask().numpy()[~placed].sum())} of {unplaced} unplaced kept)"
    if title:
        captions[0] = f"{title} | {captions[0]}"
    figure = _compose(panels, captions, legend=legend_items(rec, frames[0]) if legend else None)
    if save is not None:
        figure.save(save, format="PNG")
    return figure


def tile_grid(n_tiles: int, width: int, height: int) -> tuple[int, int]:
    """``(columns, rows)`` of InternVL's ``n_tiles`` tiles over a ``width`` x ``height`` picture: of the grids with
    that many tiles, the one whose aspect ratio is closest to the picture's (the processor's own rule,
    ``GotOcr2ImageProcessor``'s ``get_optimal_tiled_canvas``, chose the grid that way among all allowed counts)."""
    grids = [(c, n_tiles // c) for c in range(1, n_tiles + 1) if n_tiles % c == 0]
    return min(grids, key=lambda g: abs(width / height - g[0] / g[1]))


def place_tiles(boxes: np.ndarray, segments: np.ndarray, width: int, height: int
                ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A ``view="tiles"`` record (boxes as fractions of each tile, ``segments`` = tile index, the thumbnail last)
    placed in the picture: the grid tiles, row-major as the processor cuts them, become one view (0) with boxes as
    fractions of the picture; the thumbnail, the whole picture resized, a second view (1). Returns the boxes, the
    views and their captions."""
    n_grid = int(segments.max())  # tiles before the thumbnail
    columns, rows = tile_grid(n_grid, width, height)
    column, row = segments % columns, segments // columns
    grid = segments < n_grid
    placed = boxes.copy()
    placed[grid] = (boxes[grid] + np.stack([column, row, column, row], 1)[grid]) / [columns, rows, columns, rows]
    return placed, (~grid).astype(np.int64), {0: f"{columns}x{rows} tiles", 1: "thumbnail"}


def legend_items(rec: ImageRecord, picture: Image.Image) -> list[tuple[str, tuple[int, int, int]]]:
    """What the legend shows for this record drawn over this picture."""
    grey = 160
    items = [("kept", (grey,) * 3), ("pruned", (round(grey * DIM),) * 3)]
    if rec.merged is not None and bool((rec.merged >= 0).any()):
        items.append(("merged (colour = merged token)", PALETTE[0]))
    if rec.view == "center_crop" and picture.width != picture.height:
        items.append(("not seen (outside the centre crop)", (round(grey * UNSEEN),) * 3))
    return items


def _compose(panels: list[Image.Image], captions: list[str],
             legend: list[tuple[str, tuple[int, int, int]]] | None) -> Image.Image:
    small = font(12)
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    last_caption = width - panels[-1].width + 4 + _text_width(captions[-1], small)  # a long caption widens the figure
    width = max(width, last_caption, legend_width(legend) if legend else 0)
    height = HEADER + max(p.height for p in panels) + (LEGEND if legend else 0)
    figure = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    x = 0
    for panel, caption in zip(panels, captions, strict=True):
        figure.paste(panel, (x, HEADER))
        draw.text((x + 2, 3), caption, fill=TEXT, font=small)
        x += panel.width + GAP
    if legend:
        draw_legend(draw, height - LEGEND + 4, legend)
    return figure


def _text_width(text: str, which: Any) -> int:
    return int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=which))


def legend_width(items: Sequence[tuple[str, tuple[int, int, int]]]) -> int:
    """Pixels the legend line of ``items`` needs."""
    return 2 + sum(15 + _text_width(label, font(12)) + 12 for label, _ in items)


def draw_legend(draw: ImageDraw.ImageDraw, y: int, items: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    """Colour swatches with labels in one line starting at ``(2, y)``."""
    small, x = font(12), 2
    for label, colour in items:
        draw.rectangle((x, y, x + 11, y + 11), fill=colour, outline=TEXT)
        draw.text((x + 15, y - 1), label, fill=TEXT, font=small)
        x += 15 + int(draw.textlength(label, font=small)) + 12


def tile(cells: dict[tuple[str, str], Image.Image], rows: Sequence[str], columns: Sequence[str],
         title: str | None = None, legend: Sequence[tuple[str, tuple[int, int, int]]] | None = None) -> Image.Image:
    """A labelled grid of figures: ``cells[(row, column)]``; rows labelled on the left, columns on top, an optional
    legend strip of :data:`LEGEND` px at the bottom."""
    small = font(13)
    label_w = 8 + max(_text_width(r, small) for r in rows)
    cell_w = max(c.width for c in cells.values())
    cell_h = max(c.height for c in cells.values())
    top = HEADER * (2 if title else 1)
    height = top + len(rows) * (cell_h + GAP) + (LEGEND if legend else 0)
    width = max(label_w + len(columns) * (cell_w + GAP), 8 + _text_width(title or "", small),
                legend_width(legend) if legend else 0)
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill=TEXT, font=small)
    for j, col in enumerate(columns):
        draw.text((label_w + j * (cell_w + GAP) + 2, top - HEADER + 3), col, fill=TEXT, font=small)
    for i, row in enumerate(rows):
        y = top + i * (cell_h + GAP)
        draw.text((4, y + cell_h // 2 - 7), row, fill=TEXT, font=small)
        for j, col in enumerate(columns):
            if (row, col) in cells:
                grid.paste(cells[(row, col)], (label_w + j * (cell_w + GAP), y))
    if legend:
        draw_legend(draw, height - LEGEND + 4, legend)
    return grid

