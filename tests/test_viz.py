"""Overlay geometry: the bright cells of a drawing are exactly the kept tokens, for every family's record layout.

Pictures are uniform grey, so every pixel's look is known: kept = the grey itself, pruned = grey * DIM, merged =
the merged token's colour blended in, outside the model's view = grey * UNSEEN. The centre pixel of every token's
cell is read back from the figure and classified; the classes must match the record exactly.
"""

import math

import numpy as np
import pytest
import torch
from conftest import PROMPT
from PIL import Image

from tokenprune import list_methods
from tokenprune.methods import METHODS
from tokenprune.record import ImageRecord, PruneRecord, grid_boxes
from tokenprune.tiny_models import tiny_llava
from tokenprune.viz import GAP, HEADER, LEGEND, PALETTE, compare, draw_kept, prune_once, runnable_methods
from tokenprune.viz.overlay import DIM, TINT, UNSEEN

GREY = 128


def grey(width, height, value=GREY):
    return Image.new("RGB", (width, height), (value, value, value))


def random_kept(n, k, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def centre(figure, box, panel_x, rect):
    """RGB at the centre of a token's cell: ``box`` fractions of ``rect`` = (x, y, w, h) inside the panel."""
    x, y, w, h = rect
    cx = panel_x + math.floor(x + (box[0] + box[2]) / 2 * w)
    cy = HEADER + math.floor(y + (box[1] + box[3]) / 2 * h)
    return figure.getpixel((cx, cy))


def assert_looks(figure, rec, panel_of, rects, value=GREY):
    """Every placed token: kept -> ``value``, merged -> its colour, pruned -> dimmed; nothing else."""
    merged = rec.merged if rec.merged is not None else torch.full((rec.n,), -1)
    kept = set(rec.kept.tolist())
    seen_kept = set()
    for i in range(rec.n):
        box = rec.boxes[i].tolist()
        if any(math.isnan(v) for v in box):
            continue
        panel_x, value_i = panel_of(i)
        pixel = np.array(centre(figure, box, panel_x, rects[panel_x]))
        v = value_i if value_i is not None else value
        if i in kept:
            assert (pixel == v).all(), (i, pixel)
            seen_kept.add(i)
        elif merged[i] >= 0:
            expected = v * DIM * (1 - TINT) + np.array(PALETTE[int(merged[i]) % len(PALETTE)]) * TINT
            assert np.abs(pixel - expected).max() <= 1, (i, pixel, expected)
        else:
            assert np.abs(pixel - v * DIM).max() <= 1, (i, pixel)
    placed = {i for i in kept if not torch.isnan(rec.boxes[i]).any()}
    assert seen_kept == placed


def test_llava_center_crop_on_a_wide_picture_end_to_end():
    """The real tiny LLaVA-1.5 (8x8 grid): boxes are fractions of the centre crop; the sides were never seen."""
    model, processor = tiny_llava()
    image = grey(96, 64)
    for method in runnable_methods(model):
        record = prune_once(model, processor, image, PROMPT, method, keep=16)
        rec = record.images[0]
        assert rec.view == "center_crop"
        assert rec.n_kept == 16 or method == "recoverable"  # kept + merged; Recoverable's count is data-dependent
        figure = draw_kept(image, record, size=384, legend=False)  # panel 384x256, crop 256x256 at x=64
        assert figure.size == (384, HEADER + 256)
        assert_looks(figure, rec, lambda i: (0, None), {0: (64, 0, 256, 256)})
        for x in (5, 60, 330, 380):  # outside the crop
            assert figure.getpixel((x, HEADER + 128)) == (round(GREY * UNSEEN),) * 3


def next_like_record(width=48, height=36, seed=0):
    """LLaVA-NeXT layout: a 24x24 base tile over the whole image, then the unpadded high-res grid (height rows of
    width patches, each row followed by a newline token with no place: NaN box)."""
    base = grid_boxes((24, 24))
    hi = grid_boxes((height, width)).view(height, width, 4)
    newline = torch.full((height, 1, 4), float("nan"))
    hi = torch.cat([hi, newline], dim=1).reshape(-1, 4)
    boxes = torch.cat([base, hi])
    segments = torch.cat([torch.zeros(len(base), dtype=torch.long), torch.ones(len(hi), dtype=torch.long)])
    n = len(boxes)
    return ImageRecord(0, 0, n, random_kept(n, n // 5, seed), boxes=boxes, view="image", segments=segments)


def test_llava_next_base_tile_and_unpadded_crops_side_by_side():
    rec = next_like_record()
    image = grey(400, 300)
    figure = draw_kept(image, rec, size=480, legend=False)  # two panels of 480x360
    assert figure.size == (2 * 480 + GAP, HEADER + 360)
    rect = (0, 0, 480, 360)
    assert_looks(figure, rec, lambda i: (0 if i < 576 else 480 + GAP, None), {0: rect, 480 + GAP: rect})
    assert figure.getpixel((480 + GAP // 2, HEADER + 100)) == (255, 255, 255)  # the gap between the panels


def qwen_like_record(seed=0, with_merged=True):
    """Qwen2-VL: a dynamic, non-square grid of 2x2-merged tokens (7 rows x 10 columns), boxes over the image;
    some pruned tokens folded into two merged tokens."""
    n = 70
    kept = random_kept(n, 20, seed)
    merged = None
    if with_merged:
        merged = torch.full((n,), -1)
        pruned = torch.ones(n, dtype=torch.bool)
        pruned[kept] = False
        folded = pruned.nonzero().squeeze(1)[::2]
        merged[folded] = torch.arange(len(folded)) % 2
    return ImageRecord(0, 0, n, kept, grid=(7, 10), boxes=grid_boxes((7, 10)), view="image", merged=merged,
                       n_merged=2 if with_merged else 0)


def test_qwen_non_square_grid_with_merged_tokens():
    rec = qwen_like_record()
    figure = draw_kept(grey(280, 196), rec, size=560)  # panel 560x392: 56 px cells
    assert figure.size == (560, HEADER + 392 + LEGEND)
    assert_looks(figure, rec, lambda i: (0, None), {0: (0, 0, 560, 392)})
    # the two merged tokens are told apart by colour
    colours = {tuple(centre(figure, rec.boxes[i].tolist(), 0, (0, 0, 560, 392))) for i in range(70)
               if rec.merged[i] >= 0}
    assert len(colours) == 2


def test_video_draws_one_panel_per_frame_over_its_frame():
    """Qwen video: segments = temporal index; with 4 frames and 2 merged frame pairs, pair t is drawn over frame 2t."""
    grid = grid_boxes((7, 10))
    rec = ImageRecord(0, 0, 140, random_kept(140, 30, 3), boxes=torch.cat([grid, grid]), view="image",
                      segments=torch.arange(2).repeat_interleave(70), kind="video")
    frames = [grey(280, 196, v) for v in (100, 30, 200, 60)]
    figure = draw_kept(frames, PruneRecord("random", (rec,), 200, 90), size=280, legend=False)
    assert figure.size == (2 * 280 + GAP, HEADER + 196)
    rect = (0, 0, 280, 196)
    assert_looks(figure, rec, lambda i: (0, 100) if i < 70 else (280 + GAP, 200), {0: rect, 280 + GAP: rect})


def test_record_without_geometry_or_prefill_is_refused():
    with pytest.raises(ValueError, match="no geometry"):
        draw_kept(grey(10, 10), ImageRecord(0, 0, 5, torch.tensor([1])))
    with pytest.raises(TypeError, match="handle.last is None"):
        draw_kept(grey(10, 10), None)
    with pytest.raises(IndexError, match="image_index=1"):
        draw_kept(grey(10, 10), PruneRecord("x", (qwen_like_record(),), 1, 1), image_index=1)


def test_save_writes_png(tmp_path):
    path = tmp_path / "kept.png"
    figure = draw_kept(grey(280, 196), qwen_like_record(with_merged=False), save=path)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == figure.size


def test_compare_grid_cells_are_the_single_overlays():
    model, processor = tiny_llava()
    image = grey(64, 64)
    # HiPrune's official object layer (the 9th) does not exist in the 3-layer tiny tower: refused at enable time;
    # decoder-stage and two-stage methods are not drawable per image
    decoder_stage = {name for name in list_methods() if METHODS[name].stage in ("decoder", "two-stage")}
    videos_only = {name for name in list_methods() if METHODS[name].video_only}  # HoliTom: no videos on LLaVA-1.5
    assert runnable_methods(model) == sorted(set(list_methods()) - decoder_stage - videos_only - {"hiprune"})
    methods, keeps = ["random", "uniform"], [0.5, 16]
    figure = compare(model, processor, image, PROMPT, methods, keeps, size=128)
    cell = draw_kept(image, prune_once(model, processor, image, PROMPT, "uniform", 16), size=128, title="",
                     legend=False)
    # the last row (last method) sits right above the legend; its right-most cell (last budget) is that overlay
    assert figure.height == 2 * HEADER + 2 * (cell.height + GAP) + LEGEND
    y0 = figure.height - LEGEND - GAP - cell.height
    row = np.asarray(figure.crop((0, y0, figure.width, y0 + cell.height)))
    target = np.asarray(cell)
    found = [x for x in range(figure.width - cell.width + 1) if np.array_equal(row[:, x:x + cell.width], target)]
    assert len(found) == 1 and found[0] > cell.width  # once, in the second column
