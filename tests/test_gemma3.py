"""Gemma 3 end to end on tiny models (eager and sdpa): every vision-stage method with a signal there; the
bidirectional image block and the sliding window of the pruned prompt against the model's own masks; pan-and-scan
crops; padded batches; an oracle; clear refusals. Decoder-stage and two-stage methods: the per-layer masks over the
kept slots (bidirectional image block, sliding window in original positions) against the model's own mask functions
and a layer-by-layer oracle, on an 8-layer model (sliding and global layers after the pruning layer) and at their
default layers on the real-depth one."""

import copy
import re

import pytest
import torch
from conftest import (
    MERGING,
    cached_model,
    decoder_methods,
    enable,
    generate_cached_and_uncached,
    hook_and_attribute_census,
    runnable_methods,
    two_stage_methods,
)
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune import disable_pruning, enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS as REGISTRY
from tokenprune.tiny_gemma3 import SLIDING_WINDOW, TOKENS_PER_IMAGE, tiny_gemma3
from tokenprune.tiny_models import random_image

IMG = "<start_of_image>"
PROMPT = f"USER : {IMG} what is in the image ? ASSISTANT :"
OTHER = f"USER : {IMG} describe a red circle and a blue square left of the dog ? ASSISTANT :"
GEN = dict(max_new_tokens=4, do_sample=False)
N = TOKENS_PER_IMAGE  # 6 x 6 pooled tokens per image (or crop)


def _runs_without_cls(name: str) -> bool:
    try:
        REGISTRY[name].signals_needed(cls_token=False)
    except ValueError:
        return False
    return True


METHODS = [m for m in runnable_methods("gemma3") if _runs_without_cls(m)]
# Every registered method that does NOT run on Gemma 3, with the reason its error names: a new decline fails here.
_NO_CLS = r"\[CLS\].*divprune"
VISION_DECLINES = {
    "fastervlm": _NO_CLS, "flowcut": _NO_CLS, "fopru": _NO_CLS, "recoverable": _NO_CLS, "visionzip": _NO_CLS,
    "holitom": "frames of a video.*divprune", "holitomouter": "frames of a video.*divprune",
}
# Decoder-stage and two-stage methods: all run (VFlowOpt's vision stage on the pooled attention map).
DECODER_RUNS = sorted(name for name in decoder_methods() + two_stage_methods() if name not in VISION_DECLINES)
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def gemma3(attn):
    """One tiny model per kernel for the module; pruning is removed after every test."""
    yield from cached_model(_MODELS, attn, lambda: tiny_gemma3(attn))


def _inputs(processor, prompts, images, crops=False):
    extra = {"do_pan_and_scan": True} if crops else {}
    return processor(text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True, **extra)


@pytest.fixture
def one(gemma3):
    return _inputs(gemma3[1], [PROMPT], [random_image(60, 80, seed=1)])


def _left_clean(model) -> bool:
    return not ({_HANDLE_ATTR, "forward", "generate"} & set(model.__dict__))


def test_every_method_is_either_run_or_declined_here():
    assert sorted(METHODS + list(VISION_DECLINES) + DECODER_RUNS) == sorted(REGISTRY)


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_and_disable_leaves_nothing(gemma3, one, method):
    model, _ = gemma3
    before = hook_and_attribute_census(model)
    with torch.no_grad():
        ref_logits, ref_ids = model(**one).logits, model.generate(**one, **GEN)
        handle = enable(model, method, 1.0)
        logits, ids = model(**one).logits, model.generate(**one, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    assert handle.last.n_kept == handle.last.n_visual == N
    disable_pruning(model)
    assert _left_clean(model) and hook_and_attribute_census(model) == before
    with torch.no_grad():
        assert torch.equal(model(**one).logits, ref_logits)


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
    alone = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images, strict=True):
            logits = model(**_inputs(processor, [prompt], [image], crops=True)).logits[0, -1]
            alone.append((logits, [im.kept for im in handle.last.images]))
        batch = _inputs(processor, prompts, images, crops=True)
        assert bool((batch["attention_mask"] == 0).any()) and batch["pixel_values"].shape[0] == 5
        logits = model(**batch).logits[:, -1]
        kept = [im.kept for im in handle.last.images]
        ids = model.generate(**batch, **GEN)
        ids_nocache = model.generate(**batch, **GEN, use_cache=False)
    assert [(im.row, im.index_in_row) for im in handle.last.images] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert [im.n_kept for im in handle.last.images] == [kept_count(0.5, N)] * 5
    assert all(torch.equal(a, b) for a, b in zip([k for _, ks in alone for k in ks], kept, strict=True))
    for row, (out, _) in enumerate(alone):
        torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert torch.equal(ids, ids_nocache)


def _gen(model, **kwargs):
    """Greedy with logits, no early end (a finished row would not be continued like a running one)."""
    return model.generate(do_sample=False, return_dict_in_generate=True, output_logits=True,
                          min_new_tokens=kwargs["max_new_tokens"], **kwargs)


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_follow_up_turn_static_cache_and_beams(gemma3, keep):
    """On a two-row batch (sliding layers, left padding): a follow-up question on the returned cache equals a fresh
    pruned run of the whole conversation; the static cache equals the dynamic one; beams and several samples return
    the prompt; keep=1.0 gives the unpruned model's beams."""
    model, processor = gemma3
    inputs = dict(_inputs(processor, [PROMPT, OTHER], [random_image(84, 140, seed=1), random_image(56, 84, seed=2)]))
    with torch.no_grad():
        unpruned_beams = model.generate(**inputs, num_beams=3, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        enable(model, "divprune", keep)
        out = _gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
        question = processor.tokenizer(" and the blue square ? ASSISTANT :", return_tensors="pt",
                                       add_special_tokens=False).input_ids.expand(2, -1)
        conversation = torch.cat([out.sequences, question], dim=1)
        new = conversation[:, inputs["input_ids"].shape[1]:]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], dim=1)
        follow = _gen(model, input_ids=conversation, attention_mask=mask,
                      past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
        types = torch.cat([inputs["token_type_ids"], torch.zeros_like(new)], dim=1)
        fresh = _gen(model, **dict(inputs, input_ids=conversation, attention_mask=mask, token_type_ids=types),
                     max_new_tokens=2)
        static = _gen(model, **inputs, cache_implementation="static", max_new_tokens=2)
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
    inputs = _inputs(processor, [PROMPT, OTHER], [random_image(84, 140, seed=1), random_image(56, 84, seed=2)])
    handle = enable_pruning(model, "divprune", flops=0.5)
    with torch.no_grad():
        model(**inputs)
        assert len({im.n_kept for im in handle.last.images}) == 2
        with pytest.raises(ValueError, match="same count per image"):
            model.generate(**inputs, num_beams=2, max_new_tokens=2)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


def _kept_prompt(model, inputs, kept):
    """The unpruned prompt holding only the kept image tokens: ``(kwargs, keep mask)``."""
    ids = inputs["input_ids"][0]
    keep = ids != model.config.image_token_id
    keep[(~keep).nonzero().squeeze(1)[kept]] = True
    return dict(input_ids=ids[keep][None], token_type_ids=inputs["token_type_ids"][:, keep]), keep


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
    kwargs, _ = _kept_prompt(model, one, kept)
    with torch.no_grad():
        fed = BaseModelOutputWithPooling(pooler_output=features[kept][None])
        expected = model(**kwargs, mm_encoder_outputs={"image": fed}).logits
        fed = BaseModelOutputWithPooling(pooler_output=features[kept][None])
        expected_ids = model.generate(**kwargs, mm_encoder_outputs={"image": fed}, **GEN)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids[:, one["input_ids"].shape[1]:], expected_ids[:, kwargs["input_ids"].shape[1]:])


def _layer_masks(model):
    """The attention mask each LLM layer receives, per call: ``{layer index: [mask, ...]}``."""
    seen: dict[int, list] = {}
    hooks = []
    for i, layer in enumerate(model.model.language_model.layers):
        def hook(module, args, kwargs, i=i):
            seen.setdefault(i, []).append(kwargs["attention_mask"])
        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, hooks


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """``[q, kv]`` bool: which keys each query may attend to (eager: additive float; sdpa: bool)."""
    return mask[0, 0] == 0 if mask.dtype.is_floating_point else mask[0, 0]


def test_pruned_mask_keeps_the_bidirectional_block_over_exactly_the_kept_tokens(gemma3):
    """Both layer kinds: the masks the pruned model uses equal those the model builds for an unpruned prompt that
    holds only the kept image tokens; the kept tokens see each other both ways; the window spans 16 tokens."""
    model, processor = gemma3
    inputs = _inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
    handle = enable(model, "divprune", 12)
    seen, hooks = _layer_masks(model)
    try:
        with torch.no_grad():
            model(**inputs)
            kept = handle.last.images[0].kept
            disable_pruning(model)
            kwargs, keep = _kept_prompt(model, inputs, kept)
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
        allowed = _allowed(pruned)
        assert torch.equal(allowed, _allowed(reference))
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
    assert _left_clean(model) and hook_and_attribute_census(model) == before


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
    assert _left_clean(model) and hook_and_attribute_census(model) == before


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
    model, processor = _MODELS.setdefault("sdpa", tiny_gemma3("sdpa"))
    shape = ModelShape.from_config(model.config)
    assert (shape.num_layers, shape.d_head, shape.num_kv_heads) == (2, 32, 2)
    one = _inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])
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
    one = _inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])
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

    model, processor = _MODELS.setdefault("sdpa", tiny_gemma3("sdpa"))
    image = grey(160, 96)
    record = prune_once(model, processor, image, PROMPT, method, keep=9)
    rec = record.images[0]
    assert rec.grid == (6, 6) and rec.view == "image" and rec.n_kept == 9
    figure = draw_kept(image, record, size=320, legend=False)  # one 320x192 panel
    assert figure.size == (320, HEADER + 192)
    assert_looks(figure, rec, lambda i: (0, None), {0: (0, 0, 320, 192)})
    assert _left_clean(model)


@pytest.mark.parametrize("layer_index", [0, 1])  # a sliding-window layer and a global one
def test_recomputed_attention_rows_are_the_models_own(layer_index):
    """The decoder-stage row recomputation (patches/attention_rows.py) uses the layer's own modules: Gemma 3's
    (1 + w) RMSNorms, per-head q_norm / k_norm, query_pre_attn_scalar scaling; checked against eager attention
    weights on a prompt shorter than the window."""
    from tokenprune.patches.attention_rows import attention_rows

    model, _ = _MODELS.setdefault("eager", tiny_gemma3("eager"))
    layer = model.model.language_model.layers[layer_index]
    seen = {}

    def hook(module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], rope=kwargs["position_embeddings"])

    ids = torch.arange(20, 20 + SLIDING_WINDOW - 2)[None]
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            weights = model(input_ids=ids, output_attentions=True).attentions[layer_index]  # [1, H, N, N]
    finally:
        handle.remove()
    n = ids.shape[1]
    rows = torch.tensor([[n - 1, n // 2]])
    cos, sin = seen["rope"]
    got = attention_rows(layer, seen["hidden"], rows, cos, sin, torch.ones(1, n, dtype=torch.bool))
    torch.testing.assert_close(got[0], weights[0][:, rows[0]].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [256, 80])  # query patches a chunk: 16 or 5 pooled tokens (the last chunk ragged)
def test_pooled_attention_map_is_the_eager_siglip_map_pooled_by_hand(chunk, monkeypatch):
    """VFlowOpt's map on Gemma 3: P A P^T of the last SigLIP layer's head-mean attention (eager weights), each pooled
    token's row the mean over its 4 x 4 query patches of the sum over each token's 4 x 4 key patches."""
    from tokenprune.methods import ATTENTION_MAP
    from tokenprune.methods.vflowopt import VFlowOptViT
    from tokenprune.patches import clip_signals
    from tokenprune.patches.gemma3 import Gemma3Adapter

    monkeypatch.setattr(clip_signals, "_MAP_ROWS", chunk)
    model, processor = _MODELS.setdefault("eager", tiny_gemma3("eager"))
    images = [random_image(60, 80, seed=1), random_image(80, 60, seed=2)]
    pixels = _inputs(processor, [PROMPT, PROMPT], images)["pixel_values"]
    with torch.no_grad():
        weights = model.model.vision_tower(pixel_values=pixels, output_attentions=True).attentions[-1]  # [B, H, P, P]
        _, signals = Gemma3Adapter(model, VFlowOptViT(), 1.0, None)._encode(pixels)
    side, kernel = 24, 4  # 24 x 24 patches -> 6 x 6 tokens
    tokens = side // kernel
    for b, image in enumerate(signals):
        a = weights[b].float().mean(dim=0).reshape([tokens, kernel] * 4)  # query (row, i, col, j), key (row, i, ...)
        expected = a.sum(dim=(5, 7)).mean(dim=(1, 3)).reshape(tokens * tokens, tokens * tokens)
        torch.testing.assert_close(image[ATTENTION_MAP], expected)
        torch.testing.assert_close(image[ATTENTION_MAP].sum(dim=-1), torch.ones(tokens * tokens))
    assert not torch.equal(signals[0][ATTENTION_MAP], signals[1][ATTENTION_MAP])


def test_recycled_tokens_are_projected_as_the_projector_projects_a_pooled_token():
    """VFlowOpt recycles cells in the vision space (the last layer's post-layernorm output, pooled: what the
    projector averages); the adapter's projection of a pooled grid token is the model's own feature for it."""
    from tokenprune.methods import VISION_HIDDEN
    from tokenprune.methods.vflowopt import VFlowOptViT
    from tokenprune.patches.gemma3 import Gemma3Adapter

    model, processor = _MODELS.setdefault("sdpa", tiny_gemma3("sdpa"))
    pixels = _inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])["pixel_values"]
    adapter = Gemma3Adapter(model, VFlowOptViT(), 1.0, None)
    with torch.no_grad():
        features, signals = adapter._encode(pixels)
    projected = adapter._project(signals[0][VISION_HIDDEN], like=features[0])
    torch.testing.assert_close(projected, features[0], rtol=1e-5, atol=1e-5)


# --- decoder stage ---------------------------------------------------------------------------------------------
SHALLOW = 8  # LLM layers: sliding 0-4, global 5, sliding 6-7 (every method's layers set to fit, below)
SHALLOW_OPTIONS = {
    "adaptinfer": {"layers": (1, 4, 6)}, "feather": {"layers": (3, 6)}, "pdrop": {"layers": (2, 4, 6)},
    "sparsevlm": {"layers": (1, 4, 6)}, "todre": {"layer": 5}, "transprune": {"layers": (3, 5, 7)},
    "catp": {"layer": 4}, "vflowopt": {"layers": (2, 6)},
}


def _shallow(attn):
    key = (attn, SHALLOW)
    if key not in _MODELS:
        _MODELS[key] = tiny_gemma3(attn, text_layers=SHALLOW)
    return _MODELS[key]


@pytest.fixture
def shallow(attn):
    model, processor = _shallow(attn)
    yield model, processor
    if _HANDLE_ATTR in model.__dict__:
        disable_pruning(model)


def _decoder(model, method, keep):
    return enable_pruning(model, method, keep=keep, **SHALLOW_OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", DECODER_RUNS)
def test_decoder_stage_keep_all_is_bit_identical_and_disable_leaves_nothing(shallow, method):
    model, processor = shallow
    inputs = _inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
    before = hook_and_attribute_census(model)
    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        _decoder(model, method, 1.0)
        logits, ids = model(**inputs).logits, model.generate(**inputs, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    disable_pruning(model)
    assert _left_clean(model) and hook_and_attribute_census(model) == before


@pytest.mark.parametrize("method", DECODER_RUNS)
def test_decoder_stage_cached_equals_uncached_and_padded_batch_equals_rows(shallow, method):
    """keep=0.25, two left-padded rows longer than the 16-token window: generate with the KV cache == without it
    and returns the prompt; each row's last logits and kept tokens in the batch == the row alone."""
    model, processor = shallow
    prompts, images = [PROMPT, OTHER], [random_image(60, 80, seed=1), random_image(64, 64, seed=2)]
    handle = _decoder(model, method, 0.25)
    alone = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images, strict=True):
            logits = model(**_inputs(processor, [prompt], [image])).logits[0, -1]
            alone.append((logits, handle.last.images[0].kept))
        batch = _inputs(processor, prompts, images)
        assert bool((batch["attention_mask"] == 0).any())
        logits = model(**batch).logits[:, -1]
        kept = [im.kept for im in handle.last.images]
        assert handle.last.n_kept < 2 * N
        cached = model.generate(**batch, **GEN)
        uncached = model.generate(**batch, **GEN, use_cache=False)
    assert all(torch.equal(a, k) for (_, a), k in zip(alone, kept, strict=True))
    for row, (out, _) in enumerate(alone):
        torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    assert torch.equal(cached[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert torch.equal(cached, uncached)


def _kept_slots(model, inputs, handle) -> torch.Tensor:
    """Prompt indices of the tokens a one-row decoder-stage prefill kept (text and kept image tokens)."""
    _, keep = _kept_prompt(model, inputs, handle.last.images[0].kept)
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
    inputs = _inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
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
    inputs = _inputs(processor, [OTHER], [random_image(60, 80, seed=3)])
    handle = _decoder(model, "fastv", 20)  # 20 image tokens: wider than the window
    seen, hooks = _layer_masks(model)
    try:
        with torch.no_grad():
            model(**inputs)
            slots = _kept_slots(model, inputs, handle)
            disable_pruning(model)
            kwargs, keep = _kept_prompt(model, inputs, handle.last.images[0].kept)
            model(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    types = model.config.text_config.layer_types
    image = (kwargs["token_type_ids"][0] == 1).nonzero().squeeze(1)
    q, kv = torch.meshgrid(slots, slots, indexing="ij")
    in_window = kv > q - SLIDING_WINDOW  # original positions
    full_reference = _allowed(seen[5][1])
    assert bool(full_reference[image][:, image].all()) and image.numel() == 20
    differs = 0
    for i in range(2, SHALLOW):
        pruned, reference = _allowed(seen[i][0]), _allowed(seen[i][1])
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
    inputs = _inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])
    for method in DECODER_RUNS:
        handle = enable_pruning(model, method, keep=0.25)
        try:
            with torch.no_grad():
                cached = model.generate(**inputs, max_new_tokens=2, do_sample=False)
                uncached = model.generate(**inputs, max_new_tokens=2, do_sample=False, use_cache=False)
        finally:
            disable_pruning(model)
        assert handle.last.n_kept < N, method
        assert torch.equal(cached, uncached), method
    assert _left_clean(model)


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
