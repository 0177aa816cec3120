"""Every method x family x attention kernel on towers and LLMs as deep as the real 7B checkpoints.

``tokenprune.real_depth.real_depth`` builds each family with the real depths (CLIP-L 24 / LLM 32 for LLaVA-1.5 and
LLaVA-NeXT, Qwen ViT 32 / LLM 28 for Qwen2-VL and Qwen2.5-VL) at tiny width, so every method runs with its DEFAULT
options and layers (no ``TINY_OPTIONS``), the path a real checkpoint takes. One model per (family, kernel), built
once per module; each case enables, checks and disables. See docs/testing.md.
"""

from dataclasses import dataclass

import pytest
import torch
from conftest import hook_and_attribute_census

from tokenprune import disable_pruning, enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.methods import METHODS, PruningMethod, Selection
from tokenprune.patches.units import Unit, select_image
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

pytestmark = pytest.mark.realdepth

COMPOSITION = "divprune+fastv"
CASES = sorted(METHODS) + [COMPOSITION]
GEN = dict(max_new_tokens=3, do_sample=False)
LLAVA_PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
QWEN_PROMPT = "USER : <|vision_start|><|image_pad|><|vision_end|>\nwhat is in the image ? ASSISTANT :"
# One image per family: LLaVA 64 tokens (8 x 8); LLaVA-NeXT 52 (base tile + 2 crops + newlines); Qwen 3 x 5 merged
# tokens, wider than a Qwen2.5 window (so window order differs from raster order).
IMAGE = {"llava": (64, 64), "llava_next": (40, 70), "qwen2_vl": (84, 140), "qwen2_5_vl": (84, 140)}

# What each family declines, and the missing signal the error must name. Explicit on purpose: a method that starts
# or stops declining a family fails here until this table (and docs/testing.md) says so.
_NO_CLS = {m: "[CLS]" for m in ("fastervlm", "fopru", "recoverable", "visionzip")}
_VIDEO = {m: "video" for m in ("holitom", "holitomouter")}  # merge the frames of a video: no videos on LLaVA/NeXT
DECLINES = {
    "llava": {**_VIDEO},
    "llava_next": {"flowcut": "layer loop", **_VIDEO},
    "qwen2_vl": {**_NO_CLS, "flowcut": "[CLS]", "vflowopt": "attention_map"},
    "qwen2_5_vl": {**_NO_CLS, "flowcut": "[CLS]", "vflowopt": "attention_map"},
}


# Declined at the CALL (the family takes videos, this prompt has an image): what the error must name.
CALL_DECLINES = {"holitom": "video", "holitomouter": "video"}


def _method(case):
    return case.split("+") if "+" in case else case


class Probe:
    """Position ids the language model receives and the rotary cos the last decoder layer receives, per call.

    Registered AFTER ``enable_pruning`` so that it sees what the decoder loop's own hooks hand on."""

    def __init__(self, model):
        lm = model.model.language_model
        self.positions, self.cos = [], []
        self.hooks = [
            lm.register_forward_pre_hook(lambda m, a, kw: self.positions.append(kw.get("position_ids")),
                                         with_kwargs=True),
            lm.layers[-1].register_forward_pre_hook(
                lambda m, a, kw: self.cos.append(kw["position_embeddings"][0][..., -1:, :].clone()), with_kwargs=True),
        ]

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def _cache_lengths(cache):
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def _run(model, inputs):
    """``(logits, per-layer cache lengths, LM position ids, generated ids, last-layer cos at the first decode step,
    no-cache generated ids)``."""
    probe = Probe(model)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            prefill_positions = probe.positions[0]
            probe.cos.clear()
            ids = model.generate(**inputs, **GEN)
            decode_cos = probe.cos[1]
            uncached = model.generate(**inputs, **GEN, use_cache=False)
    finally:
        probe.remove()
    return out.logits, _cache_lengths(out.past_key_values), prefill_positions, ids, decode_cos, uncached


@pytest.fixture(scope="module", params=[(f, a) for f in DECLINES for a in ("eager", "sdpa")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def deep(request):
    family, attn = request.param
    # One thread: at width 64/128 a second one only adds synchronisation (x10-50 slower on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = real_depth(family, attn)
        prompt = QWEN_PROMPT if family.startswith("qwen") else LLAVA_PROMPT
        inputs = processor(images=[random_image(*IMAGE[family], seed=1)], text=[prompt], return_tensors="pt")
        ref = _run(model, inputs)
        census = hook_and_attribute_census(model)
        yield family, model, inputs, ref, census
    finally:
        torch.set_num_threads(threads)


def _is_subsequence(columns, reference):
    """Every column of ``columns`` [3, L'] is a column of ``reference`` [3, L], in the same order."""
    j = 0
    for col in columns.T:
        while j < reference.shape[1] and not torch.equal(reference[:, j], col):
            j += 1
        if j == reference.shape[1]:
            return False
        j += 1
    return True


def _check_positions(family, model, handle, inputs, ref, lengths, positions, decode_cos):
    ref_positions, ref_cos = ref[2], ref[4]
    if family.startswith("qwen"):
        # M-RoPE: the kept tokens enter the LLM at their ORIGINAL (t, h, w) positions, text included, and decoding
        # continues where the unpruned prompt ends.
        assert positions.shape[-1] == lengths[0]
        first_image = int((inputs["mm_token_type_ids"][0] != 0).nonzero().min())
        assert _is_subsequence(positions[-3:, 0], ref_positions[-3:, 0])
        assert torch.equal(positions[-3:, 0, :first_image], ref_positions[-3:, 0, :first_image])
        assert torch.equal(positions[-3:, 0, -1], ref_positions[-3:, 0, -1])  # the last prompt token: same place
        torch.testing.assert_close(decode_cos, ref_cos, rtol=0, atol=0)
        return
    # LLaVA: the vision stage re-indexes (the pruned prompt at 0..L'-1, as the official codes run it); decoder
    # stages keep positions or, for "reindex" methods (PDrop's family), shift later layers by the tokens removed.
    assert positions is None or torch.equal(positions[0], torch.arange(lengths[0]))
    loop = handle._adapter.decoder
    rec = handle.last
    expected = rec.tokens_per_layer[-1] if loop is not None and loop.reindex else rec.tokens_per_layer[0]
    lm = model.model.language_model
    cos, _ = lm.rotary_emb(decode_cos, torch.tensor([[expected]]))
    torch.testing.assert_close(decode_cos, cos[..., -1:, :], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_method_at_real_depth(deep, case):
    family, model, inputs, ref, census = deep
    ref_logits, ref_lengths, _, ref_ids, _, _ = ref
    prompt = inputs["input_ids"]
    decline = DECLINES[family].get(case)
    if decline is not None:
        with pytest.raises(ValueError) as err:
            enable_pruning(model, _method(case), keep=0.25)
        message = str(err.value)
        assert case in message and family in message and decline in message, message
        assert hook_and_attribute_census(model) == census
        return
    if case in CALL_DECLINES:
        enable_pruning(model, _method(case), keep=0.25)
        try:
            with pytest.raises(ValueError) as err, torch.no_grad():
                model(**inputs)
            message = str(err.value)
            assert case in message and CALL_DECLINES[case] in message and "divprune" in message, message
        finally:
            disable_pruning(model)
        assert hook_and_attribute_census(model) == census
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref_logits)
        return
    try:
        enable_pruning(model, _method(case), keep=1.0)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref_logits)
            assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
        disable_pruning(model)
        handle = enable_pruning(model, _method(case), keep=0.25)
        logits, lengths, positions, ids, decode_cos, uncached = _run(model, inputs)
        rec = handle.last
        assert torch.equal(ids[:, : prompt.shape[1]], prompt)  # generate returns the ORIGINAL prompt ids
        assert torch.equal(ids, uncached)  # KV-cached == no-cache recompute of the same pruned sequence
        assert rec.tokens_per_layer is not None and lengths == list(rec.tokens_per_layer)  # per layer
        assert all(n <= r for n, r in zip(lengths, ref_lengths, strict=True)) and lengths[-1] < ref_lengths[-1]
        assert logits.shape[1] == lengths[-1]  # the logits cover what reaches the last layer
        _check_positions(family, model, handle, inputs, ref, lengths, positions, decode_cos)
    finally:
        disable_pruning(model)
    assert _HANDLE_ATTR not in model.__dict__ and "forward" not in model.__dict__
    assert hook_and_attribute_census(model) == census
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


def test_recoverable_merges_on_llava_next_at_real_depth():
    """Issue #23: with merged rows (data-dependent: LOF finds cluster centres among the rest, here on a 64x64 and a
    20x90 image of the 24-layer tower) Recoverable's selection has no ``assign`` (its clusters overlap); the
    LLaVA-NeXT adapter crashed on it (``torch.as_tensor(None)``). Batch of two images of different sizes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = real_depth("llava_next", "sdpa")
        images = [random_image(64, 64, seed=1), random_image(20, 90, seed=2)]
        inputs = processor(images=images, text=[LLAVA_PROMPT, LLAVA_PROMPT.replace("what", "describe")],
                           return_tensors="pt", padding=True)
        for keep in (0.25, 4):
            handle = enable_pruning(model, "recoverable", keep=keep)
            with torch.no_grad():
                logits = model(**inputs).logits
                ids = model.generate(**inputs, **GEN)
                uncached = model.generate(**inputs, **GEN, use_cache=False)
            images_rec = handle.last.images
            assert all(image.n_merged > 0 for image in images_rec)  # the path that crashed
            assert all(image.merged is None for image in images_rec)  # no one-cluster-per-token map to report
            assert logits.shape[1] == handle.last.seq_len_after < inputs["input_ids"].shape[1]
            assert torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
            assert torch.equal(ids, uncached)
            disable_pruning(model)
    finally:
        torch.set_num_threads(threads)


def test_merged_tokens_without_an_assignment_need_a_span_placement():
    """``Selection.assign`` is optional: the LLaVA span placement records None; the slot placement (Qwen: merged
    tokens take their first member's position) cannot place such tokens and says so."""
    @dataclass
    class Overlapping(PruningMethod):
        name = "overlapping"
        paper = "test"

        def select(self, ctx):
            return Selection(torch.tensor([0, 2]), torch.ones(1, 4))

    features = torch.randn(5, 4)
    args = (Overlapping(), features, [Unit(torch.arange(5))], [2], [{}])
    span = select_image(*args, image_index=0, row=0, index_in_row=0, placement="span")
    assert span.assign is None and span.n_merged == 1 and span.kept.tolist() == [0, 2]
    assert torch.equal(span.features, torch.cat([features[[0, 2]], torch.ones(1, 4)]))
    with pytest.raises(ValueError, match="'overlapping' adds merged tokens without saying which tokens"):
        select_image(*args, image_index=0, row=0, index_in_row=0, placement="slots")
