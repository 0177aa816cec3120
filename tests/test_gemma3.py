"""Gemma 3 end to end on tiny models (eager and sdpa): every vision-stage method with a signal there; the
bidirectional image block and the sliding window of the pruned prompt against the model's own masks; pan-and-scan
crops; padded batches; an oracle; generate on the pruned cache; clear refusals. Decoder-stage and two-stage methods:
tests/test_gemma3_decoder.py; the signals against the model's own computation: tests/test_gemma3_signals.py."""

import copy

import pytest
import torch
from cache_turns import FOLLOW_UP, extend, gen, words
from conftest import (
    MERGING,
    assert_keep_all_is_unpruned,
    assert_rows_match_alone,
    built,
    cached_model,
    enable,
    generate_cached_and_uncached,
    hook_and_attribute_census,
    left_clean,
    runnable_methods,
    runs_without_cls,
)
from gemma3_oracle import (
    DECODER_RUNS,
    GEN,
    OTHER,
    PROMPT,
    VISION_DECLINES,
    N,
    allowed_keys,
    gemma3_inputs,
    kept_prompt,
    layer_masks,
)
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune import disable_pruning, enable_pruning
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS as REGISTRY
from tokenprune.tiny_gemma3 import SLIDING_WINDOW, tiny_gemma3
from tokenprune.tiny_models import random_image

METHODS = [m for m in runnable_methods("gemma3") if runs_without_cls(m)]
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def gemma3(attn):
    """One tiny model per kernel for the module; pruning is removed after every test."""
    yield from cached_model(_MODELS, attn, lambda: tiny_gemma3(attn))


@pytest.fixture
def one(gemma3):
    return gemma3_inputs(gemma3[1], [PROMPT], [random_image(60, 80, seed=1)])


def test_every_method_is_either_run_or_declined_here():
    assert sorted(METHODS + list(VISION_DECLINES) + DECODER_RUNS) == sorted(REGISTRY)


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_and_disable_leaves_nothing(gemma3, one, method):
    model, _ = gemma3
    record = assert_keep_all_is_unpruned(model, one, lambda: enable(model, method, 1.0), **GEN)
    assert record.n_kept == record.n_visual == N


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_returns_the_prompt_and_cache_is_consistent(gemma3, one, method):
    model, _ = gemma3
    handle = enable(model, method, 0.25)
    generate_cached_and_uncached(model, one, **GEN)
    prompt = one["input_ids"]
    assert handle.last.images[0].n_kept == kept_count(0.25, N)
    assert handle.last.seq_len_after == prompt.shape[1] - N + kept_count(0.25, N)


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_with_crops_matches_each_prompt_alone(gemma3, method):
    """Two rows, left padded: a wide image with pan-and-scan crops (1 + 3 blocks of 36 tokens) and a square one
    (1 block); each block is budgeted alone."""
    model, processor = gemma3
    prompts, images = [PROMPT, OTHER], [random_image(30, 100, seed=1), random_image(64, 64, seed=2)]
    handle = enable(model, method, 0.5)
    batch = gemma3_inputs(processor, prompts, images, crops=True)
    assert bool((batch["attention_mask"] == 0).any()) and batch["pixel_values"].shape[0] == 5
    rows = [gemma3_inputs(processor, [p], [im], crops=True) for p, im in zip(prompts, images, strict=True)]
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)
    assert [(im.row, im.index_in_row) for im in handle.last.images] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert [im.n_kept for im in handle.last.images] == [kept_count(0.5, N)] * 5


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_follow_up_turn_static_cache_and_beams(gemma3, keep):
    """On a two-row batch (sliding layers, left padding): a follow-up question on the returned cache equals a fresh
    pruned run of the whole conversation; the static cache equals the dynamic one; beams and several samples return
    the prompt; keep=1.0 gives the unpruned model's beams."""
    model, processor = gemma3
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)]
    inputs = dict(gemma3_inputs(processor, [PROMPT, OTHER], images))
    with torch.no_grad():
        unpruned_beams = model.generate(**inputs, num_beams=3, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        enable(model, "divprune", keep)
        out = gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
        conversation = torch.cat([out.sequences, words(processor, FOLLOW_UP, 2)], dim=1)
        whole = extend(inputs, conversation)  # mask and token_type_ids grown with the question's text tokens
        follow = gen(model, input_ids=conversation, attention_mask=whole["attention_mask"],
                     past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
        fresh = gen(model, **whole, max_new_tokens=2)
        static = gen(model, **inputs, cache_implementation="static", max_new_tokens=2)
        beams = model.generate(**inputs, num_beams=3, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        samples = model.generate(**inputs, num_return_sequences=3, do_sample=True, max_new_tokens=2)
    assert torch.equal(follow.sequences[:, : conversation.shape[1]], conversation)
    assert torch.equal(follow.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(follow.logits), torch.stack(fresh.logits), rtol=0, atol=1e-4)
    assert torch.equal(static.sequences, out.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(out.logits), rtol=0, atol=1e-4)
    assert torch.equal(beams[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(samples[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(3, dim=0))
    if keep == 1.0:
        assert torch.equal(beams, unpruned_beams)


def test_beams_with_unequal_per_image_budgets_are_refused_at_the_call(gemma3):
    """A FLOPs target solved per row gives the two rows' images different counts: Gemma 3's one-tensor features
    cannot be repeated per row by generate, so beams are refused before anything runs; plain generate works."""
    model, processor = gemma3
    inputs = gemma3_inputs(processor, [PROMPT, OTHER], [random_image(84, 140, seed=1), random_image(56, 84, seed=2)])
    handle = enable_pruning(model, "divprune", flops=0.5)
    with torch.no_grad():
        model(**inputs)
        assert len({im.n_kept for im in handle.last.images}) == 2
        with pytest.raises(ValueError, match="same count per image"):
            model.generate(**inputs, num_beams=2, max_new_tokens=2)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_pruned_forward_equals_the_llm_fed_the_kept_features(gemma3, one, method):
    """Oracle: the unpatched model given, through ``mm_encoder_outputs``, exactly the kept features in a prompt that
    holds only the kept image tokens (re-indexed positions, the model's own masks)."""
    model, _ = gemma3
    with torch.no_grad():
        features = model.model.get_image_features(one["pixel_values"]).pooler_output[0]
        handle = enable(model, method, 9)
        logits = model(**one).logits
        ids = model.generate(**one, **GEN)
    kept = handle.last.images[0].kept
    disable_pruning(model)
    kwargs, _ = kept_prompt(model, one, kept)
    with torch.no_grad():
        fed = BaseModelOutputWithPooling(pooler_output=features[kept][None])
        expected = model(**kwargs, mm_encoder_outputs={"image": fed}).logits
        fed = BaseModelOutputWithPooling(pooler_output=features[kept][None])
        expected_ids = model.generate(**kwargs, mm_encoder_outputs={"image": fed}, **GEN)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids[:, one["input_ids"].shape[1]:], expected_ids[:, kwargs["input_ids"].shape[1]:])


def test_pruned_mask_keeps_the_bidirectional_block_over_exactly_the_kept_tokens(gemma3):
    """Both layer kinds: the masks the pruned model uses equal those the model builds for an unpruned prompt that
    holds only the kept image tokens; the kept tokens see each other both ways; the window spans 16 tokens."""
    model, processor = gemma3
    inputs = gemma3_inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
    handle = enable(model, "divprune", 12)
    seen, hooks = layer_masks(model)
    try:
        with torch.no_grad():
            model(**inputs)
            kept = handle.last.images[0].kept
            disable_pruning(model)
            kwargs, keep = kept_prompt(model, inputs, kept)
            features = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
            fed = BaseModelOutputWithPooling(pooler_output=features[kept])
            model(**kwargs, mm_encoder_outputs={"image": fed})
    finally:
        for hook in hooks:
            hook.remove()
    types = model.config.text_config.layer_types
    assert set(types) == {"sliding_attention", "full_attention"}
    image = (kwargs["token_type_ids"][0] == 1).nonzero().squeeze(1)
    assert image.numel() == 12
    length = kwargs["input_ids"].shape[1]
    assert length > SLIDING_WINDOW + 12  # the window cuts into the pruned prompt
    for i, (pruned, reference) in seen.items():
        allowed = allowed_keys(pruned)
        assert torch.equal(allowed, allowed_keys(reference))
        block = allowed[image][:, image]
        if types[i] == "full_attention":
            assert bool(block.all())  # bidirectional over exactly the kept image tokens
            text = (kwargs["token_type_ids"][0] == 0).nonzero().squeeze(1)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            assert torch.equal(allowed[text][:, text], causal[text][:, text])  # text stays causal
        else:
            q, kv = torch.meshgrid(image, image, indexing="ij")
            assert torch.equal(block, (q - kv).abs() < SLIDING_WINDOW)
            last = allowed[-1]
            assert int(last.sum()) == SLIDING_WINDOW and bool(last[-SLIDING_WINDOW:].all())


def test_start_and_end_of_image_tokens_are_never_pruned(gemma3, one):
    model, _ = gemma3
    handle = enable(model, "random", 1)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**one)
    finally:
        hook.remove()
    ids, config = seen[0][0], model.config
    assert handle.last.images[0].n_kept == 1
    for token in (config.boi_token_id, config.eoi_token_id):
        assert int((ids == token).sum()) == int((one["input_ids"][0] == token).sum()) == 1
    assert int((ids == config.image_token_id).sum()) == 1


def _declines(model, declines: dict[str, str]) -> None:
    before = hook_and_attribute_census(model)
    for method, match in declines.items():
        with pytest.raises(ValueError, match=match):
            enable_pruning(model, method, keep=0.5)
    assert left_clean(model) and hook_and_attribute_census(model) == before


def test_methods_without_a_signal_here_decline_before_touching_the_model(gemma3):
    _declines(gemma3[0], VISION_DECLINES)


@pytest.mark.parametrize("method, keep, options, match", [
    ("no-such-method", 0.5, {}, "unknown method"), ("divprune", 0.0, {}, "keep"), ("divprune", 1.5, {}, "keep"),
    ("hiprune", 0.5, {"object_layer": 7}, "vision layer 7.*3 layers"),
    ("divprune", 0.5, {"scope": "image"}, "pan-and-scan crops.*scope=None"),
])
def test_bad_options_fail_clearly_before_the_model_is_touched(gemma3, method, keep, options, match):
    model, _ = gemma3
    before = hook_and_attribute_census(model)
    with pytest.raises(ValueError, match=match):
        enable_pruning(model, method, keep=keep, **options)
    assert left_clean(model) and hook_and_attribute_census(model) == before


@pytest.mark.parametrize("what", ["no token_type_ids", "placeholders without features"])
def test_bad_inputs_fail_clearly_before_the_language_model_runs(gemma3, one, what):
    model, _ = gemma3
    inputs = dict(one)
    if what == "no token_type_ids":
        inputs.pop("token_type_ids")
        match = "token_type_ids"
    else:
        inputs["pixel_values"] = torch.cat([one["pixel_values"]] * 2)
        match = "placeholder tokens but the 2 image"
    enable_pruning(model, "divprune", keep=0.5)
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=match):
            model(**inputs)
    finally:
        hook.remove()
    assert not calls


def test_flops_presets_and_budget():
    from tokenprune.budget.flops import ModelShape, preset

    twelve, big = preset("gemma-3-12b"), preset("gemma-3-27b")
    assert (twelve.num_layers, twelve.num_kv_heads, twelve.d_head, twelve.visual_tokens) == (48, 8, 256, 256)
    assert (big.hidden_size, big.num_layers, big.num_heads, big.d_head) == (5376, 62, 32, 128)
    model, processor = built(_MODELS, "sdpa", lambda: tiny_gemma3("sdpa"))
    shape = ModelShape.from_config(model.config)
    assert (shape.num_layers, shape.d_head, shape.num_kv_heads) == (2, 32, 2)
    one = gemma3_inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])
    handle = enable_pruning(model, "divprune", flops=0.5)
    with torch.no_grad():
        model(**one)
    disable_pruning(model)
    assert 0 < handle.last.n_kept < N and handle.last.flops_ratio <= 0.5


def test_real_depth_model_has_the_released_depths_and_runs_methods_at_their_default_layers():
    from tokenprune.patches.clip_signals import encoder_layers
    from tokenprune.real_depth import real_depth

    model, processor = real_depth("gemma3", "sdpa")
    assert len(encoder_layers(model.model.vision_tower)) == 27
    types = model.config.text_config.layer_types
    assert len(types) == 48 and [i for i, t in enumerate(types) if t == "full_attention"] == list(range(5, 48, 6))
    one = gemma3_inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])
    for method in METHODS:  # every vision-stage method at its default (paper) layers
        handle = enable_pruning(model, method, keep=0.25)
        with torch.no_grad():
            model(**one)
        assert handle.last.n_kept == kept_count(0.25, N)
        disable_pruning(model)
    _declines(model, VISION_DECLINES)


@pytest.mark.parametrize("method", ["divprune", "visiondrop"])
def test_visualize_draws_the_kept_tokens_of_a_gemma3_record(method):
    """The pooled 6 x 6 grid over the whole (resized, not cropped) picture: one panel, boxes as image fractions."""
    from test_viz import assert_looks, grey

    from tokenprune.viz import HEADER, draw_kept, prune_once

    model, processor = built(_MODELS, "sdpa", lambda: tiny_gemma3("sdpa"))
    image = grey(160, 96)
    record = prune_once(model, processor, image, PROMPT, method, keep=9)
    rec = record.images[0]
    assert rec.grid == (6, 6) and rec.view == "image" and rec.n_kept == 9
    figure = draw_kept(image, record, size=320, legend=False)  # one 320x192 panel
    assert figure.size == (320, HEADER + 192)
    assert_looks(figure, rec, lambda i: (0, None), {0: (0, 0, 320, 192)})
    assert left_clean(model)
