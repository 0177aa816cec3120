"""CATP (AAAI 2026) on models: multi-image in-context prompts (1, 2 and 4 examples before the query) on LLaVA-NeXT and
Qwen2.5-VL as deep as the 7B checkpoints, so that stage 2 runs at the paper's K = 6 (in-context pool removed from
layer 7, query image from layer 8), the pool against the paper's rule on eager attention, batches, follow-up turns
and clear errors; two examples on every other family that takes several images. The selectors: tests/test_catp.py."""


import pytest
import torch
from cache_turns import assert_chunk_equals_steps, words
from conftest import cached_and_uncached_record, hook_and_attribute_census

from tokenprune import disable_pruning, enable_pruning, pruning
from tokenprune import functional as F
from tokenprune.budget import kept_count
from tokenprune.methods.catp import CATP
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

pytestmark = pytest.mark.usefixtures("one_thread")

QIMG = "<|vision_start|><|image_pad|><|vision_end|>"
SIZE = {"llava_next": (40, 70), "qwen2_5_vl": (56, 84)}
GEN = dict(max_new_tokens=3, do_sample=False)
K = 6  # the paper's layer for the 7B models (LLaVA-NeXT-7B: 32 layers, Qwen2.5-VL-7B: 28)


# --- multi-image prompts at real depth ----------------------------------------------------------------------------
def _prompt(family, shots, question="what is in the image ?"):
    img = QIMG if family.startswith("qwen") else "<image>"
    examples = "".join(f"{img} a dog left of the red circle . " for _ in range(shots))
    return f"USER : {examples}{img} {question} ASSISTANT :"


def _inputs(processor, family, rows, seed=0):
    """Processor output for prompt rows ``(examples, question)``; row ``r``'s images use seeds ``seed + 10 r + i``."""
    prompts = [_prompt(family, shots, question) for shots, question in rows]
    images = [random_image(*SIZE[family], seed=seed + 10 * r + i) for r, (shots, _) in enumerate(rows)
              for i in range(shots + 1)]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


@pytest.fixture(scope="module", params=[(f, a) for f in SIZE for a in ("eager", "sdpa")], ids=lambda p: "-".join(p))
def deep(request):
    family, attn = request.param
    model, processor = real_depth(family, attn)
    return family, attn, model, processor


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_multi_image_prompt(deep, shots):
    """keep=1.0 bit-identical; keep=0.25: stage 1 per image, the in-context pool cut from layer K+1 and the query
    image from K+2 to their budgets; KV-cached generate == use_cache=False; disable_pruning leaves nothing."""
    family, _, model, processor = deep
    inputs = _inputs(processor, family, [(shots, "what is in the image ?")])
    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
    census = hook_and_attribute_census(model)
    with pruning(model, "catp", keep=1.0), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
        assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
    with pruning(model, "catp", keep=0.25):
        _, rec = cached_and_uncached_record(model, inputs, **GEN)
    assert len(rec.images) == shots + 1
    # layers 0..K see the stage-1 tokens; K+1 the in-context pool cut to its share; K+2.. the query image cut too
    # (every image has the same size here, so each enters the LLM with n1 tokens and has a share of k2)
    visual = rec.visual_per_layer
    n1 = visual[0] // (shots + 1)
    k2 = kept_count(CATP().stage_keeps(0.25)[1], n1)
    assert visual[: K + 1] == (visual[0],) * (K + 1) and k2 < n1
    assert visual[K + 1] == shots * k2 + n1 and visual[K + 2:] == ((shots + 1) * k2,) * (len(visual) - K - 2)
    query, context = rec.images[-1], rec.images[:-1]
    assert query.n_kept == k2 and sum(im.n_kept for im in context) == shots * k2
    if family.startswith("qwen"):  # every token is a stage-1 candidate: the FLOPs schedule is the run's
        assert list(visual) == CATP().schedule([im.n for im in rec.images], 0.25, len(visual))
    assert hook_and_attribute_census(model) == census
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


def test_batch_equals_rows_alone(deep):
    """Two rows with 1 and 2 in-context examples (padding) generate what each generates alone."""
    family, _, model, processor = deep
    rows = [(1, "what is in the image ?"), (2, "is there a dog ?")]
    batch = _inputs(processor, family, rows)
    alone = [_inputs(processor, family, rows[:1]), _inputs(processor, family, rows[1:], seed=10)]
    with pruning(model, "catp", keep=0.25), torch.no_grad():
        together = model.generate(**batch, **GEN)[:, -GEN["max_new_tokens"]:]
        each = [model.generate(**row, **GEN)[:, -GEN["max_new_tokens"]:] for row in alone]
    assert torch.equal(together, torch.cat(each))


@pytest.mark.parametrize("family", sorted(SIZE))
def test_in_context_pool_is_the_paper_rule_on_eager_attention(family):
    """Stage 2 at layer K chooses, over the pool of the in-context images, exactly what the rule gives on the eager
    kernel's own attention weights (layers K-1 and K, the prompt's last token) and hidden states (output of K),
    of the same run (layers up to K see the stage-1 prompt)."""
    model, processor = real_depth(family, "eager")
    shots = 2
    inputs = _inputs(processor, family, [(shots, "what is in the image ?")])
    _, decoder_keep = CATP().stage_keeps(0.25)
    seen, records = {}, []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(ids=kw.get("input_ids", a[0] if a else None)), with_kwargs=True)
    try:
        handle = enable_pruning(model, "catp", keep=0.25)
        record = handle._record
        handle._record = lambda r: (records.append(r), record(r))  # the stage-1 record, then both stages'
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
    finally:
        hook.remove()
        disable_pruning(model)
    first, second = records
    ids = seen["ids"][0]
    visual = ids == model.config.image_token_id
    number = (visual & ~torch.nn.functional.pad(visual, (1, 0))[:-1]).long().cumsum(0) - 1
    slots = [(visual & (number == m)).nonzero().squeeze(1) for m in range(shots + 1)]
    pool = torch.cat(slots[:shots])
    sample = torch.cat([slots[shots], torch.arange(int(slots[shots].max()) + 1, ids.shape[0])])
    hidden = out.hidden_states[K + 1][0]
    budget = sum(kept_count(decoder_keep, s.numel()) for s in slots[:shots])
    expected = F.catp_context(out.attentions[K][0, :, -1, pool], out.attentions[K - 1][0, :, -1, pool], hidden[pool],
                              hidden[sample].float().mean(0), budget)
    got, offset = [], 0
    for v, d in zip(first.images[:shots], second.images[:shots], strict=True):
        got.append(torch.isin(v.kept, d.kept).nonzero().squeeze(1) + offset)
        offset += v.n_kept
    assert torch.cat(got).tolist() == expected.tolist()


def test_query_image_option(deep):
    """query_image=0: the first image is the query (pruned from layer K+2 to its share); the others form the pool."""
    family, _, model, processor = deep
    inputs = _inputs(processor, family, [(2, "what is in the image ?")])
    with pruning(model, "catp", keep=0.25, query_image=0) as handle, torch.no_grad():
        model(**inputs)
    visual, images = handle.last.visual_per_layer, handle.last.images
    n1 = visual[0] // 3
    k2 = kept_count(CATP().stage_keeps(0.25)[1], n1)
    assert visual[K + 1] == n1 + 2 * k2 and images[0].n_kept == k2 and images[1].n_kept + images[2].n_kept == 2 * k2


def test_clear_errors(deep):
    family, _, model, processor = deep
    one = _inputs(processor, family, [(0, "what is in the image ?")])
    two = _inputs(processor, family, [(1, "what is in the image ?")])
    img = QIMG if family.startswith("qwen") else "<image>"
    adjacent = dict(processor(images=[random_image(*SIZE[family], seed=i) for i in range(2)],
                              text=[f"USER : {img}{img} what is in the image ? ASSISTANT :"], return_tensors="pt"))
    census = hook_and_attribute_census(model)
    cases = [
        (dict(require_context=True), one, "has 1 image; require_context=True prunes multi-image"),
        (dict(query_image=2), two, "query_image=2 but prompt row 0 has 2 image"),
        (dict(query_image=-3), two, r"pass an index in -2\.\.1"),
        ({}, adjacent, "image 0 of prompt row 0 has no paired text: found another image right after it"),
    ]
    for options, inputs, message in cases:
        with pruning(model, "catp", keep=0.25, **options), pytest.raises(ValueError, match=message), torch.no_grad():
            model.generate(**inputs, **GEN)
        assert hook_and_attribute_census(model) == census


# --- every other family that takes several images (4 LLM layers, layer=1: pool cut from 2, query from 3) ---------
def _tiny(family):
    from tokenprune.tiny_gemma3 import tiny_gemma3
    from tokenprune.tiny_internvl import tiny_internvl
    from tokenprune.tiny_models import LlavaSize, tiny_llava, tiny_qwen
    from tokenprune.tiny_onevision import tiny_onevision
    from tokenprune.tiny_qwen3 import tiny_qwen3

    builders = {
        "llava": lambda: tiny_llava(LlavaSize(text_layers=4)),
        "qwen2_vl": lambda: tiny_qwen("2", text_layers=4),
        "qwen3_vl": lambda: tiny_qwen3("qwen3_vl", text_layers=4),
        "llava_onevision": lambda: tiny_onevision(text_layers=4),
        "internvl": lambda: tiny_internvl(text_layers=4),
        "gemma3": lambda: tiny_gemma3(text_layers=4),
    }
    return builders[family]()


TOKEN = {"llava": "<image>", "qwen2_vl": QIMG, "qwen3_vl": QIMG, "llava_onevision": "<image>",
         "internvl": "<IMG_CONTEXT>", "gemma3": "<start_of_image>"}


@pytest.mark.parametrize("family", sorted(TOKEN))
def test_two_examples_on_every_family(family):
    model, processor = _tiny(family)
    img = TOKEN[family]
    text = f"USER : {img} a dog . {img} a red circle . {img} what is in the image ? ASSISTANT :"
    inputs = dict(processor(text=[text], images=[random_image(56, 84, seed=i) for i in range(3)], return_tensors="pt"))
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    census = hook_and_attribute_census(model)
    with pruning(model, "catp", keep=1.0, layer=1), torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
    with pruning(model, "catp", keep=0.25, layer=1):
        _, rec = cached_and_uncached_record(model, inputs, **GEN)
    visual = rec.visual_per_layer
    assert len(rec.images) == 3 and visual[0] == visual[1] > visual[2] > visual[3]
    decoder = CATP().stage_keeps(0.25)[1]
    entering_query = visual[2] - sum(kept_count(decoder, visual[0] // 3) for _ in range(2))  # equal-size images
    assert rec.images[-1].n_kept == kept_count(decoder, entering_query)
    assert hook_and_attribute_census(model) == census


def test_follow_up_turn_on_a_multi_image_cache(deep):
    """A second question on the cache a 2-example prompt left: fed as one chunk == fed token by token, and
    ``generate`` on the whole conversation returns the caller's ids (the images stay as they were pruned)."""
    family, _, model, processor = deep
    inputs = _inputs(processor, family, [(2, "what is in the image ?")])
    with pruning(model, "catp", keep=0.25), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True)
        question = words(processor, " and the dog ? ASSISTANT :", 1)
        tail = torch.cat([out.sequences[:, -1:], question], dim=1)
        mask = torch.ones(1, out.sequences.shape[1] + question.shape[1], dtype=torch.long)
        assert_chunk_equals_steps(model, out.past_key_values, tail, mask)
        conversation = torch.cat([out.sequences, question], dim=1)
        follow = model.generate(input_ids=conversation, attention_mask=mask, past_key_values=out.past_key_values,
                                max_new_tokens=2, do_sample=False)
    assert torch.equal(follow[:, : conversation.shape[1]], conversation)
