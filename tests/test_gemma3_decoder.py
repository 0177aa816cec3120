"""Gemma 3's decoder-stage and two-stage methods on tiny models (eager and sdpa): the per-layer masks over the kept
slots (bidirectional image block, sliding window in original positions) against the model's own mask functions and a
layer-by-layer oracle, on an 8-layer model (sliding and global layers after the pruning layer), and every such method
at its default layers on the real-depth one. The vision stage: tests/test_gemma3.py."""

import re

import pytest
import torch
from conftest import (
    assert_rows_match_alone,
    cached_model,
    generate_cached_and_uncached,
    hook_and_attribute_census,
    left_clean,
)
from gemma3_oracle import (
    DECODER_RUNS,
    GEN,
    OTHER,
    PROMPT,
    N,
    allowed_keys,
    gemma3_inputs,
    kept_prompt,
    layer_masks,
)

from tokenprune import disable_pruning, enable_pruning, pruning
from tokenprune.tiny_gemma3 import SLIDING_WINDOW, tiny_gemma3
from tokenprune.tiny_models import random_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SHALLOW = 8  # LLM layers: sliding 0-4, global 5, sliding 6-7 (every method's layers set to fit, below)
SHALLOW_OPTIONS = {
    "adaptinfer": {"layers": (1, 4, 6)}, "feather": {"layers": (3, 6)}, "pdrop": {"layers": (2, 4, 6)},
    "sparsevlm": {"layers": (1, 4, 6)}, "todre": {"layer": 5}, "transprune": {"layers": (3, 5, 7)},
    "catp": {"layer": 4}, "vflowopt": {"layers": (2, 6)},
}


_MODELS: dict = {}


@pytest.fixture
def shallow(attn):
    """One 8-layer model per kernel for the module; pruning is removed after every test."""
    yield from cached_model(_MODELS, attn, lambda: tiny_gemma3(attn, text_layers=SHALLOW))


def _decoder(model, method, keep):
    return enable_pruning(model, method, keep=keep, **SHALLOW_OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", DECODER_RUNS)
def test_decoder_stage_keep_all_is_bit_identical_and_disable_leaves_nothing(shallow, method):
    model, processor = shallow
    inputs = gemma3_inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
    before = hook_and_attribute_census(model)
    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        _decoder(model, method, 1.0)
        logits, ids = model(**inputs).logits, model.generate(**inputs, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    disable_pruning(model)
    assert left_clean(model) and hook_and_attribute_census(model) == before


@pytest.mark.parametrize("method", DECODER_RUNS)
def test_decoder_stage_cached_equals_uncached_and_padded_batch_equals_rows(shallow, method):
    """keep=0.25, two left-padded rows longer than the 16-token window: generate with the KV cache == without it
    and returns the prompt; each row's last logits and kept tokens in the batch == the row alone."""
    model, processor = shallow
    prompts, images = [PROMPT, OTHER], [random_image(60, 80, seed=1), random_image(64, 64, seed=2)]
    _decoder(model, method, 0.25)
    batch = gemma3_inputs(processor, prompts, images)
    assert bool((batch["attention_mask"] == 0).any())
    rows = [gemma3_inputs(processor, [prompt], [image]) for prompt, image in zip(prompts, images, strict=True)]
    assert assert_rows_match_alone(model, rows, batch).n_kept < 2 * N
    generate_cached_and_uncached(model, batch, **GEN)


def _kept_slots(model, inputs, handle) -> torch.Tensor:
    """Prompt indices of the tokens a one-row decoder-stage prefill kept (text and kept image tokens)."""
    _, keep = kept_prompt(model, inputs, handle.last.images[0].kept)
    return keep.nonzero().squeeze(1)


def _original_window(positions: torch.Tensor, window: int):
    """A mask function (HF's ``and_mask_function`` form) for the sliding window counted in original positions."""
    return lambda batch, head, q, kv: positions[batch, kv] > positions[batch, q] - window


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_decoder_stage_logits_equal_the_layers_run_by_hand_on_the_kept_slots(shallow, method):
    """Oracle: the unpatched model's layers from the pruning layer (2) on, run one by one on the kept slots' hidden
    states with the masks the model's own ``create_causal_mask`` builds -- causal OR the image block of the kept
    tokens (``blockwise_overlay``), AND in sliding layers the window over their ORIGINAL positions -- and the
    per-type rotary tables at the original positions, give the pruned model's logits."""
    from transformers.masking_utils import blockwise_overlay, create_causal_mask
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    model, processor = shallow
    inputs = gemma3_inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
    lm = model.model.language_model
    handle = _decoder(model, method, 9)
    with torch.no_grad():
        pruned = model(**inputs).logits
    slots = _kept_slots(model, inputs, handle)
    assert handle.last.tokens_per_layer[1:3] == (inputs["input_ids"].shape[1], slots.numel())  # pruned from layer 2
    disable_pruning(model)
    seen = {}
    hook = lm.layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    h, positions = seen["h"][:, slots], slots[None]
    gaps = positions[0, None, :] - positions[0, :, None]
    steps = torch.arange(slots.numel())
    assert bool(((gaps >= SLIDING_WINDOW) & (steps[None] - steps[:, None] < SLIDING_WINDOW)).any())  # windows cut
    blocks = get_block_sequence_ids_for_mask(inputs["token_type_ids"][:, slots])
    masks = {
        "full_attention": create_causal_mask(
            lm.config, h, None, None, None, or_mask_function=blockwise_overlay(blocks)),
        "sliding_attention": create_causal_mask(
            lm.config, h, None, None, None, or_mask_function=blockwise_overlay(blocks),
            and_mask_function=_original_window(positions, SLIDING_WINDOW)),
    }
    with torch.no_grad():
        for i in range(2, SHALLOW):
            kind = lm.config.layer_types[i]
            h = lm.layers[i](h, attention_mask=masks[kind], position_embeddings=lm.rotary_emb(h, positions, kind))
        expected = model.lm_head(lm.norm(h))
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)


def test_decoder_stage_masks_keep_the_block_and_count_the_window_in_original_positions(shallow):
    """The masks of the pruned layers against those the model builds for an unpruned prompt holding only the kept
    tokens: global layers are identical (causal + the bidirectional block over exactly the kept image tokens);
    sliding layers are that mask AND the window over original positions, so they differ from the model's mask of
    the shorter prompt exactly where the removed tokens would have pushed a key out of the window."""
    model, processor = shallow
    inputs = gemma3_inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
    handle = _decoder(model, "fastv", 20)  # 20 image tokens: wider than the window
    seen, hooks = layer_masks(model)
    try:
        with torch.no_grad():
            model(**inputs)
            slots = _kept_slots(model, inputs, handle)
            disable_pruning(model)
            kwargs, keep = kept_prompt(model, inputs, handle.last.images[0].kept)
            model(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    types = model.config.text_config.layer_types
    image = (kwargs["token_type_ids"][0] == 1).nonzero().squeeze(1)
    q, kv = torch.meshgrid(slots, slots, indexing="ij")
    in_window = kv > q - SLIDING_WINDOW  # original positions
    full_reference = allowed_keys(seen[5][1])
    assert bool(full_reference[image][:, image].all()) and image.numel() == 20
    differs = 0
    for i in range(2, SHALLOW):
        pruned, reference = allowed_keys(seen[i][0]), allowed_keys(seen[i][1])
        if types[i] == "full_attention":
            assert torch.equal(pruned, reference)
        else:
            assert torch.equal(pruned, full_reference & in_window)
            assert bool((pruned <= reference).all())  # the shorter prompt's window is never narrower
            differs += int((reference & ~pruned).sum())
            block = pruned[image][:, image]
            assert torch.equal(block, in_window[image][:, image])  # bidirectional inside the window
            later = torch.ones_like(block).triu()
            assert bool(block[later].all()) and not bool(block.all())  # later ones always seen, earlier ones cut
    assert differs > 0


def test_decoder_methods_run_at_their_default_layers_on_the_real_depth_model():
    """Every decoder-stage and two-stage method at its paper layers on the 48-layer LLM (sdpa): pruned, and
    generate with the KV cache == without it."""
    from tokenprune.real_depth import real_depth

    model, processor = real_depth("gemma3", "sdpa")
    inputs = gemma3_inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])
    for method in DECODER_RUNS:
        with pruning(model, method, keep=0.25) as handle:
            generate_cached_and_uncached(model, inputs, max_new_tokens=2, do_sample=False)
        assert handle.last.n_kept < N, method
    assert left_clean(model)


def test_decoder_stage_under_flash_attention_is_refused_with_the_reason():
    """One 4-D mask per layer type cannot be handed to flash-attention: refused at enable time, naming the kernels
    that work (the method tables, which pass no config, list the decoder methods as running)."""
    from types import SimpleNamespace

    from tokenprune.patches.gemma3 import Gemma3Adapter

    flash = SimpleNamespace(_attn_implementation="flash_attention_2")
    assert re.search("one 4-D attention mask per layer type.*'sdpa' or 'eager'",
                     Gemma3Adapter.decoder_reason("gemma3", "fastv", 2, flash))
    assert Gemma3Adapter.decoder_reason("gemma3", "fastv", 2, SimpleNamespace(_attn_implementation="sdpa")) is None
    assert Gemma3Adapter.decoder_reason("gemma3", "fastv", 2) is None
