"""The LRS-VQA large-image front-end (tokenprune.large_image): pyramid geometry as worked examples, the tile choice
on given scores, and the front-end on tiny LLaVA-NeXT and Qwen2.5-VL: a tile budget that covers everything equals
a prompt of every tile, the plain path for small images, clear errors, and an 8,000 x 8,000 px image that runs
without encoding every tile."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hook_and_attribute_census
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from tokenprune import pruning
from tokenprune.large_image import answer_large_image, build_pyramid, render_tile, select_child_tiles
from tokenprune.large_image.families import token_boxes
from tokenprune.large_image.front_end import DEFAULT_TEMPLATE
from tokenprune.large_image.pyramid import Level, child_tile
from tokenprune.large_image.relevance import local_relevance
from tokenprune.large_image.tiles import token_centres
from tokenprune.methods.fastv import FastV
from tokenprune.tiny_models import large_image, random_image, tiny_llava, tiny_llava_next, tiny_qwen

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION = "what is in the image ?"


# --- pyramid geometry ---------------------------------------------------------------------------------------------
def test_pyramid_of_an_8000_px_square_with_336_px_tiles():
    levels = build_pyramid(8000, 8000, 336)
    assert [lv.grid for lv in levels] == [(1, 1), (3, 3), (6, 6), (12, 12), (24, 24)]
    assert [lv.size for lv in levels] == [(336, 336), (1008, 1008), (2016, 2016), (4032, 4032), (8064, 8064)]
    assert [lv.ratio for lv in levels] == [336 / 8000, 1008 / 8000, 0.25, 0.5, 1.0]
    assert sum(lv.n_tiles for lv in levels) == 766


def test_pyramid_of_a_wide_image_edge_tiles_and_source_boxes():
    # 2000 x 1000 px (W x H), tile 336: min_scale = 1008 / 2000 = 0.504 (1/2 skipped past it), global 336 / 2000.
    glob, base, full = build_pyramid(1000, 2000, 336)
    assert (glob.size, glob.grid) == ((168, 336), (1, 1))
    assert (base.ratio, base.size, base.grid) == (0.504, (504, 1008), (2, 3))
    assert (full.size, full.grid) == ((1008, 2016), (3, 6))  # round(1000 * 1.008) = 1008: no padding at ratio 1
    assert glob.tile_box(0, 0) == (0, 0, 336, 168)  # the thumbnail's lower half is padding
    assert base.tile_box(1, 2) == (672, 336, 1008, 504)  # bottom edge tile: 168 px of image, the rest padding
    assert base.source_box(1, 2, (1000, 2000)) == pytest.approx((672 * 2000 / 1008, 336 * 1000 / 504, 2000, 1000))
    assert full.tile_box(2, 5) == (1680, 672, 2016, 1008)
    with pytest.raises(IndexError, match="outside the 2x3 grid"):
        base.tile_box(2, 0)


def test_pyramid_of_an_image_below_the_base_level_has_two_levels():
    # 700 x 500 px (W x H): long side 700 < 3 x 336, so ratio 1 is the base level; the fit 672 / 500 = 1.344 (the
    # tighter of 672 / 500 and 1008 / 700) makes the height fill 2 tiles exactly, the width round(940.8) = 941 px.
    levels = build_pyramid(500, 700, 336)
    assert [(lv.ratio, lv.size, lv.grid) for lv in levels] == [(0.48, (240, 336), (1, 1)), (1.0, (672, 941), (2, 3))]


def test_child_tile_maps_through_image_coordinates_and_ignores_padding():
    glob, base, full = build_pyramid(1000, 2000, 336)
    assert child_tile(base, full, 0.0, 0.0) == (0, 0)
    assert child_tile(base, full, 1007.9, 503.9) == (2, 5)
    assert child_tile(base, full, 500.0, 250.0) == (1, 2)  # 500 / 1008 * 2016 = 1000 -> column 2; 250 -> 500 -> row 1
    assert child_tile(base, full, 100.0, 600.0) is None  # below the image: padding of the bottom edge tiles
    assert child_tile(glob, base, 335.0, 167.0) == (1, 2)


def test_render_tile_takes_the_right_part_and_pads_edge_tiles():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    ImageDraw.Draw(image).rectangle((100, 0, 199, 99), fill=(0, 0, 255))  # right half blue
    level = Level(1, 1.0, (100, 200), (2, 4), 64)  # 64-px tiles: the last column is 8 px wide, the last row 36 px
    left, right = render_tile(image, level, 0, 0), render_tile(image, level, 0, 3, fill=(9, 9, 9))
    assert left.size == right.size == (64, 64)
    assert left.getpixel((10, 10)) == (255, 0, 0) and right.getpixel((4, 10)) == (0, 0, 255)
    assert right.getpixel((20, 10)) == (9, 9, 9)  # padding right of the 8 image columns
    assert render_tile(image, level, 1, 0, fill=(9, 9, 9)).getpixel((5, 50)) == (9, 9, 9)  # padding below row 36


# --- the tile choice on given scores ------------------------------------------------------------------------------
def test_select_child_tiles_worked_example():
    parent = Level(1, 0.5, (4, 8), (1, 2), 4)    # two 4-px tiles side by side
    child = Level(2, 1.0, (8, 16), (2, 4), 4)    # the same image at twice the size: 2 x 4 tiles
    # one token per 2x2 px of the parent level: centres (1, 1), (3, 1), ... ; scores make the right half relevant
    xs = torch.tensor([1.0, 3.0, 5.0, 7.0, 1.0, 3.0, 5.0, 7.0])
    ys = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    centres = torch.stack([xs, ys], dim=1)
    scores = torch.tensor([0.0, 0.1, 0.9, 0.8, 0.0, 0.2, 0.7, 0.3])
    # ratio 0.5 -> the top 4 tokens: (5,1) (7,1) (5,3) (7,3) -> child tiles (0,2) (0,3) (1,2) (1,3), one vote each
    assert select_child_tiles(scores, centres, parent, child, 0.5, None) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert select_child_tiles(scores, centres, parent, child, 0.5, 2) == [(0, 2), (0, 3)]  # ties: lowest raster
    # ratio 0.25 -> (5,1) and (7,1): row 0 of the right half only
    assert select_child_tiles(scores, centres, parent, child, 0.25, None) == [(0, 2), (0, 3)]
    # votes decide the order before the raster: three of the top 4 tokens in child tile (1, 0)
    scores2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0])
    more = torch.cat([centres, torch.tensor([[0.5, 3.5], [1.5, 3.5], [7.0, 0.5]])])
    scores2 = torch.cat([scores2, torch.tensor([0.8, 0.7, 0.95])])
    assert select_child_tiles(scores2, more, parent, child, 4 / 11, 1) == [(1, 0)]
    assert select_child_tiles(scores2, more, parent, child, 4 / 11, None) == [(0, 3), (1, 0)]


def test_select_child_tiles_skips_tokens_without_a_place():
    parent = Level(1, 0.5, (4, 6), (1, 2), 4)    # the second tile is 2 px of image + 2 px of padding
    child = Level(2, 1.0, (8, 12), (2, 3), 4)
    centres = torch.tensor([[1.0, 1.0], [5.0, 1.0], [7.0, 1.0], [float("nan"), float("nan")]])
    scores = torch.tensor([0.1, 0.2, 9.0, 9.0])  # the best two have no place (padding, newline)
    assert select_child_tiles(scores, centres, parent, child, 0.5, None) == [(0, 2)]
    with pytest.raises(ValueError, match="max_tiles must be >= 1"):
        select_child_tiles(scores, centres, parent, child, 0.5, 0)
    with pytest.raises(ValueError, match="ratio must be in"):
        select_child_tiles(scores, centres, parent, child, 0.0, 1)
    with pytest.raises(ValueError, match="inside the image"):
        select_child_tiles(scores[2:], centres[2:], parent, child, 1.0, 1)


def test_token_centres_of_a_tile():
    level = Level(1, 1.0, (8, 8), (2, 2), 4)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [float("nan")] * 4])
    centres = token_centres(boxes, level, (1, 0))
    assert centres[:2].tolist() == [[1.0, 5.0], [3.0, 7.0]]
    assert bool(centres[2].isnan().all())


# --- the front-end on tiny models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llava_next", "qwen2_5_vl"])
def family(request):
    if request.param == "llava_next":
        return tiny_llava_next(text_layers=3)
    return tiny_qwen("2.5", text_layers=3)


def _every_tile_ids(model, processor, image, tile, keep):
    """The reference: one prompt with the thumbnail and every tile of the finest level, built by hand."""
    levels = build_pyramid(image.height, image.width, tile)
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    images = [render_tile(image, levels[0], 0, 0, fill)]
    images += [render_tile(image, levels[-1], r, c, fill) for r, c in levels[-1].tiles()]
    mark = "<image>" if model.config.model_type == "llava_next" else "<|vision_start|><|image_pad|><|vision_end|>"
    inputs = processor(text=DEFAULT_TEMPLATE.format(images=mark * len(images), question=QUESTION), images=images,
                       return_tensors="pt")
    with pruning(model, FastV(k=1), keep=keep), torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False)


def test_a_tile_budget_covering_everything_equals_a_prompt_of_every_tile(family):
    model, processor = family
    tile = 32 if model.config.model_type == "llava_next" else 56
    image = random_image(2 * tile + 5, 3 * tile + 7, seed=1)  # base level 3x4 tiles, finest 4x5 after padding
    answer = answer_large_image(model, processor, image, QUESTION, tile=tile, base_tiles=1, tiles_per_level=10**6,
                                keep=0.5, max_new_tokens=3)
    assert answer.relevance_passes == 0
    assert all(len(lv.encoded) == lv.n_tiles for lv in answer.levels)
    assert answer.visual_tokens == answer.tokens_everything
    assert torch.equal(answer.ids, _every_tile_ids(model, processor, image, tile, keep=0.5))


def test_the_front_end_encodes_only_the_chosen_tiles(family):
    model, processor = family
    tile = 32 if model.config.model_type == "llava_next" else 56
    image = random_image(5 * tile, 8 * tile, seed=2)
    answer = answer_large_image(model, processor, image, QUESTION, tile=tile, tiles_per_level=2, max_new_tokens=2)
    levels = build_pyramid(image.height, image.width, tile)
    assert [lv.grid for lv in answer.levels] == [lv.grid for lv in levels]
    assert len(answer.levels[1].encoded) == levels[1].n_tiles  # the base level whole
    assert all(len(lv.encoded) == 2 for lv in answer.levels[2:])
    assert answer.relevance_passes == len(levels) - 2
    assert answer.tiles_encoded < answer.tiles_total
    assert answer.kept_tokens < answer.visual_tokens < answer.tokens_everything
    assert 0 < answer.tflops < answer.tflops_everything
    assert "tiles encoded" in answer.summary()


def test_the_tiles_chosen_follow_the_relevance_of_the_base_level(family):
    # The front-end's choice at level 2 is the selector applied to the last prompt token's layer-1 relevance of
    # the prompt [thumbnail, every base tile], recomputed here by hand.
    model, processor = family
    tile = 32 if model.config.model_type == "llava_next" else 56
    image = random_image(5 * tile, 8 * tile, seed=5)
    answer = answer_large_image(model, processor, image, QUESTION, tile=tile, layer=1, tiles_per_level=3,
                                descents=1, max_new_tokens=1)
    levels = build_pyramid(image.height, image.width, tile)
    assert [lv.index for lv in answer.levels] == [0, 1, 2] and answer.relevance_passes == 1
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    base = levels[1]
    images = [render_tile(image, levels[0], 0, 0, fill)]
    images += [render_tile(image, base, r, c, fill) for r, c in base.tiles()]
    mark = "<image>" if model.config.model_type == "llava_next" else "<|vision_start|><|image_pad|><|vision_end|>"
    inputs = processor(text=DEFAULT_TEMPLATE.format(images=mark * len(images), question=QUESTION), images=images,
                       return_tensors="pt")
    slots = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    per_image = slots.numel() // len(images)  # every tile is the same tile x tile canvas
    scores = local_relevance(model, inputs, 1, slots[per_image:])
    boxes = token_boxes(model, inputs)
    centres = torch.cat([token_centres(b, base, t) for b, t in zip(boxes[1:], base.tiles(), strict=True)])
    expected = select_child_tiles(scores, centres, base, levels[2], 0.25, 3)
    assert list(answer.levels[2].encoded) == expected and len(expected) == 3
    with pytest.raises(ValueError, match="descents must be"):
        answer_large_image(model, processor, image, QUESTION, tile=tile, descents=-1)


def test_method_none_equals_keep_one(family):
    model, processor = family
    tile = 32 if model.config.model_type == "llava_next" else 56
    image = random_image(3 * tile, 4 * tile, seed=3)
    plain = answer_large_image(model, processor, image, QUESTION, tile=tile, method=None, max_new_tokens=3)
    full = answer_large_image(model, processor, image, QUESTION, tile=tile, keep=1.0, max_new_tokens=3)
    assert torch.equal(plain.ids, full.ids) and plain.levels == full.levels
    assert full.kept_tokens == full.visual_tokens
    assert plain.tflops == full.tflops > 0  # relevance passes + the unpruned final prefill, counted alike


def test_an_image_that_fits_one_tile_takes_the_plain_path(family):
    model, processor = family
    tile = 32 if model.config.model_type == "llava_next" else 56
    image = random_image(tile - 4, tile, seed=4)
    answer = answer_large_image(model, processor, image, QUESTION, tile=tile, keep=0.5, max_new_tokens=3)
    assert answer.fallback is not None and "fits one" in answer.fallback and answer.levels == ()
    mark = "<image>" if model.config.model_type == "llava_next" else "<|vision_start|><|image_pad|><|vision_end|>"
    inputs = processor(text=DEFAULT_TEMPLATE.format(images=mark, question=QUESTION), images=[image],
                       return_tensors="pt")
    layer = len(model.model.language_model.layers) // 4
    with pruning(model, FastV(k=layer + 1), keep=0.5), torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(answer.ids, expected)


def test_relevance_is_the_same_under_eager_and_sdpa(family):
    model, processor = family
    mark = "<image>" if model.config.model_type == "llava_next" else "<|vision_start|><|image_pad|><|vision_end|>"
    images = [random_image(56, 56, seed=s) for s in range(3)]
    inputs = processor(text=DEFAULT_TEMPLATE.format(images=mark * 3, question=QUESTION), images=images,
                       return_tensors="pt")
    image_id = model.config.image_token_id
    local = (inputs["input_ids"][0] == image_id).nonzero().squeeze(1)
    scores = {}
    for kernel in ("eager", "sdpa"):
        model.set_attn_implementation(kernel)
        scores[kernel] = local_relevance(model, inputs, 1, local)
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(scores["eager"], scores["sdpa"])
    assert scores["sdpa"].sum().item() == pytest.approx(1.0, abs=1e-5)  # renormalised over the local keys


def test_clear_errors(family):
    model, processor = family
    image = random_image(200, 300)
    with pytest.raises(ValueError, match="tiles_per_level must be >= 1 tile"):
        answer_large_image(model, processor, image, QUESTION, tiles_per_level=0)
    with pytest.raises(ValueError, match="layer must be in"):
        answer_large_image(model, processor, image, QUESTION, layer=7)
    with pytest.raises(ValueError, match="descend_ratio"):
        answer_large_image(model, processor, image, QUESTION, descend_ratio=0.0)
    with pytest.raises(ValueError, match="FastV prunes from layer 3"):
        answer_large_image(model, processor, image, QUESTION, layer=2)


def test_enabled_pruning_is_refused(family):
    model, processor = family
    from tokenprune import disable_pruning, enable_pruning

    enable_pruning(model, "divprune", keep=0.5)
    try:
        with pytest.raises(ValueError, match="call disable_pruning"):
            answer_large_image(model, processor, random_image(200, 300), QUESTION)
    finally:
        disable_pruning(model)


def test_the_front_end_leaves_nothing_behind(family):
    model, processor = family
    run = lambda: answer_large_image(model, processor, random_image(150, 250), QUESTION, tiles_per_level=2,  # noqa: E731
                                     max_new_tokens=1)
    run()  # transformers installs its own output-capturing hooks on the towers' first call
    before = hook_and_attribute_census(model)
    run()
    assert hook_and_attribute_census(model) == before


def test_qwen2_vl_runs_too():
    model, processor = tiny_qwen("2", text_layers=2)
    answer = answer_large_image(model, processor, random_image(300, 400), QUESTION, tile=56, tiles_per_level=2,
                                max_new_tokens=2)
    assert answer.relevance_passes >= 1 and answer.tiles_encoded < answer.tiles_total
    assert answer.kept_tokens < answer.visual_tokens


def test_an_unsupported_family_is_named():
    model, processor = tiny_llava()
    with pytest.raises(ValueError, match="supports model_type llava_next, qwen2_vl, qwen2_5_vl; got 'llava'"):
        answer_large_image(model, processor, random_image(100, 100), QUESTION)


# --- memory: an 8,000 x 8,000 px image ----------------------------------------------------------------------------
def test_an_8000_px_image_runs_without_encoding_every_tile():
    model, processor = tiny_qwen("2.5", text_layers=2)  # 112-px tiles (the tiny processor's max_pixels)
    answer = answer_large_image(model, processor, large_image(8000), QUESTION, max_new_tokens=2)
    levels = build_pyramid(8000, 8000, answer.tile)
    assert answer.tile == 112 and answer.tiles_total == sum(lv.n_tiles for lv in levels)
    assert answer.tiles_encoded <= 1 + levels[1].n_tiles + 6 * (len(levels) - 2) < answer.tiles_total
    assert answer.tokens_everything == 16 * (1 + levels[-1].n_tiles)  # 4x4 merged tokens (28 px) per 112-px tile
    assert math.isfinite(answer.peak_rss_mb) and answer.peak_rss_mb > 0


def test_the_docs_page_lists_every_deviation():
    from pathlib import Path

    from tokenprune.large_image.front_end import DEVIATIONS

    page = (Path(__file__).resolve().parents[1] / "docs" / "large-images.md").read_text()
    assert [d.what for d in DEVIATIONS if f"| {d.what} | {d.why} |" not in page] == []


# --- properties ---------------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30000), st.integers(1, 30000), st.integers(8, 600), st.integers(1, 4))
def test_pyramid_properties(height, width, tile, base_tiles):
    if max(height, width) <= tile:
        with pytest.raises(ValueError, match="fits one"):
            build_pyramid(height, width, tile, base_tiles)
        return
    levels = build_pyramid(height, width, tile, base_tiles)
    assert levels[0].grid == (1, 1) and levels[-1].ratio == 1.0
    assert [lv.ratio for lv in levels] == sorted({lv.ratio for lv in levels})  # coarse to fine, no repeats
    for lv in levels:
        (h, w), (rows, cols) = lv.size, lv.grid
        assert (rows - 1) * tile < h <= rows * tile and (cols - 1) * tile < w <= cols * tile  # padding < one tile
        assert h == rows * tile or w == cols * tile  # one side fills the grid exactly
        assert lv.tile_box(rows - 1, cols - 1)[2:] == (w, h)
    if len(levels) > 2 and base_tiles > 1:  # the base level fits base_tiles tiles on its long side (1: the global)
        assert max(levels[1].grid) == base_tiles


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.floats(0.01, 1.0), st.one_of(st.none(), st.integers(1, 9)))
def test_select_child_tiles_properties(seed, n, ratio, max_tiles):
    _, base, finer = build_pyramid(900, 1300, 100)[:3]
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 2, generator=g) * torch.tensor([base.grid[1] * 100.0, base.grid[0] * 100.0])
    scores = torch.rand(n, generator=g).round(decimals=1)  # ties
    inside = [child_tile(base, finer, x, y) is not None for x, y in centres.tolist()]
    if not any(inside):
        return
    chosen = select_child_tiles(scores, centres, base, finer, ratio, max_tiles)
    assert chosen == sorted(set(chosen)) and 1 <= len(chosen) <= (max_tiles or finer.n_tiles)
    assert all(0 <= r < finer.grid[0] and 0 <= c < finer.grid[1] for r, c in chosen)
    ranked = sorted((i for i in range(n) if inside[i]), key=lambda i: (-float(scores[i]), i))
    votes: dict[tuple[int, int], int] = {}
    for i in ranked[: max(1, int(len(ranked) * ratio))]:  # the top share of the tokens inside the image vote
        place = child_tile(base, finer, *centres[i].tolist())
        votes[place] = votes.get(place, 0) + 1
    assert all(votes.get(t, 0) > 0 for t in chosen)
    assert min(votes[t] for t in chosen) >= max([v for t, v in votes.items() if t not in chosen], default=0)
    if max_tiles is None:
        assert set(chosen) == set(votes)
