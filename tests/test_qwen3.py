"""Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE end to end on tiny models (eager and sdpa): every vision-stage
method with a signal there; DeepStack against an oracle; M-RoPE positions; batches; videos; clear refusals."""

import pytest
import torch
from conftest import (
    MERGING,
    cached_model,
    decoder_methods,
    enable,
    generate_cached_and_uncached,
    runnable_methods,
    two_stage_methods,
)

from tokenprune import disable_pruning, enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS as REGISTRY
from tokenprune.patches.qwen3_vl import deepstack_like
from tokenprune.patches.units import ImageSelection
from tokenprune.tiny_models import random_image
from tokenprune.tiny_qwen3 import QWEN3_FAMILIES, random_video3, tiny_qwen3

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
PROMPT = f"USER : {IMG}what is in the image ? ASSISTANT :"
OTHER = f"USER : {IMG}\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
VIDEO = f"USER : {VID}what is the dog doing ? ASSISTANT :"
GEN = dict(max_new_tokens=4, do_sample=False)


def _runs_without_cls(name: str) -> bool:
    try:
        REGISTRY[name].signals_needed(cls_token=False)
    except ValueError:
        return False
    return True


METHODS = [m for m in runnable_methods("qwen3_vl") if _runs_without_cls(m)]
NO_CLS = [m for m in runnable_methods("qwen3_vl") if not _runs_without_cls(m)]
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(params=QWEN3_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def qwen3(family, attn):
    """One tiny model per (family, kernel) for the module; pruning is removed after every test."""
    yield from cached_model(_MODELS, (family, attn), lambda: tiny_qwen3(family, attn))


@pytest.fixture
def one(qwen3):
    _, processor = qwen3
    return processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])  # 3 x 4 merged tokens


def _left_clean(model) -> bool:
    return not ({_HANDLE_ATTR, "forward", "generate"} & set(model.__dict__)) and model.model.rope_deltas is None


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_and_disable_leaves_nothing(qwen3, one, method):
    model, _ = qwen3
    hooks = _hook_count(model)
    with torch.no_grad():
        ref_logits, ref_ids = model(**one).logits, model.generate(**one, **GEN)
        handle = enable(model, method, 1.0)
        logits, ids = model(**one).logits, model.generate(**one, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    assert handle.last.n_kept == handle.last.n_visual == 12
    disable_pruning(model)
    assert _left_clean(model) and _hook_count(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(**one).logits, ref_logits)


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_returns_the_prompt_and_cache_is_consistent(qwen3, one, method):
    model, _ = qwen3
    handle = enable(model, method, 0.34)
    generate_cached_and_uncached(model, one, **GEN)
    prompt = one["input_ids"]
    assert handle.last.images[0].n_kept == kept_count(0.34, 12)
    assert handle.last.seq_len_after == prompt.shape[1] - 12 + kept_count(0.34, 12)


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_rows_match_each_prompt_alone(qwen3, method):
    """Two rows, different image sizes (12 and 4 visual tokens) and prompt lengths, left padded."""
    model, processor = qwen3
    prompts, images = [PROMPT, OTHER], [random_image(96, 128, seed=1), random_image(64, 64, seed=2)]
    handle = enable(model, method, 0.5)
    alone = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images, strict=True):
            alone.append((model(**processor(text=[prompt], images=[image])).logits[0, -1], handle.last.images[0].kept))
        batch = processor(text=prompts, images=images)
        assert bool((batch["attention_mask"] == 0).any())
        logits = model(**batch).logits[:, -1]
        batch_kept = [im.kept for im in handle.last.images]
        ids = model.generate(**batch, **GEN)
        ids_nocache = model.generate(**batch, **GEN, use_cache=False)
    assert [im.n_kept for im in handle.last.images] == [kept_count(0.5, 12), kept_count(0.5, 4)]
    for row, (out, kept) in enumerate(alone):
        assert torch.equal(kept, batch_kept[row])
        torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert torch.equal(ids, ids_nocache)


def _language_positions(model):
    """Position ids the language model receives, one entry per call (prefill, then decode steps)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_kept_tokens_keep_their_original_mrope_positions_at_prefill_and_first_decode(qwen3, one):
    model, _ = qwen3
    seen, hook = _language_positions(model)
    try:
        with torch.no_grad():
            model.generate(**one, max_new_tokens=2, do_sample=False)
            handle = enable(model, "divprune", 5)
            model.generate(**one, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    (unpruned, unpruned_step), (pruned, pruned_step) = seen[:2], seen[2:]
    ids = one["input_ids"][0]
    is_image = ids == model.config.image_token_id
    keep = ~is_image
    keep[is_image.nonzero().squeeze(1)[handle.last.images[0].kept]] = True
    assert pruned.shape[-1] == int(keep.sum()) < ids.numel()
    assert torch.equal(pruned[-3:, 0], unpruned[-3:, 0][:, keep])  # image tokens AND later text: original (t, h, w)
    assert bool((unpruned_step[-3:, 0, 0] == unpruned[-3:, 0].max() + 1).all())
    assert torch.equal(pruned_step[-3:], unpruned_step[-3:])  # first decode step: the unpruned prompt's next position


def _hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_deepstack_pruned_forward_equals_the_llm_fed_the_kept_features(attn, method):
    """Oracle (Qwen3-VL): the unpatched model given, through ``mm_encoder_outputs``, exactly the kept features and
    the kept rows of every DeepStack map, at the kept tokens' original M-RoPE positions."""
    model, processor = _MODELS.setdefault(("qwen3_vl", attn), tiny_qwen3("qwen3_vl", attn))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"], image_grid_thw=one["image_grid_thw"]
        )
        vision = model.model.get_image_features(one["pixel_values"], one["image_grid_thw"])
        handle = enable(model, method, 4)
        logits = model(**one).logits
    kept = handle.last.images[0].kept
    disable_pruning(model)
    assert len(vision.deepstack_features) == 2
    ids = one["input_ids"][0]
    keep = ids != model.config.image_token_id
    keep[(~keep).nonzero().squeeze(1)[kept]] = True
    fed = type(vision)(pooler_output=[vision.pooler_output[0][kept]])
    fed.deepstack_features = [[level[0][kept]] for level in vision.deepstack_features]
    text_row = torch.arange(int(keep.sum()))[None, None]
    kwargs = dict(input_ids=ids[keep][None], mm_token_type_ids=one["mm_token_type_ids"][:, keep],
                  position_ids=torch.cat([text_row, positions[:, :, keep]]))
    with torch.no_grad():
        expected = model(**kwargs, mm_encoder_outputs={"image": fed}).logits
        fed.deepstack_features = [[torch.zeros_like(level[0])] for level in fed.deepstack_features]
        without_deepstack = model(**kwargs, mm_encoder_outputs={"image": fed}).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, without_deepstack, atol=1e-4)  # the DeepStack maps matter in this model


def test_merged_tokens_merge_their_deepstack_rows_the_same_way():
    """VisionDrop-style merge (target + mean of the others): the DeepStack row follows the same weights."""
    gen = torch.Generator().manual_seed(0)
    features, deepstack = torch.randn(6, 16, generator=gen), torch.randn(6, 8, generator=gen)
    assign = torch.tensor([-1, 0, -1, 0, 0, -1])  # tokens 1, 3, 4 folded into one merged token; target 3
    merged = features[3] + (features[1] + features[4]) / 2
    slots = torch.tensor([0, 1, 2, 5])  # kept 0, 2, 5; the merged token sits in its first member's slot (1)
    chosen = ImageSelection(slots, torch.stack([features[0], merged, features[2], features[5]]),
                            torch.tensor([0, 2, 5]), 1, assign)
    rows = deepstack_like(deepstack, features, chosen)
    expected = torch.stack([deepstack[0], deepstack[3] + (deepstack[1] + deepstack[4]) / 2, deepstack[2], deepstack[5]])
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    bad = ImageSelection(slots, chosen.features.clone(), chosen.kept, 1, assign)
    bad.features[1] = torch.randn(16, generator=gen)  # not a combination of its members
    with pytest.raises(RuntimeError, match="not a linear combination"):
        deepstack_like(deepstack, features, bad)


def test_video_frames_with_timestamps_are_pruned_per_frame(qwen3):
    """Qwen3-VL's video prompt: timestamp text between frames; each frame is budgeted alone; text is never pruned."""
    model, processor = qwen3
    inputs = processor(text=[VIDEO], videos=[random_video3(4, 64, 96, seed=3)])  # 2 frames x 2 x 3 tokens
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.vision_start_token_id).sum()) == 3  # the prompt's plus one per frame
    handle = enable(model, "divprune", 0.5)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    record = handle.last.images[0]
    assert record.kind == "video" and record.n == 12 and record.n_kept == 6
    assert sorted(set((record.kept // 6).tolist())) == [0, 1] and int((record.kept < 6).sum()) == 3
    text = int((ids != model.config.video_token_id).sum())
    assert handle.last.seq_len_after == text + 6
    assert torch.equal(out, uncached) and torch.equal(out[:, : ids.numel()], inputs["input_ids"])


@pytest.mark.parametrize("method", NO_CLS)
def test_methods_without_a_signal_here_decline_before_touching_the_model(qwen3, method):
    model, _ = qwen3
    with pytest.raises(ValueError, match=r"\[CLS\].*divprune"):
        enable(model, method, 0.5)
    assert _left_clean(model)


@pytest.mark.parametrize("method, keep, options, match", [
    ("no-such-method", 0.5, {}, "unknown method"), ("divprune", 0.0, {}, "keep"), ("divprune", -0.5, {}, "keep"),
    ("divprune", 1.5, {}, "keep"),
    ("fastv", 0.5, {"k": 9}, "do not exist"),
])
def test_bad_input_fails_clearly_before_the_model_is_touched(qwen3, method, keep, options, match):
    model, _ = qwen3
    hooks = _hook_count(model)
    with pytest.raises(ValueError, match=match):
        enable_pruning(model, method, keep=keep, **options)
    assert _left_clean(model) and _hook_count(model) == hooks


# --- decoder-stage methods on Qwen3-VL: pruning before the last DeepStack layer hands it only the kept rows ---------
DECODER_METHODS = [m for m in decoder_methods() + two_stage_methods() if m != "vflowopt"]  # vflowopt: ViT attn map
MOE_REFUSED = {"corematching"}  # core neurons need a dense FFN: refused on a mixture of experts with a clear error
DECODER_OPTIONS = {"fastv": {"k": 2}, "dart": {"k": 2}, "feather": {"layers": (1, 2)},
                   "transprune": {"layers": (1, 2, 3)}, "todre": {"layer": 1, "tau": 1.0},
                   "sparsevlm": {"layers": (0, 1, 2)}, "adaptinfer": {"layers": (0, 1, 2)}}
DECODER_OPTIONS["catp"] = {"layer": 1}  # 4 layers: in-context pool scored at 0 and 1, cut from 2; query from 3


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


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_keep_all_bit_identical_and_cache_consistent(deep_qwen3, method):
    model, processor = deep_qwen3
    if method in MOE_REFUSED and model.config.model_type.endswith("_moe"):
        with pytest.raises(ValueError, match="mixture of experts"):
            _enable_decoder(model, method, 0.5)
        assert _left_clean(model)
        return
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    hooks = _hook_count(model)
    with torch.no_grad():
        ref_logits, ref_ids = model(**one).logits, model.generate(**one, **GEN)
        _enable_decoder(model, method, 1.0)
        assert torch.equal(model(**one).logits, ref_logits) and torch.equal(model.generate(**one, **GEN), ref_ids)
        disable_pruning(model)
        assert _left_clean(model) and _hook_count(model) == hooks
        handle = _enable_decoder(model, method, 0.5)
        cached = model.generate(**one, **GEN, output_logits=True, return_dict_in_generate=True)
        uncached = model.generate(**one, **GEN, use_cache=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(cached.sequences[:, : one["input_ids"].shape[1]], one["input_ids"])
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-4, atol=1e-4)
    assert handle.last.visual_per_layer[-1] < handle.last.n_visual


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_padded_batch_rows_match_each_prompt_alone(deep_qwen3, method):
    model, processor = deep_qwen3
    if method in MOE_REFUSED and model.config.model_type.endswith("_moe"):
        with pytest.raises(ValueError, match="mixture of experts"):
            _enable_decoder(model, method, 0.4)
        return
    prompts, images = [PROMPT, OTHER], [random_image(96, 128, seed=1), random_image(64, 64, seed=2)]
    handle = _enable_decoder(model, method, 0.4)
    alone = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images, strict=True):
            alone.append((model(**processor(text=[prompt], images=[image])).logits[0, -1],
                          [im.kept for im in handle.last.images]))
        batch = processor(text=prompts, images=images)
        logits = model(**batch).logits[:, -1]
        kept = [im.kept for im in handle.last.images]
        ids, ids_nocache = model.generate(**batch, **GEN), model.generate(**batch, **GEN, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip([k for _, ks in alone for k in ks], kept, strict=True))
    for row, (out, _) in enumerate(alone):
        torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, ids_nocache)


def test_docs_snippets_run_as_written(capsys):
    """Each Python block of docs/qwen3.md runs offline and prints the summary its last comment states."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "qwen3.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    built = {re.search(r'tiny_qwen3\("(\w+)"\)', b).group(1) for b in blocks}
    assert built == set(QWEN3_FAMILIES)
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})
        printed = capsys.readouterr().out.strip()
        assert printed == block.rstrip().rsplit("# ", 1)[1]


def test_flops_count_active_experts_only():
    from tokenprune.budget.flops import ModelShape, prefill_flops, preset

    model, _ = tiny_qwen3("qwen3_vl_moe")  # 4 experts of width 64, 2 active
    shape = ModelShape.from_config(model.config)
    assert shape.intermediate_size == 2 * 64 and shape.num_layers == 2
    dense = ModelShape.from_config(tiny_qwen3("qwen3_vl")[0].config)
    assert dense.intermediate_size == 256
    moe = preset("qwen3-vl-30b-a3b")
    assert moe.intermediate_size == 8 * 768 and moe.num_kv_heads == 4 and moe.num_layers == 48
    assert prefill_flops(moe, 1000) < prefill_flops(preset("qwen3-vl-8b"), 1000)  # ~3B active vs 8B


def test_methods_command_lists_the_new_model_types(capsys):
    from tokenprune.cli import main

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out.splitlines()[-1]
    assert all(f" {t}" in listed for t in QWEN3_FAMILIES) and "qwen2_5_vl" in listed


@pytest.mark.parametrize("method", ["divprune", "visiondrop"])
def test_visualize_draws_the_kept_tokens_of_a_qwen3_vl_record(method):
    from test_viz import assert_looks, grey

    from tokenprune.viz import HEADER, draw_kept, prune_once

    model, processor = _MODELS.setdefault(("qwen3_vl", "sdpa"), tiny_qwen3("qwen3_vl", "sdpa"))
    image = grey(160, 96)  # 3 x 5 merged tokens of 32x32 px
    record = prune_once(model, processor, image, PROMPT, method, keep=6)
    rec = record.images[0]
    assert rec.grid == (3, 5) and rec.view == "image"
    figure = draw_kept(image, record, size=320, legend=False)  # one 320x192 panel
    assert figure.size == (320, HEADER + 192)
    assert_looks(figure, rec, lambda i: (0, None), {0: (0, 0, 320, 192)})
    assert _left_clean(model)


@pytest.mark.parametrize("family", QWEN3_FAMILIES)
def test_real_depth_models_have_the_released_depths_and_run_methods_at_their_default_layers(family):
    from tokenprune.real_depth import real_depth

    model, processor = real_depth(family, "sdpa")
    config = model.config
    assert len(model.model.visual.blocks) == 27
    layers = {"qwen3_vl": 36, "qwen3_vl_moe": 48, "qwen3_5": 32, "qwen3_5_moe": 40}[family]
    assert len(model.model.language_model.layers) == layers
    if family.startswith("qwen3_vl"):
        assert list(config.vision_config.deepstack_visual_indexes) == [8, 16, 24]
    else:
        full = [i for i, t in enumerate(config.text_config.layer_types) if t == "full_attention"]
        assert full == list(range(3, layers, 4))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    for method in METHODS:  # every vision-stage method at its default (paper) layers
        handle = enable_pruning(model, method, keep=0.25)
        with torch.no_grad():
            model(**one)
        assert handle.last.n_kept == 3
        disable_pruning(model)
    # FastV's default K=2: on Qwen3-VL before the last DeepStack addition (after LLM layers 0, 1, 2); on Qwen3.5
    # scored at full-attention layer 3 and pruned from 4
    handle = enable_pruning(model, "fastv", keep=0.5)
    with torch.no_grad():
        cached = model.generate(**one, **GEN)
        assert torch.equal(cached, model.generate(**one, **GEN, use_cache=False))
    pruned = 2 if family.startswith("qwen3_vl") else 4
    assert handle.last.tokens_per_layer[pruned - 1] > handle.last.tokens_per_layer[pruned]
    disable_pruning(model)
    assert _left_clean(model)


@pytest.mark.parametrize("method, options", [("fastv", {"k": 1}), ("fastv", {"k": 2}), ("dart", {"k": 2})])
def test_decoder_pruning_before_the_last_deepstack_layer_equals_the_llm_fed_the_kept_rows(attn, method, options):
    """Oracle (Qwen3-VL, DeepStack added after LLM layers 0, 1, 2; pruned at layer K): the unpatched model's hidden
    states entering layer K, gathered at the kept tokens, run through HF's own text model made of layers K.. only,
    given the kept tokens' original M-RoPE positions and exactly the kept tokens' rows of the DeepStack maps still to
    be added (levels K..2). Dropped tokens' rows must not reach it, kept ones must."""
    model, processor = _MODELS.setdefault(("qwen3_vl", attn, "decoder"), _deepstack3("qwen3_vl", attn))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    handle = enable_pruning(model, method, keep=0.5, **options)
    with torch.no_grad():
        logits = model(**one).logits
    layer, kept = options["k"], handle.last.images[0].kept
    assert handle.last.tokens_per_layer[layer - 1] > handle.last.tokens_per_layer[layer]
    disable_pruning(model)

    lm = model.model.language_model
    ids = one["input_ids"][0]
    visual = ids == model.config.image_token_id
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    entering = []
    hook = lm.layers[layer].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    try:
        with torch.no_grad():
            positions, _ = model.model.get_rope_index(
                one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"], image_grid_thw=one["image_grid_thw"])
            deepstack = model.model.get_image_features(one["pixel_values"], one["image_grid_thw"]).deepstack_features
            model(**one)
    finally:
        hook.remove()
    assert len(deepstack) == 3
    text_row = torch.arange(int(keep.sum()))[None, None]
    later = [level[0][kept] for level in deepstack[layer:]]

    def run_from_layer(rows):
        layers = lm.layers
        lm.layers = torch.nn.ModuleList(list(layers)[layer:])  # HF's loop and DeepStack addition, from layer K on
        try:
            with torch.no_grad():
                out = lm(inputs_embeds=entering[0][:, keep], position_ids=torch.cat([text_row, positions[:, :, keep]]),
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


def test_flops_count_qwen3_5_linear_attention_layers_from_their_modules():
    """Qwen3.5's Gated DeltaNet layers are counted as linear attention: every ``nn.Linear`` of the layer once per
    token, the depthwise conv, the delta-rule state (3 d_k d_v per value head and token), no n^2 term; its gated
    full-attention layers add the n^2 term to their Linears (q_proj includes the output gate). KV bytes: what the
    attention layers' cache really holds."""
    from tokenprune.budget.flops import ModelShape, kv_bytes, layer_flops, prefill_flops, preset

    model, processor = tiny_qwen3("qwen3_5")
    shape = ModelShape.from_config(model.config)
    n = 10
    for i, layer in enumerate(model.model.language_model.layers):
        macs = n * sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
        if shape.is_linear(i):
            _, value_heads, d_k, d_v, _ = shape.linear_attention
            state = 3 * n * value_heads * d_k * d_v
            assert layer_flops(shape, n, layer=i) == macs + n * layer.linear_attn.conv1d.weight.numel() + state
            assert layer_flops(shape, 2 * n, layer=i) == 2 * layer_flops(shape, n, layer=i)
        else:
            assert layer_flops(shape, n, layer=i) == macs + 2 * n * n * shape.num_heads * shape.d_head
    assert [shape.is_linear(i) for i in range(4)] == [True, True, True, False]
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    with torch.no_grad():
        cache = model(**one, use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers if hasattr(layer, "get_seq_length")
               for t in (layer.keys, layer.values))
    assert held == kv_bytes(shape, one["input_ids"].shape[1], bytes_per_value=4) > 0
    moe = preset("qwen3.5-35b-a3b")
    assert sum(not moe.is_linear(i) for i in range(40)) == 10 and moe.intermediate_size == 8 * 512 + 512
    dense_stack = ModelShape(**{**moe.__dict__, "layer_types": None})  # every layer counted as full attention
    assert prefill_flops(moe, 4000) < prefill_flops(dense_stack, 4000)
    assert moe.with_layers(8).layer_types == moe.layer_types[:8]


@pytest.mark.parametrize("family", QWEN3_FAMILIES)
def test_recomputed_attention_rows_equal_the_eager_attention_weights(family):
    """The rows decoder-stage methods score with (patches/attention_rows.py) are the model's own attention: Qwen3's
    q_norm/k_norm, Qwen3.5's gated q_proj and partial rotary included. Oracle: eager attention weights."""
    from tokenprune.patches.attention_rows import attention_rows

    model, processor = _MODELS.setdefault((family, "eager"), tiny_qwen3(family, "eager"))
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


def test_hybrid_decoder_pruning_equals_the_later_layers_fed_the_kept_hidden_states(attn):
    """Oracle (Qwen3.5, FastV K=2 -> scored at full-attention layer 3, pruned from layer 4): HF's own text model made
    of layers 4.. only, fed the unpatched model's hidden states entering layer 4 at the kept tokens (their original
    M-RoPE positions), with fresh Gated DeltaNet states: the linear-attention layers after the pruning step run on the
    pruned sequence alone."""
    model, processor = _MODELS.setdefault(("qwen3_5", attn, "decoder"), _hybrid16("qwen3_5", attn))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    handle = enable_pruning(model, "fastv", keep=0.5, k=2)
    with torch.no_grad():
        logits = model(**one).logits
    kept, per_layer = handle.last.images[0].kept, handle.last.tokens_per_layer
    disable_pruning(model)
    assert per_layer[3] > per_layer[4] == per_layer[-1]  # scored at layer 3 (full attention), pruned from 4
    lm = model.model.language_model
    ids = one["input_ids"][0]
    visual = ids == model.config.image_token_id
    keep = ~visual
    keep[visual.nonzero().squeeze(1)[kept]] = True
    entering = []
    hook = lm.layers[4].register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    try:
        with torch.no_grad():
            positions, _ = model.model.get_rope_index(
                one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"], image_grid_thw=one["image_grid_thw"])
            model(**one)
    finally:
        hook.remove()
    layers, types = lm.layers, model.config.text_config.layer_types
    lm.layers = torch.nn.ModuleList(list(layers)[4:])
    lm.config.layer_types = types[4:] + types[:4]  # the truncated stack's own layer types, in order
    try:
        with torch.no_grad():
            out = lm(inputs_embeds=entering[0][:, keep], use_cache=False,
                     position_ids=torch.cat([torch.arange(int(keep.sum()))[None, None], positions[:, :, keep]]))
            expected = model.lm_head(out.last_hidden_state)
    finally:
        lm.layers, lm.config.layer_types = layers, types
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


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
