"""Decoder-stage methods end to end on the four families x eager/sdpa (tiny models with 4 LLM layers)."""

import functools

import pytest
import torch
from conftest import decoder_methods, generate_cached_and_uncached_logits, two_stage_methods

from tokenprune import disable_pruning, enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava, tiny_llava_next, tiny_qwen

LAYERS = 4
GEN = dict(max_new_tokens=4, do_sample=False)
# 4 layers: FastV prunes at layer 2 (official K=2); PDrop at (1, 2, 3) = its four equal stages (the paper's rule,
# relative to the depth). Methods whose official layers are absolute (FEATHER 8/16, TransPrune 7/9/12, SparseVLM
# 2/6/15, AdaptInfer 1/10/20, VFlowOpt 9/18) refuse a 4-layer LLM: their layers are passed here (the real-depth
# matrix, tests/test_matrix_real_depth.py, runs them at their defaults).
OPTIONS = {"fastv": {"k": 2}, "pdrop": {}, "dart": {"k": 2}, "feather": {"layers": (1, 2)},
           "transprune": {"layers": (1, 2, 3)}, "sparsevlm": {"layers": (0, 1, 2)},
           "adaptinfer": {"layers": (0, 1, 2)}, "vflowopt": {"layers": (1, 3)},
           "todre": {"layer": 1, "tau": 1.0}}  # ToDRE: candidate layer 1 of 4; tau=1 always drops (alpha < 1)
# VisionDrop's LLM stages: its four equal stages (paper), (1, 2, 3) of 4
FIRST_PRUNED = {"fastv": 2, "pdrop": 1, "dart": 2, "feather": 1, "todre": 2, "transprune": 1, "sparsevlm": 1,
                "adaptinfer": 1, "visiondropllm": 1, "visiondropfull": 1, "vflowopt": 1, "corematching": 2}
OPTIONS["catp"] = {"layer": 1}  # CATP: in-context pool scored at layers 0 and 1, cut from 2; the query from 3
FIRST_PRUNED["catp"] = 3  # single-image prompts here: 0-shot, no in-context pool; the query image is cut from 3
METHODS = decoder_methods() + two_stage_methods()  # two-stage methods: a vision stage, then the same decoder loop
# VFlowOpt needs the ViT attention map among image tokens, which the Qwen adapters do not compute (it raises a clear
# error there: tests/test_decoder_recycle.py)
UNSUPPORTED = {("vflowopt", "qwen2"), ("vflowopt", "qwen2.5")}
FAMILIES = ["llava", "llava_next", "qwen2", "qwen2.5"]
CASES = [(f, m) for m in METHODS for f in FAMILIES if (m, f) not in UNSUPPORTED]
QIMG = "<|vision_start|><|image_pad|><|vision_end|>"


@functools.cache
def _model(family, attn):
    if family == "llava":
        return tiny_llava(LlavaSize(text_layers=LAYERS), attn_implementation=attn)
    if family == "llava_next":
        return tiny_llava_next(attn, text_layers=LAYERS)
    return tiny_qwen(family.removeprefix("qwen"), attn, text_layers=LAYERS)


def _inputs(family, processor, rows=(0,)):
    if family.startswith("qwen"):
        prompts = [f"USER : {QIMG}what is in the image ? ASSISTANT :",
                   f"USER : {QIMG}\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"]
        images = [random_image(84, 140, seed=1), random_image(56, 56, seed=2)]
        return processor(text=[prompts[r] for r in rows], images=[images[r] for r in rows])
    prompts = ["USER : <image>\nwhat is in the image ? ASSISTANT :",
               "USER : <image>\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"]
    images = [random_image(40, 70, seed=1), random_image(64, 48, seed=2)]
    return processor(images=[images[r] for r in rows], text=[prompts[r] for r in rows], return_tensors="pt",
                     padding=True)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def model(family, attn):
    model, processor = _model(family, attn)
    disable_pruning(model)
    yield model, processor
    disable_pruning(model)


def enable(model, method, keep, **kwargs):
    return enable_pruning(model, method, keep=keep, **OPTIONS.get(method, {}), **kwargs)


@pytest.mark.parametrize("family,method", CASES)
def test_cached_generate_equals_recompute_and_kv_is_shorter_after_the_pruning_layer(model, family, method):
    model, processor = model
    inputs = _inputs(family, processor)
    handle = enable(model, method, 0.5)
    with torch.no_grad():
        out = model(**inputs)
    generate_cached_and_uncached_logits(model, inputs, **GEN)
    prompt = inputs["input_ids"]
    record = handle.last
    lengths = [layer.keys.shape[2] for layer in out.past_key_values.layers]
    first = FIRST_PRUNED[method]
    two_stage = method in two_stage_methods()
    full = lengths[0] if two_stage else prompt.shape[1]  # two-stage: the vision-pruned prompt enters the LLM
    assert lengths[:first] == [full] * first  # full prompt before the pruning layer
    assert all(n < full for n in lengths[first:])  # shorter after it
    assert list(record.tokens_per_layer) == lengths  # B=1, no padding: the record is the KV length per layer
    n_visual = record.visual_per_layer[0] if two_stage else record.n_visual
    assert n_visual <= record.n_visual and (not two_stage or full < prompt.shape[1])
    assert record.visual_per_layer[0] == n_visual and record.visual_per_layer[first] < n_visual
    assert record.visual_per_layer[-1] == record.n_kept and out.logits.shape[1] == lengths[-1]
    if method == "fastv":
        assert record.n_kept == sum(round(0.5 * im.n + 1e-9) for im in record.images)


@pytest.mark.parametrize("family,method", CASES)
def test_keep_all_is_bit_identical_and_disable_restores(model, family, method):
    model, processor = model
    inputs = _inputs(family, processor)
    hooks = _hook_count(model)
    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        handle = enable(model, method, 1.0)
        assert _hook_count(model) > hooks
        logits, ids = model(**inputs).logits, model.generate(**inputs, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    assert handle.last.n_kept == handle.last.n_visual and len(set(handle.last.tokens_per_layer)) == 1
    disable_pruning(model)
    assert _hook_count(model) == hooks
    assert _HANDLE_ATTR not in model.__dict__ and "forward" not in model.__dict__ and "generate" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


@pytest.mark.parametrize("family,method", CASES)
def test_batch_with_padding_equals_rows_alone(model, family, method):
    model, processor = model
    handle = enable(model, method, 0.4)
    alone = []
    with torch.no_grad():
        for r in (0, 1):
            single = _inputs(family, processor, rows=(r,))
            alone.append((model(**single).logits[0, -1], [im.kept for im in handle.last.images],
                          model.generate(**single, **GEN)[0, -GEN["max_new_tokens"]:]))
        batch = _inputs(family, processor, rows=(0, 1))
        assert bool((batch["attention_mask"] == 0).any())
        logits = model(**batch).logits[:, -1]
        kept = [im.kept for im in handle.last.images]
        ids = model.generate(**batch, **GEN)
        ids_nocache = model.generate(**batch, **GEN, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip([k for _, ks, _ in alone for k in ks], kept, strict=True))
    for r, (row_logits, _, row_ids) in enumerate(alone):
        torch.testing.assert_close(logits[r], row_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(ids[r, -GEN["max_new_tokens"]:], row_ids)
    assert torch.equal(ids, ids_nocache)


@pytest.mark.parametrize("family,method", CASES)
def test_same_selection_under_eager_and_sdpa_and_no_attention_weights(family, method):
    """Rows are recomputed, never read from the kernel: same kept indices under both kernels; no attention
    module is asked for weights (``output_attentions``) and none returns any under sdpa."""
    kept = {}
    for attn in ("eager", "sdpa"):
        model, processor = _model(family, attn)
        disable_pruning(model)
        inputs = _inputs(family, processor, rows=(0, 1))
        handle = enable(model, method, 0.3)
        calls = []
        handles = _weight_probes(model, calls, check_outputs=attn == "sdpa")
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in handles:
                h.remove()
            disable_pruning(model)
        assert calls and not any(calls)
        assert model.config.text_config._attn_implementation == attn
        kept[attn] = [im.kept.tolist() for im in handle.last.images]
    assert kept["eager"] == kept["sdpa"]


def test_manual_decode_loop_matches_generate(attn):
    """A forward prefill then manual cached steps with a growing mask (left padding): same ids as generate."""
    model, processor = _model("llava", attn)
    disable_pruning(model)
    inputs = _inputs("llava", processor, rows=(0, 1))
    enable(model, "pdrop", 0.4)  # REINDEX: decode positions must be shifted per stage
    with torch.no_grad():
        expected = model.generate(**inputs, **GEN, use_cache=False, output_logits=True, return_dict_in_generate=True)
        positions = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # padding-aware, as generate
        out = model(**inputs, position_ids=positions)
        mask, cache, ids, logits = inputs["attention_mask"], out.past_key_values, [], []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(GEN["max_new_tokens"]):
            ids.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=mask, past_key_values=cache,
                         position_ids=(mask.long().cumsum(-1) - 1)[:, -1:])
            cache, token = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
            logits.append(step.logits[:, -1])
    disable_pruning(model)
    assert torch.equal(torch.cat(ids, dim=1), expected.sequences[:, inputs["input_ids"].shape[1]:])
    for mine, theirs in zip(logits, expected.logits[1:], strict=False):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def _weight_probes(model, calls, check_outputs):
    """Hooks on every LLM attention module: was it asked for weights? (and, under sdpa, did it return any?)"""

    def asked(module, args, kwargs):
        calls.append(bool(kwargs.get("output_attentions")))

    def returned(module, args, output):
        if check_outputs:
            calls.append(output[1] is not None)

    handles = []
    for layer in model.model.language_model.layers:
        handles.append(layer.self_attn.register_forward_pre_hook(asked, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(returned))
    return handles


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
