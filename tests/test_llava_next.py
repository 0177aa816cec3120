"""LLaVA-NeXT (AnyRes) end to end on tiny models: packed layout, per-crop and per-image budgets, newline rule."""

import pytest
import torch
from conftest import (
    assert_keep_all_is_unpruned,
    assert_rows_match_alone,
    enable,
    generate_cached_and_uncached,
    runnable_methods,
)

from tokenprune import enable_pruning
from tokenprune import functional as F
from tokenprune.api import _HANDLE_ATTR
from tokenprune.budget import kept_count
from tokenprune.tiny_models import random_image, tiny_llava_next

PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
OTHER = "USER : <image>\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
TWO = "USER : <image>\n<image>\nhow many dog are there ? ASSISTANT :"
GEN = dict(max_new_tokens=5, do_sample=False)
METHODS = runnable_methods("llava_next")  # FlowCut refuses here: test_flowcut.py


@pytest.fixture
def nxt(attn):
    return tiny_llava_next(attn)


@pytest.fixture
def one(nxt):
    _, processor = nxt
    return processor(images=[random_image(40, 70, seed=1)], text=[PROMPT], return_tensors="pt")


def adapter(model):
    return getattr(model, _HANDLE_ATTR)._adapter


@pytest.mark.parametrize("size", [(40, 70), (70, 40), (64, 64), (20, 90), (32, 32)])
def test_layout_matches_transformers_packing(size):
    """Coordinates pushed through transformers' own pack_image_features land where the layout says."""
    model, processor = tiny_llava_next()
    inputs = processor(images=[random_image(*size)], text=[PROMPT], return_tensors="pt")
    enable_pruning(model, "random", keep=1.0)
    n_crops = adapter(model)._crops_per_image(inputs["image_sizes"], 1)[0]
    layout = adapter(model).layout(size, n_crops)
    side = layout.side
    coords = torch.stack(torch.meshgrid(torch.arange(n_crops), torch.arange(side * side), indexing="ij"), -1)
    coords = torch.cat([coords.float(), torch.ones(n_crops, side * side, 1)], -1)  # [crops, side^2, 3]
    packed, _ = model.model.pack_image_features([coords], inputs["image_sizes"], "default",
                                                image_newline=torch.tensor([-1.0, -1.0, 0.0]))
    packed = packed[0]
    assert packed.shape[0] == layout.crop.numel() == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert torch.equal(packed[:, 0].long(), layout.crop) and torch.equal(packed[:, 1].long(), layout.position)
    assert torch.equal(packed[:, 2] == 0, layout.newline) and torch.equal(layout.boxes[:, 0].isnan(), layout.newline)


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical(nxt, one, method):
    model, _ = nxt
    record = assert_keep_all_is_unpruned(model, one, lambda: enable(model, method, 1.0), **GEN)
    assert record.n_visual == 52 and record.seq_len_after == record.seq_len_before


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_is_transparent_and_cache_consistent(nxt, one, method):
    model, _ = nxt
    handle = enable(model, method, 0.25)
    generate_cached_and_uncached(model, one, **GEN)
    prompt = one["input_ids"]
    image = handle.last.images[0]
    assert handle.last.seq_len_after == prompt.shape[1] - 52 + image.n_kept


def test_per_crop_budget_and_newline_rule(nxt, one):
    """FasterVLM (per crop, as its paper): a quarter of each crop, no newline; DivPrune: one pool with newlines.

    40x70 on the 2x2 pinpoint: base tile (16 tokens) + 4 tiles, each cut to 2 x 4 tokens by the unpadding."""
    model, _ = nxt
    handle = enable_pruning(model, "fastervlm", keep=0.25)
    with torch.no_grad():
        model(**one)
    layout = adapter(model).layout((40, 70), 5)
    image = handle.last.images[0]
    assert torch.bincount(layout.crop[~layout.newline]).tolist() == [16, 8, 8, 8, 8]
    assert torch.bincount(layout.crop[image.kept], minlength=5).tolist() == [4, 2, 2, 2, 2]
    assert not bool(layout.newline[image.kept].any())
    assert handle.last.seq_len_after == one["input_ids"].shape[1] - 52 + 12  # newlines dropped too
    enable_pruning(model, "fastervlm", keep=0.25, scope="image")
    with torch.no_grad():
        model(**one)
    assert model._tokenprune_handle.last.images[0].n_kept == kept_count(0.25, 48)  # one pool of 48 candidates
    enable_pruning(model, "divprune", keep=0.25)
    with torch.no_grad():
        model(**one)
    assert model._tokenprune_handle.last.images[0].n_kept == kept_count(0.25, 52)  # newlines are candidates


def test_fastervlm_ranks_each_crop_by_its_own_cls_row(one):
    """Oracle: the base tile's kept tokens are the top-k of the base tile's [CLS] row from an eager tower run."""
    model, _ = tiny_llava_next("eager")
    n_crops = 5
    pixel = one["pixel_values"][0, :n_crops]
    with torch.no_grad():
        out = model.model.vision_tower(pixel, output_attentions=True)
    layer = len(model.model.vision_tower.encoder.layers) + model.config.vision_feature_layer  # hidden -2 -> layer 1
    cls_rows = out.attentions[layer][:, :, 0, 1:]  # [crops, H, 16]
    handle = enable_pruning(model, "fastervlm", keep=3)
    with torch.no_grad():
        model(**one)
    layout = adapter(model).layout((40, 70), n_crops)
    kept = handle.last.images[0].kept
    for crop in range(n_crops):
        mine = kept[layout.crop[kept] == crop]
        positions = layout.position[mine]
        tokens = (layout.crop == crop).nonzero().squeeze(1)
        scores = cls_rows[crop][:, layout.position[tokens]]  # the crop's tokens in packed order
        expected = tokens[F.fastervlm(scores, 3)]
        assert torch.equal(mine, expected), crop
        assert positions.numel() == 3


@pytest.mark.parametrize("method", ["divprune", "fastervlm", "random"])
def test_batch_rows_match_each_prompt_alone(nxt, method):
    """Different crop counts per image, different lengths, two images in one row, left padding."""
    model, processor = nxt
    prompts = [PROMPT, OTHER, TWO]
    images = [[random_image(40, 70, seed=1)], [random_image(32, 32, seed=2)],
              [random_image(70, 40, seed=3), random_image(64, 64, seed=4)]]
    handle = enable(model, method, 0.3)
    rows = [processor(images=imgs, text=[prompt], return_tensors="pt") for prompt, imgs in zip(prompts, images,
                                                                                              strict=True)]
    batch = processor(images=[im for imgs in images for im in imgs], text=prompts, return_tensors="pt", padding=True)
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)
    assert len({im.n for im in handle.last.images}) > 1  # really different visual counts


def test_record_geometry(nxt, one):
    model, _ = nxt
    handle = enable_pruning(model, "uniform", keep=4)
    with torch.no_grad():
        model(**one)
    image = handle.last.images[0]
    assert image.view == "image" and image.boxes.shape == (52, 4) and image.segments.tolist()[:17] == [0] * 16 + [1]
    assert int(image.boxes[16:, 0].isnan().sum()) == 4  # one newline per high-resolution row


def test_text_only_prompt_is_a_no_op(nxt):
    model, processor = nxt
    inputs = processor(text=["USER : what is in the image ? ASSISTANT :"], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN)
        handle = enable_pruning(model, "divprune", keep=0.1)
        out = model.generate(**inputs, **GEN)
    assert torch.equal(out, ref) and handle.last is None
