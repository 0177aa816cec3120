"""Decoder-stage and two-stage methods on tiny Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE (eager and sdpa):
keep=1.0, cache and batches on a 4-layer DeepStack model and a 16-layer hybrid one; oracles for the DeepStack rows
after the pruning layer and for the Gated DeltaNet layers after it; the attention rows the methods score with; the
docs' Qwen3.5 layer mapping. The vision stage: tests/test_qwen3.py."""

import pytest
import torch
from conftest import (
    DECODER_OPTIONS,
    assert_rows_match_alone,
    built,
    cached_model,
    decoder_methods,
    generate_cached_and_uncached,
    generate_cached_and_uncached_logits,
    left_clean,
    two_stage_methods,
)
from qwen3_cases import GEN, OTHER, PROMPT, hook_count

from tokenprune import disable_pruning, enable_pruning
from tokenprune.methods import METHODS as REGISTRY
from tokenprune.tiny_models import random_image
from tokenprune.tiny_qwen3 import QWEN3_FAMILIES, tiny_qwen3

_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


DECODER_METHODS = [m for m in decoder_methods() + two_stage_methods() if m != "vflowopt"]  # vflowopt: ViT attn map
MOE_REFUSED = {"corematching"}  # core neurons need a dense FFN: refused on a mixture of experts with a clear error


# Qwen3.5 with 16 LLM layers (full attention in 3, 7, 11, 15): layers where every stage's scoring layer maps onto a
# full-attention layer and its pruning layer stays in the stack (PDrop, VisionDrop: defaults 4/8/12 -> 7/11/15)
HYBRID_OPTIONS = {"fastv": {"k": 2}, "dart": {"k": 2}, "sparsevlm": {"layers": (3, 7, 11)},
                  "adaptinfer": {"layers": (3, 7, 11)}, "feather": {"layers": (4, 8)},
                  "transprune": {"layers": (7, 11, 15)}, "todre": {"layer": 3, "tau": 1.0}}
HYBRID_OPTIONS["catp"] = {"layer": 7}  # scored at 7 (A_{K-1} at full-attention layer 3), query at 11


@pytest.fixture(params=QWEN3_FAMILIES)
def deep_qwen3(request, attn):
    """Qwen3-VL: 4 LLM layers, three DeepStack maps (ViT blocks 0, 1, 2) added after LLM layers 0, 1, 2: every method
    prunes at layer 1 or 2, before the last DeepStack addition (which then gets the surviving tokens' rows only).
    Qwen3.5: 16 hybrid layers, the methods at :data:`HYBRID_OPTIONS` (scored at full-attention layers)."""
    yield from cached_model(_MODELS, (request.param, attn, "decoder"), lambda: (
        _hybrid16(request.param, attn) if request.param.startswith("qwen3_5") else _deepstack3(request.param, attn)))


def _deepstack3(family, attn):
    return tiny_qwen3(family, attn, text_layers=4, deepstack=(0, 1, 2))


def _hybrid16(family, attn):
    return tiny_qwen3(family, attn, text_layers=16)


def _enable_decoder(model, method, keep):
    options = HYBRID_OPTIONS if model.config.model_type.startswith("qwen3_5") else DECODER_OPTIONS
    return enable_pruning(model, method, keep=keep, **options.get(method, {}))


def _refused_on_moe(model, method, keep) -> bool:
    """A method of :data:`MOE_REFUSED` on a mixture of experts: refused with a clear error, nothing left behind."""
    if method not in MOE_REFUSED or not model.config.model_type.endswith("_moe"):
        return False
    with pytest.raises(ValueError, match="mixture of experts"):
        _enable_decoder(model, method, keep)
    assert left_clean(model)
    return True


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_keep_all_bit_identical_and_cache_consistent(deep_qwen3, method):
    model, processor = deep_qwen3
    if _refused_on_moe(model, method, 0.5):
        return
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    hooks = hook_count(model)
    with torch.no_grad():
        ref_logits, ref_ids = model(**one).logits, model.generate(**one, **GEN)
        _enable_decoder(model, method, 1.0)
        assert torch.equal(model(**one).logits, ref_logits) and torch.equal(model.generate(**one, **GEN), ref_ids)
    disable_pruning(model)
    assert left_clean(model) and hook_count(model) == hooks
    handle = _enable_decoder(model, method, 0.5)
    generate_cached_and_uncached_logits(model, one, **GEN)
    assert handle.last.visual_per_layer[-1] < handle.last.n_visual


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_padded_batch_rows_match_each_prompt_alone(deep_qwen3, method):
    model, processor = deep_qwen3
    if _refused_on_moe(model, method, 0.4):
        return
    prompts, images = [PROMPT, OTHER], [random_image(96, 128, seed=1), random_image(64, 64, seed=2)]
    _enable_decoder(model, method, 0.4)
    rows = [processor(text=[prompt], images=[image]) for prompt, image in zip(prompts, images, strict=True)]
    batch = processor(text=prompts, images=images)
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)


def _unpruned_entering(model, one, layer, kept):
    """The unpatched model on ``one``: ``(image mask [L], keep mask [L]: the text and the ``kept`` image tokens,
    hidden states entering LLM layer ``layer`` [1, L, D], M-RoPE positions [3, 1, L])``."""
    ids = one["input_ids"][0]
    visual = ids == model.config.image_token_id
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    entering = []
    hook = model.model.language_model.layers[layer].register_forward_pre_hook(lambda m, a: entering.append(a[0]))
    try:
        with torch.no_grad():
            positions, _ = model.model.get_rope_index(
                one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"], image_grid_thw=one["image_grid_thw"])
            model(**one)
    finally:
        hook.remove()
    return visual, keep, entering[0], positions


@pytest.mark.parametrize("method, options", [("fastv", {"k": 1}), ("fastv", {"k": 2}), ("dart", {"k": 2})])
def test_decoder_pruning_before_the_last_deepstack_layer_equals_the_llm_fed_the_kept_rows(attn, method, options):
    """Oracle (Qwen3-VL, DeepStack added after LLM layers 0, 1, 2; pruned at layer K): the unpatched model's hidden
    states entering layer K, gathered at the kept tokens, run through HF's own text model made of layers K.. only,
    given the kept tokens' original M-RoPE positions and exactly the kept tokens' rows of the DeepStack maps still to
    be added (levels K..2). Dropped tokens' rows must not reach it, kept ones must."""
    model, processor = built(_MODELS, ("qwen3_vl", attn, "decoder"), lambda: _deepstack3("qwen3_vl", attn))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    handle = enable_pruning(model, method, keep=0.5, **options)
    with torch.no_grad():
        logits = model(**one).logits
    layer, kept = options["k"], handle.last.images[0].kept
    assert handle.last.tokens_per_layer[layer - 1] > handle.last.tokens_per_layer[layer]
    disable_pruning(model)

    lm = model.model.language_model
    visual, keep, entering, positions = _unpruned_entering(model, one, layer, kept)
    with torch.no_grad():
        deepstack = model.model.get_image_features(one["pixel_values"], one["image_grid_thw"]).deepstack_features
    assert len(deepstack) == 3
    text_row = torch.arange(int(keep.sum()))[None, None]
    later = [level[0][kept] for level in deepstack[layer:]]

    def run_from_layer(rows):
        layers = lm.layers
        lm.layers = torch.nn.ModuleList(list(layers)[layer:])  # HF's loop and DeepStack addition, from layer K on
        try:
            with torch.no_grad():
                out = lm(inputs_embeds=entering[:, keep], position_ids=torch.cat([text_row, positions[:, :, keep]]),
                         visual_pos_masks=visual[keep][None], deepstack_visual_embeds=rows, use_cache=False)
                return model.lm_head(out.last_hidden_state)
        finally:
            lm.layers = layers

    expected = run_from_layer(later)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, run_from_layer([torch.zeros_like(r) for r in later]), atol=1e-4)
    dropped = torch.ones(visual.sum(), dtype=torch.bool)
    dropped[kept] = False
    wrong = [level[0][dropped][: len(kept)] for level in deepstack[layer:]]  # other tokens' rows
    assert not torch.allclose(logits, run_from_layer(wrong), atol=1e-4)


def test_hybrid_decoder_pruning_equals_the_later_layers_fed_the_kept_hidden_states(attn):
    """Oracle (Qwen3.5, FastV K=2 -> scored at full-attention layer 3, pruned from layer 4): HF's own text model made
    of layers 4.. only, fed the unpatched model's hidden states entering layer 4 at the kept tokens (their original
    M-RoPE positions), with fresh Gated DeltaNet states: the linear-attention layers after the pruning step run on the
    pruned sequence alone."""
    model, processor = built(_MODELS, ("qwen3_5", attn, "decoder"), lambda: _hybrid16("qwen3_5", attn))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    handle = enable_pruning(model, "fastv", keep=0.5, k=2)
    with torch.no_grad():
        logits = model(**one).logits
    kept, per_layer = handle.last.images[0].kept, handle.last.tokens_per_layer
    disable_pruning(model)
    assert per_layer[3] > per_layer[4] == per_layer[-1]  # scored at layer 3 (full attention), pruned from 4
    lm = model.model.language_model
    _, keep, entering, positions = _unpruned_entering(model, one, 4, kept)
    layers, types = lm.layers, model.config.text_config.layer_types
    lm.layers = torch.nn.ModuleList(list(layers)[4:])
    lm.config.layer_types = types[4:] + types[:4]  # the truncated stack's own layer types, in order
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=entering[:, keep], use_cache=False,
                     position_ids=torch.cat([torch.arange(int(keep.sum()))[None, None], positions[:, :, keep]]))
            expected = model.lm_head(out.last_hidden_state)
    finally:
        lm.layers, lm.config.layer_types = layers, types
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", QWEN3_FAMILIES)
def test_recomputed_attention_rows_equal_the_eager_attention_weights(family):
    """The rows decoder-stage methods score with (patches/attention_rows.py) are the model's own attention: Qwen3's
    q_norm/k_norm, Qwen3.5's gated q_proj and partial rotary included. Oracle: eager attention weights."""
    from tokenprune.patches.attention_rows import attention_rows

    model, processor = built(_MODELS, (family, "eager"), lambda: tiny_qwen3(family, "eager"))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    lm = model.model.language_model
    layer = next(i for i, block in enumerate(lm.layers) if hasattr(block, "self_attn"))
    seen = {}
    hook = lm.layers[layer].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(h=args[0] if args else kwargs["hidden_states"],
                                            rotary=kwargs["position_embeddings"]), with_kwargs=True)
    try:
        with torch.no_grad():
            weights = [a for a in model(**one, output_attentions=True).attentions if a is not None][0]
    finally:
        hook.remove()
    n = seen["h"].shape[1]
    rows = torch.tensor([[n - 1, n // 2]])
    got = attention_rows(lm.layers[layer], seen["h"], rows, *seen["rotary"], torch.ones(1, n, dtype=torch.bool))
    torch.testing.assert_close(got, weights[:, :, rows[0]].float(), rtol=1e-5, atol=1e-5)


def test_qwen3_5_layer_mapping_in_the_docs_is_the_adapters():
    """docs/qwen3.md's table of where each decoder-stage method scores and prunes on Qwen3.5-9B (32 layers) is what
    Qwen3VLAdapter.decoder_plan gives for the method's paper plan."""
    import re
    from pathlib import Path

    from tokenprune.catalog import REFERENCE_DEPTH
    from tokenprune.patches.qwen3_vl import Qwen3VLAdapter

    page = (Path(__file__).resolve().parents[1] / "docs" / "qwen3.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|$", page.split("<!-- qwen3.5 mapping -->")[1], flags=re.M))
    for name in DECODER_METHODS:
        method = REGISTRY[name]()
        decoder = method.stages()[1] if method.stage == "two-stage" else method
        paper = decoder.plan(REFERENCE_DEPTH)
        try:
            mapped = Qwen3VLAdapter.decoder_plan(name, paper, model_type="qwen3_5")
        except ValueError:
            mapped = None
        cell = lambda plan: ", ".join(f"{p.layer} ({p.score_layer})" for p in plan)  # noqa: E731
        expected = f"{cell(paper)} | " + (cell(mapped) if mapped else "declines at these layers (set its `layer=`")
        assert rows.get(name, "").startswith(expected), (name, rows.get(name), expected)
