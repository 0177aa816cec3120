"""CATP (AAAI 2026): the worked examples, the selectors' properties, the paired-text rule, and multi-image in-context
prompts (1, 2 and 4 examples before the query) on LLaVA-NeXT and Qwen2.5-VL as deep as the 7B checkpoints, so that
stage 2 runs at the paper's K = 6 (in-context pool removed from layer 7, query image from layer 8)."""

import copy
import math

import pytest
import torch
from conftest import hook_and_attribute_census
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune import disable_pruning, enable_pruning
from tokenprune import functional as F
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS
from tokenprune.methods.catp import CATP
from tokenprune.patches.paired_text import paired_text_embeddings
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

pytestmark = pytest.mark.usefixtures("one_thread")

QIMG = "<|vision_start|><|image_pad|><|vision_end|>"
SIZE = {"llava_next": (40, 70), "qwen2_5_vl": (56, 84)}
GEN = dict(max_new_tokens=3, do_sample=False)
K = 6  # the paper's layer for the 7B models (LLaVA-NeXT-7B: 32 layers, Qwen2.5-VL-7B: 28)


# --- worked examples ----------------------------------------------------------------------------------------------
def test_stage1_worked_example():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [0.6, -0.8]])
    text = torch.tensor([[0.6, 0.8]])
    assert F.catp_submodular(x, text, 3).tolist() == [0, 1, 2]
    # the first greedy round is the alignment-weighted facility gain of the example: token 1 (4.386) wins
    assert F.catp_submodular(x, text, 1).tolist() == [1]
    assert F.catp_submodular(x, text, 2).tolist() == [1, 2]


def _unit_rows(cosines):
    return torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines])


def test_stage2_worked_example():
    a_k = torch.tensor([0.10, 0.02, 0.05, 0.08, 0.01, 0.03])
    a_prev = torch.tensor([0.04, 0.03, 0.01, 0.08, 0.00, 0.05])
    hidden, query = _unit_rows([0.2, 0.9, 0.1, 0.35, 0.5, 0.0]), torch.tensor([1.0, 0.0])
    scores = F.catp_context_scores(a_k, a_prev, hidden, query)
    assert torch.allclose(scores, torch.tensor([0.18, 0.54, 0.10, 0.21, 0.31, 0.0]), atol=1e-6)
    assert F.catp_context(a_k, a_prev, hidden, query, 3).tolist() == [1, 3, 4]
    # heads are averaged: two heads whose mean is the example's row give the same choice
    two = torch.stack([a_k * 2, torch.zeros(6)])
    assert F.catp_context(two, torch.stack([a_prev, a_prev]), hidden, query, 3).tolist() == [1, 3, 4]


def test_query_stage_keeps_the_tokens_closest_to_the_context():
    hidden = _unit_rows([0.1, 0.9, -0.5, 0.7])
    assert F.catp_query(hidden, torch.tensor([2.0, 0.0]), 2).tolist() == [1, 3]


# --- properties ---------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(kept, n, k):
    assert kept.dtype == torch.long and kept.ndim == 1
    assert bool((kept[1:] > kept[:-1]).all())
    assert kept.numel() == min(k, n)
    if kept.numel():
        assert 0 <= int(kept.min()) and int(kept.max()) < n
    if k >= n:
        assert kept.tolist() == list(range(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), d=st.integers(1, 6), k=st.integers(1, 30), seed=st.integers(0, 1000),
       kind=st.sampled_from(["random", "equal", "zero"]), dtype=st.sampled_from(DTYPES))
def test_selectors_contract(n, d, k, seed, kind, dtype):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        feats, attn = torch.randn(n, d, generator=g), torch.rand(2, n, generator=g)
    elif kind == "equal":  # every decision is a tie: the lowest indices win
        feats, attn = torch.ones(n, d), torch.full((2, n), 1.0 / n)
    else:  # zero vectors: cosine 0 to everything
        feats, attn = torch.zeros(n, d), torch.zeros(2, n)
    feats, attn = feats.to(dtype), attn.to(dtype)
    text = torch.randn(3, d, generator=g).to(dtype)
    for kept in (F.catp_submodular(feats, text, k), F.catp_context(attn, attn.flip(1), feats, text[0], k),
                 F.catp_query(feats, text[0], k)):
        _check(kept, n, k)
        if kind != "random" and k < n:
            assert kept.tolist() == list(range(k))
    assert torch.equal(F.catp_submodular(feats, text, k), F.catp_submodular(feats.float(), text.float(), k))


def test_degenerate_inputs():
    empty = torch.zeros(0, 4)
    assert F.catp_submodular(empty, torch.ones(1, 4), 3).numel() == 0
    assert F.catp_context(torch.zeros(0), torch.zeros(0), empty, torch.ones(4), 2).numel() == 0
    assert F.catp_query(empty, torch.ones(4), 2).numel() == 0
    with pytest.raises(ValueError, match="paired text"):
        F.catp_submodular(torch.ones(3, 4), torch.zeros(0, 4), 2)
    with pytest.raises(ValueError, match="same tokens"):
        F.catp_context(torch.rand(3), torch.rand(4), torch.rand(3, 2), torch.ones(2), 1)
    with pytest.raises(ValueError, match="k must be"):
        F.catp_query(torch.rand(3, 2), torch.ones(2), 0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(2, 16), k=st.integers(1, 12), seed=st.integers(0, 1000),
       duplicates=st.booleans())
def test_stage1_is_the_greedy_maximiser_of_its_objective(n, d, k, seed, duplicates):
    """Every greedy step adds the token of largest marginal gain of F(Y) = facility location + lambda1 alignment,
    recomputed from scratch (the selector updates the gains incrementally); duplicated tokens tie."""
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(n, d, generator=g), torch.randn(4, d, generator=g)
    if duplicates:
        x[n // 2:] = x[: n - n // 2].clone()
    unit = x / x.norm(dim=1, keepdim=True)
    sim = (unit @ unit.T + 1) / 2
    v = text.mean(0)
    align = (unit @ (v / v.norm()) + 1) / 2

    def objective(chosen):
        return (sim[chosen].max(0).values.sum() + 0.7 * align[chosen].sum()) if chosen else torch.tensor(0.0)

    chosen = []
    for _ in range(min(k, n)):
        gains = [float(objective(chosen + [i]) - objective(chosen)) if i not in chosen else -1e9 for i in range(n)]
        best = max(gains)
        chosen.append(next(i for i in range(n) if gains[i] >= best - 1e-5))  # near ties: the lowest index
    assert F.catp_submodular(x, text, k).tolist() == sorted(chosen)


# --- budget and options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.333, 0.222, 0.101, 0.25, 1.0])
def test_one_ratio_split_half_per_stage(keep):
    vision, decoder = CATP().stage_keeps(keep)
    r = 1 - keep
    assert vision == pytest.approx(1 - r / 2) and vision * decoder == pytest.approx(keep)
    with pytest.raises(ValueError, match="float ratio"):
        CATP().stage_keeps(64)


def test_options_are_checked():
    with pytest.raises(ValueError, match="query_image"):
        CATP(query_image="last")
    with pytest.raises(ValueError, match="layer"):
        CATP(layer=0)
    assert METHODS["catp"] is CATP
    plan = CATP().stages()[1].plan(32)
    assert [(p.layer, p.score_layer) for p in plan] == [(K + 1, K), (K + 2, K + 1)]
    assert [p.score_layer for p in CATP().stages()[1].plan(40)] == [10, 11]  # the paper's 13B setting


def test_schedule_counts_both_stages():
    """The per-layer visual tokens at the paper's headline setting (4 examples + query, R = 77.8%, 32 layers):
    stage 1 keeps 61.1% of every image up to layer K = 6, the pool is cut from layer 7, the query from layer 8."""
    schedule = CATP().schedule([576] * 5, 0.222, 32)
    assert schedule == [5 * 352] * 7 + [4 * 128 + 352] + [5 * 128] * 24
    assert CATP().schedule([576], 0.222, 32) == [352] * 8 + [128] * 24  # one image: 0-shot, no pool
    assert CATP().schedule([576] * 3, 1.0, 32) == [3 * 576] * 32
    assert CATP(query_image=0).schedule([100, 576], 0.222, 32)[8] == kept_count(0.222 / 0.611, 61) + 128
    with pytest.raises(ValueError, match="query_image=2"):
        CATP(query_image=2).schedule([576, 576], 0.222, 32)


# --- the paired-text rule -----------------------------------------------------------------------------------------
class _Model(torch.nn.Module):
    """Just what :func:`paired_text_embeddings` reads: a config and the input embeddings (id -> [id])."""

    def __init__(self, **config):
        super().__init__()
        self.config = type("Config", (), config)()
        self.embed = torch.nn.Embedding(20, 1)
        self.embed.weight.data = torch.arange(20.0)[:, None]

    def get_input_embeddings(self):
        return self.embed


def test_paired_text_is_the_text_up_to_the_next_image_without_block_delimiters():
    model = _Model(vision_start_token_id=1, vision_end_token_id=2)
    # 3 | <s> 9 9 </s> | 4 5 | <s> 9 </s> | 6 7 (pad 0 masked)
    ids = torch.tensor([[3, 1, 9, 9, 2, 4, 5, 1, 9, 2, 6, 7, 0]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    first = paired_text_embeddings(model, ids, mask, 0, 3, (9,))
    last = paired_text_embeddings(model, ids, mask, 0, 8, (9,))
    assert first.squeeze(1).tolist() == [4.0, 5.0] and last.squeeze(1).tolist() == [6.0, 7.0]
    adjacent = torch.tensor([[3, 9, 9, 1, 2, 9, 4]])
    with pytest.raises(ValueError, match="image 0 of prompt row 0 has no paired text: found another image"):
        paired_text_embeddings(model, adjacent, None, 0, 2, (9,))


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
    try:
        enable_pruning(model, "catp", keep=1.0)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref_logits)
            assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
        disable_pruning(model)
        handle = enable_pruning(model, "catp", keep=0.25)
        with torch.no_grad():
            ids = model.generate(**inputs, **GEN)
            rec = handle.last
            uncached = model.generate(**inputs, **GEN, use_cache=False)
    finally:
        disable_pruning(model)
    assert torch.equal(ids, uncached) and torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
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
    enable_pruning(model, "catp", keep=0.25)
    try:
        with torch.no_grad():
            together = model.generate(**batch, **GEN)[:, -GEN["max_new_tokens"]:]
            each = [model.generate(**row, **GEN)[:, -GEN["max_new_tokens"]:] for row in alone]
    finally:
        disable_pruning(model)
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
    handle = enable_pruning(model, "catp", keep=0.25, query_image=0)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        disable_pruning(model)
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
        enable_pruning(model, "catp", keep=0.25, **options)
        try:
            with pytest.raises(ValueError, match=message), torch.no_grad():
                model.generate(**inputs, **GEN)
        finally:
            disable_pruning(model)
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
    try:
        enable_pruning(model, "catp", keep=1.0, layer=1)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref_logits)
        disable_pruning(model)
        handle = enable_pruning(model, "catp", keep=0.25, layer=1)
        with torch.no_grad():
            cached = model.generate(**inputs, **GEN)
            rec = handle.last
            uncached = model.generate(**inputs, **GEN, use_cache=False)
    finally:
        disable_pruning(model)
    assert torch.equal(cached, uncached)
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
    enable_pruning(model, "catp", keep=0.25)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                 return_dict_in_generate=True)
            question = processor.tokenizer(" and the dog ? ASSISTANT :", return_tensors="pt",
                                           add_special_tokens=False).input_ids
            tail = torch.cat([out.sequences[:, -1:], question], dim=1)
            mask = torch.ones(1, out.sequences.shape[1] + question.shape[1], dtype=torch.long)
            chunk = model(input_ids=tail, attention_mask=mask, past_key_values=copy.deepcopy(out.past_key_values))
            cache, steps = copy.deepcopy(out.past_key_values), []
            for i in range(tail.shape[1]):
                width = mask.shape[1] - tail.shape[1] + i + 1
                steps.append(model(input_ids=tail[:, i:i + 1], attention_mask=mask[:, :width],
                                   past_key_values=cache).logits[:, -1])
            conversation = torch.cat([out.sequences, question], dim=1)
            follow = model.generate(input_ids=conversation, attention_mask=mask, past_key_values=out.past_key_values,
                                    max_new_tokens=2, do_sample=False)
    finally:
        disable_pruning(model)
    torch.testing.assert_close(chunk.logits, torch.stack(steps, dim=1), rtol=0, atol=1e-4)
    assert torch.equal(follow[:, : conversation.shape[1]], conversation)
