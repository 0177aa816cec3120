"""InternVL3's decoder stage on tiny models (eager and sdpa; the shared decoder loop, 1-D RoPE as on LLaVA): keep=1.0,
cache and batches on a 4-LLM-layer model; every method at its DEFAULT options and layers on the real-depth model,
with the listed declines; a pruned cache in the generate patterns (follow-up, resumed, static, beams). The vision
stage: tests/test_internvl.py."""

import re

import pytest
import torch
from cache_turns import FOLLOW_UP, extend, gen, words
from conftest import (
    DECODER_OPTIONS,
    assert_keep_all_is_unpruned,
    built,
    decoder_methods,
    hook_and_attribute_census,
    two_stage_methods,
)
from internvl_cases import DECLINES, GEN, PROMPT, WIDE, T, two_rows
from transformers import DynamicCache

from tokenprune import disable_pruning, enable_pruning, pruning
from tokenprune.methods import METHODS
from tokenprune.tiny_internvl import tiny_internvl
from tokenprune.tiny_models import random_image

_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _deep(attn):
    """4 LLM layers, so that every decoder method prunes at least once with small layer options."""
    return built(_MODELS, attn, lambda: tiny_internvl(attn, text_layers=4))


DECODER_METHODS = decoder_methods() + [m for m in two_stage_methods() if m not in DECLINES]


def _enable_decoder(model, method, keep):
    return enable_pruning(model, method, keep=keep, **DECODER_OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_keep_all_bit_identical_cache_consistent_and_batched(attn, method):
    model, processor = _deep(attn)
    one = processor(text=[PROMPT], images=[random_image(*WIDE, seed=1)])
    assert_keep_all_is_unpruned(model, one, lambda: _enable_decoder(model, method, 1.0), **GEN)
    census = hook_and_attribute_census(model)
    try:
        with torch.no_grad():
            handle = _enable_decoder(model, method, 0.5)
            cached = model.generate(**one, **GEN)
            assert torch.equal(cached[:, : one["input_ids"].shape[1]], one["input_ids"])
            assert torch.equal(cached, model.generate(**one, **GEN, use_cache=False))
            assert handle.last.visual_per_layer[-1] < handle.last.n_visual
            prompts, images, batch = two_rows(processor)
            alone = [model(**processor(text=[p], images=i)).logits[0, -1] for p, i in zip(prompts, images, strict=True)]
            logits = model(**batch).logits[:, -1]
            assert torch.equal(model.generate(**batch, **GEN), model.generate(**batch, **GEN, use_cache=False))
        for row, out in enumerate(alone):
            torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    finally:
        disable_pruning(model)
    assert hook_and_attribute_census(model) == census


def test_real_depth_runs_every_method_at_its_default_layers_and_declines_the_listed_ones():
    from tokenprune.real_depth import real_depth

    model, processor = real_depth("internvl", "sdpa")
    assert len(model.model.vision_tower.encoder.layer) == 24 and len(model.model.language_model.layers) == 28
    one = processor(text=[PROMPT], images=[random_image(*WIDE, seed=1)])
    with torch.no_grad():
        ref = model(**one).logits
        model.generate(**one, max_new_tokens=1)
    census = hook_and_attribute_census(model)
    declined = {}
    for method in sorted(METHODS) + [["divprune", "fastv"]]:
        try:
            handle = enable_pruning(model, method, keep=1.0)
        except ValueError as err:
            declined[method] = str(err)
            assert hook_and_attribute_census(model) == census
            continue
        try:
            with torch.no_grad():
                assert torch.equal(model(**one).logits, ref), method
                disable_pruning(model)
                handle = enable_pruning(model, method, keep=0.25)
                cached = model.generate(**one, max_new_tokens=2, do_sample=False)
                assert torch.equal(cached, model.generate(**one, max_new_tokens=2, do_sample=False, use_cache=False))
            assert handle.last.visual_per_layer[-1] < 3 * T, method
        finally:
            disable_pruning(model)
        assert hook_and_attribute_census(model) == census
    assert sorted(declined) == sorted(DECLINES)
    assert all(re.search(DECLINES[m], msg) for m, msg in declined.items())


@pytest.mark.parametrize("method", ["divprune", "fastervlm", "cdpruner", "fastv", "todre"])
def test_follow_up_resumed_static_and_beams_on_a_pruned_cache(method):
    """The patterns of tests/test_cache_patterns.py on InternVL3, two rows with three images, left padded."""
    model, processor = _deep("sdpa")
    inputs = two_rows(processor)[2]
    with pruning(model, method, keep=0.25, **DECODER_OPTIONS.get(method, {})), torch.no_grad():
        out = gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
        conversation = torch.cat([out.sequences, words(processor, FOLLOW_UP, 2)], dim=1)
        whole = extend(inputs, conversation)  # the mask in original coordinates
        follow = gen(model, input_ids=conversation, attention_mask=whole["attention_mask"],
                     past_key_values=out.past_key_values, max_new_tokens=2)
        assert torch.equal(follow.sequences[:, : conversation.shape[1]], conversation)
        if METHODS[method].stage == "vision" and method != "cdpruner":  # image-only: == a fresh pruned run
            assert torch.equal(follow.sequences, gen(model, **whole, max_new_tokens=2).sequences)
        longer = gen(model, **inputs, max_new_tokens=4)
        first = gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
        resumed = gen(model, input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=2,
                      attention_mask=extend(inputs, first.sequences)["attention_mask"])
        assert torch.equal(resumed.sequences, longer.sequences)
        static = gen(model, **inputs, cache_implementation="static", max_new_tokens=2)
        assert torch.equal(static.sequences, out.sequences)
        beams = model.generate(**inputs, num_beams=3, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        assert torch.equal(beams[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
