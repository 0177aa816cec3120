"""A new image in a later turn on a pruned KV cache, outside the family x method matrix of
tests/test_cache_patterns.py: the families the matrix does not run (real depth), a new image in one row of two on a
dynamic and a static cache, and keep=1.0 equal to the unpruned model on every family."""

from __future__ import annotations

import copy

import pytest
import torch
from cache_turns import (
    FAMILIES,
    KEEP,
    QUESTIONS,
    TOL,
    check_new_image_turn,
    every_pixel,
    gen,
    new_image_call,
    own_model,
    runs_on,
    visual_prompts,
)
from transformers import DynamicCache, StaticCache

from tokenprune import disable_pruning, enable_pruning
from tokenprune.tiny_models import random_image

OTHER_FAMILIES = ("qwen3_vl", "qwen3_5", "llava_onevision", "internvl", "gemma3")
# divprune: an image-only vision-stage selector (the new image is pruned as it enters; == a fresh run, with the new
# image's pixels or every image's); fastv: a decoder-stage method (declines the new image at the call). Every other
# method runs the new-image turn in the matrix (tests/test_cache_patterns.py).
OTHER_CASES = [(f, m) for f in OTHER_FAMILIES for m in ("divprune", "fastv") if runs_on(f, m)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family, method", OTHER_CASES, ids=[f"{f}-{m}" for f, m in OTHER_CASES])
def test_new_image_in_a_later_turn_on_every_family(family, method):
    """The matrix's new-image turn (``check_new_image_turn``) on the families outside it (real depth; one row on
    InternVL3, whose pixel inputs are tiles)."""
    model, processor = own_model(family)
    rows = 1 if family == "internvl" else 2
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)][:rows]
    disable_pruning(model)
    enable_pruning(model, method, keep=KEEP)
    try:
        inputs = visual_prompts(family, processor, ["USER : {}" + q for q in QUESTIONS][:rows], images, first=True)
        with torch.no_grad():
            out = gen(model, **inputs, past_key_values=DynamicCache(config=model.config), max_new_tokens=2)
        check_new_image_turn(family, method, model, processor, inputs, out)
    finally:
        disable_pruning(model)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_new_image_in_one_row_of_two(family, cache):
    """Turn 2 brings a new image in row 0 only (row 1: text; the processor pads the new turn, so the conversation has
    padding inside it): == a fresh pruned run of the whole conversation (three images), on a dynamic or a static
    cache (one long enough for both turns)."""
    model, processor = own_model(family)
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)]
    inputs = visual_prompts(family, processor, ["USER : {}" + q for q in QUESTIONS], images, first=True)
    enable_pruning(model, "divprune", keep=KEEP)
    try:
        with torch.no_grad():
            first_cache = DynamicCache() if cache == "dynamic" else StaticCache(config=model.config, max_cache_len=400)
            out = gen(model, **inputs, past_key_values=first_cache, max_new_tokens=2)
            g = out.sequences.shape[1] - inputs["input_ids"].shape[1]
            new = visual_prompts(family, processor, [" USER : {}and this one ? ASSISTANT :", " USER : and else ?"],
                                 [random_image(70, 98, seed=3)], first=False)
            call = dict(input_ids=torch.cat([out.sequences, new["input_ids"]], dim=1), attention_mask=torch.cat(
                [inputs["attention_mask"], torch.ones_like(out.sequences[:, -g:]), new["attention_mask"]], dim=1))
            if "mm_token_type_ids" in new:
                call["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                       torch.zeros_like(out.sequences[:, -g:]),
                                                       new["mm_token_type_ids"]], dim=1)
            pixels = {k: v for k, v in new.items() if k not in call}
            reuse = gen(model, **call, **pixels, past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
            if family.startswith("qwen"):
                first = torch.split(inputs["pixel_values"], inputs["image_grid_thw"].prod(-1).tolist())
                grids = inputs["image_grid_thw"]
                everything = dict(pixel_values=torch.cat([first[0], new["pixel_values"], first[1]]),
                                  image_grid_thw=torch.stack([grids[0], new["image_grid_thw"][0], grids[1]]))
            else:
                everything = dict(pixel_values=torch.cat([inputs["pixel_values"][:1], new["pixel_values"],
                                                          inputs["pixel_values"][1:]]))
            fresh = gen(model, **call, **everything, max_new_tokens=2)
    finally:
        disable_pruning(model)
    assert torch.equal(reuse.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reuse.logits), torch.stack(fresh.logits), **TOL)


# Families whose UNPRUNED model continues a cache with a new image itself (transformers 5.23). Qwen's does not:
# its generate computes M-RoPE over the whole ids with the new turn's grids only, or encodes every image's pixels
# for the uncached placeholders; there keep=1.0 is checked against the unpruned fresh run of the conversation.
HF_CONTINUES_WITH_NEW_IMAGE = ("llava", "llava_next", "llava_onevision", "internvl", "gemma3")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", FAMILIES + OTHER_FAMILIES)
def test_keep_all_new_image_turn_equals_unpruned(family):
    """keep=1.0: turn 2 with a new image on the returned cache gives the unpruned model's ids and logits (bit for
    bit where transformers continues such a cache itself; else its fresh run of the whole conversation)."""
    model, processor = own_model(family)
    rows = 1 if family == "internvl" else 2
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)][:rows]
    inputs = visual_prompts(family, processor, ["USER : {}" + q for q in QUESTIONS][:rows], images, first=True)

    def turn2(keep: float | None, fresh: bool = False):
        disable_pruning(model)
        if keep is not None:
            enable_pruning(model, "divprune", keep=keep)
        out = gen(model, **inputs, past_key_values=DynamicCache(config=model.config), max_new_tokens=2)
        call, pixels, new = new_image_call(family, processor, inputs, out)
        if fresh:
            return gen(model, **call, **every_pixel(family, inputs, new), max_new_tokens=2)
        return gen(model, **call, **pixels, past_key_values=out.past_key_values, max_new_tokens=2)

    try:
        with torch.no_grad():
            mine = turn2(1.0)
            expected = turn2(None, fresh=family not in HF_CONTINUES_WITH_NEW_IMAGE)
    finally:
        disable_pruning(model)
    assert torch.equal(mine.sequences, expected.sequences)
    if family in HF_CONTINUES_WITH_NEW_IMAGE:
        assert all(torch.equal(a, b) for a, b in zip(mine.logits, expected.logits, strict=True))
    else:
        torch.testing.assert_close(torch.stack(mine.logits), torch.stack(expected.logits), **TOL)
