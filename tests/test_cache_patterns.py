"""Every way people call ``generate`` on a pruned KV cache, for every method on real-depth models
(``tokenprune.real_depth.real_depth``): a follow-up question on the returned cache, resumed generation, prompt reuse
with ``copy.deepcopy``, the static cache, beams and several samples -- exact, or a clear error.

One parametrized matrix (family x method): a new family in ``FAMILIES`` or a new registered method gets it for free.
Each case prunes ONE conversation turn once (a module fixture) and every pattern continues copies of that cache.
Gemma 3 (sliding-window and global layers, bidirectional image blocks) runs one decoder-stage or two-stage method per
decoder-loop mechanism here (``DECODER_FAMILIES``); its vision-stage patterns are in tests/test_gemma3.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import DynamicCache, StaticCache

from tokenprune import disable_pruning, enable_pruning
from tokenprune.catalog import unsupported_reason
from tokenprune.methods import METHODS, TEXT_EMBEDDINGS
from tokenprune.patches import ADAPTERS, pruned_cache
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

FAMILIES = ("llava", "qwen2_5_vl", "llava_next", "qwen2_vl")
DECODER_FAMILIES = ("gemma3",)  # families whose decoder-stage and two-stage methods run here
# On those, one method per decoder-loop mechanism (attention-row scoring, staged pyramids, text raters and recycling,
# merged tokens, the sparse MLP, a vision stage before the decoder stage): the 48-layer Gemma 3 is slow, and every
# Gemma 3 method runs cached == uncached and batch == rows in tests/test_gemma3.py.
DECODER_METHODS = ("fastv", "pdrop", "sparsevlm", "visiondropllm", "corematching", "todre")
KEEP = 0.25
TOL = dict(rtol=0, atol=1e-4)
QIMG = "<|vision_start|><|image_pad|><|vision_end|>"
QUESTIONS = ("what is in the image ?", "is there a dog left of the red circle ?")  # two rows: left padding
FOLLOW_UP = " and the blue square ? ASSISTANT :"


def runs_on(family: str, name: str) -> bool:
    """Can ``name`` run on ``family`` at all (the registry's answer, as in the method tables; methods that cannot
    raise a clear error at enable time)?"""
    method = METHODS[name]()
    return not method.unavailable and unsupported_reason(method, ADAPTERS[family], family) is None


def image_only(name: str) -> bool:
    """A selection that reads the image alone (no text, no LLM): reusing its cache must equal a fresh run."""
    cls = METHODS[name]
    return cls.stage in ("vision", "vision-encoder") and TEXT_EMBEDDINGS not in cls.needs


# Video-only methods (HoliTom) decline these image prompts at the call (listed in tests/test_matrix_real_depth.py);
# their generate patterns on videos are in tests/test_holitom.py.
CASES = [(f, m) for f in FAMILIES for m in sorted(METHODS) if runs_on(f, m) and not METHODS[m].video_only]
CASES += [(f, m) for f in DECODER_FAMILIES for m in DECODER_METHODS
          if METHODS[m].stage in ("decoder", "two-stage") and runs_on(f, m) and not METHODS[m].video_only]


@functools.cache
def _model(family: str):
    return real_depth(family)


@functools.cache
def _own_model(family: str):
    """A second instance, for tests outside the matrix: the matrix's models stay as their fixture left them."""
    return real_depth(family)


def prompt(family: str, text: str) -> str:
    if family == "gemma3":
        return f"USER : <start_of_image> {text}"
    return f"USER : {QIMG}{text}" if family.startswith("qwen") else f"USER : <image>\n{text}"


def encode(family: str, processor, texts: list[str]) -> dict:
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)][: len(texts)]
    prompts = [prompt(family, t) for t in texts]
    if family.startswith("qwen"):
        return dict(processor(text=prompts, images=images))
    if family == "gemma3":
        return dict(processor(text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True))
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def words(processor, text: str, rows: int) -> torch.Tensor:
    ids = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids.expand(rows, -1)


def extend(inputs: dict, ids: torch.Tensor) -> dict:
    """``inputs`` (with pixels) for the longer prompt ``ids``: mask and mm_token_type_ids padded with text ones."""
    n = ids.shape[1] - inputs["input_ids"].shape[1]
    out = dict(inputs, input_ids=ids)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, -n:])], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            out[key] = torch.cat([inputs[key], torch.zeros_like(ids[:, -n:])], dim=1)
    return out


def gen(model, **kwargs):
    """Greedy, with logits; no early end of sequence (a finished row would not be continued like a running one)."""
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    return model.generate(do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{m}" for f, m in CASES])
def turn(request):
    """Turn 1 of a two-row conversation, pruned at ``KEEP``: (model, processor, inputs, output with its cache)."""
    family, method = request.param
    model, processor = _model(family)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny widths: a second thread only adds synchronisation (and stalls on a busy machine)
    disable_pruning(model)
    try:
        enable_pruning(model, method, keep=KEEP)
        inputs = encode(family, processor, list(QUESTIONS))
        with torch.no_grad():
            out = gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
        yield family, method, model, processor, inputs, out
    finally:
        disable_pruning(model)
        torch.set_num_threads(threads)


def assert_chunk_equals_steps(model, cache, tail: torch.Tensor, mask: torch.Tensor) -> None:
    """``tail`` fed on a copy of ``cache`` as one chunk == fed one token at a time (``mask``: original coordinates,
    everything up to the end of ``tail``)."""
    chunk = model(input_ids=tail, attention_mask=mask, past_key_values=copy.deepcopy(cache))
    steps, cache = [], copy.deepcopy(cache)
    for i in range(tail.shape[1]):
        width = mask.shape[1] - tail.shape[1] + i + 1
        step = model(input_ids=tail[:, i:i + 1], attention_mask=mask[:, :width], past_key_values=cache)
        steps.append(step.logits[:, -1])
    torch.testing.assert_close(chunk.logits, torch.stack(steps, dim=1), **TOL)


def test_follow_up_question_chunk_equals_decode_steps(turn):
    """Turn 2 on the returned cache, fed as one chunk == the same tokens fed one at a time; ``generate`` on it
    returns the caller's ids; for an image-only selector it equals a fresh pruned run of the whole conversation."""
    family, method, model, processor, inputs, out = turn
    assert pruned_cache.original_length(out.past_key_values) == out.sequences.shape[1] - 1  # the last id is not fed
    rows = out.sequences.shape[0]
    question = words(processor, FOLLOW_UP, rows)
    tail = torch.cat([out.sequences[:, -1:], question], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, inputs["input_ids"].shape[1]:]),
                      torch.ones_like(question)], dim=1)  # original coordinates
    with torch.no_grad():
        assert_chunk_equals_steps(model, out.past_key_values, tail, mask)
        conversation = torch.cat([out.sequences, question], dim=1)
        follow = gen(model, input_ids=conversation, attention_mask=mask,
                     past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
        assert torch.equal(follow.sequences[:, : conversation.shape[1]], conversation)
        if image_only(method):
            fresh = gen(model, **extend(inputs, conversation), max_new_tokens=2)
            assert torch.equal(follow.sequences, fresh.sequences)
            torch.testing.assert_close(torch.stack(follow.logits), torch.stack(fresh.logits), **TOL)


PLACEHOLDER = {"llava": "<image>\n", "llava_next": "<image>\n", "llava_onevision": "<image>\n",
               "internvl": "<IMG_CONTEXT>\n", "gemma3": "<start_of_image> "}  # Qwen: QIMG


def visual_prompts(family: str, processor, texts: list[str], images: list, first: bool) -> dict:
    """The processor's inputs for ``texts`` (``{}``: one image's placeholder each) and one image per row; a later
    turn's ids come without a leading BOS."""
    texts = [t.format(QIMG if family.startswith("qwen") else PLACEHOLDER[family]) for t in texts]
    if family.startswith("qwen") or family in ("llava_onevision", "internvl"):
        return dict(processor(text=texts, images=images))
    extra = {} if first else {"add_special_tokens": False}
    images = [[im] for im in images] if family == "gemma3" else images
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True, **extra))


def new_turn(family: str, processor, rows: int) -> dict:
    """Turn 2's new tokens with a NEW image per row (one size in every row), as the processor returns them for the
    new turn alone: the pixels of the new images only."""
    images = [random_image(70, 98, seed=3 + r) for r in range(rows)]
    return visual_prompts(family, processor, [" USER : {}and this one ? ASSISTANT :"] * rows, images, first=False)


def every_pixel(family: str, first: dict, second: dict) -> dict:
    """The pixel inputs of both turns' images, row-major (row 0's two images, then row 1's), as a processor run on
    the whole conversation returns them."""
    rows = first["input_ids"].shape[0]
    if family.startswith("qwen"):
        grids = [t["image_grid_thw"] for t in (first, second)]
        parts = [torch.split(t["pixel_values"], grid.prod(-1).tolist()) for t, grid in zip((first, second), grids,
                                                                                            strict=True)]
        return dict(pixel_values=torch.cat([parts[t][r] for r in range(rows) for t in (0, 1)]),
                    image_grid_thw=torch.stack([grids[t][r] for r in range(rows) for t in (0, 1)]))
    if family == "internvl":  # tiles; one row
        return dict(pixel_values=torch.cat([first["pixel_values"], second["pixel_values"]]))
    out = {}
    for key in (k for k in ("pixel_values", "image_sizes") if k in second):
        items = [t[key][r] for r in range(rows) for t in (first, second)]
        if key == "pixel_values" and items[0].ndim == 4:  # per-image patches (NeXT, OneVision): one padded count
            n = max(x.shape[0] for x in items)
            items = [torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])]) for x in items]
        out[key] = torch.stack(items)
    return out


def new_image_call(family: str, processor, inputs: dict, out) -> tuple[dict, dict, dict]:
    """``(call, pixels, new)``: turn 2's per-token inputs (turn 1's sequences + the new turn), the new images'
    pixel inputs, and the processor's output for the new turn."""
    rows, g = out.sequences.shape[0], out.sequences.shape[1] - inputs["input_ids"].shape[1]
    new = new_turn(family, processor, rows)
    ids = torch.cat([out.sequences, new["input_ids"]], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, -g:]), new["attention_mask"]], 1)
    call = dict(input_ids=ids, attention_mask=mask)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in new:
            call[key] = torch.cat([inputs[key], torch.zeros_like(out.sequences[:, -g:]), new[key]], dim=1)
    return call, {k: v for k, v in new.items() if k not in call}, new


def check_new_image_turn(family: str, method: str, model, processor, inputs: dict, out) -> None:
    """Turn 2 = turn 1's sequences + a new turn with a NEW image, on turn 1's cache (see the tests below)."""
    rows = out.sequences.shape[0]
    call, pixels, new = new_image_call(family, processor, inputs, out)
    ids, mask = call["input_ids"], call["attention_mask"]
    with torch.no_grad():
        if METHODS[method].stage in ("decoder", "two-stage"):
            with pytest.raises(ValueError, match="new image or video after a KV cache pruned by a decoder-stage"):
                gen(model, **call, **pixels, past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=1)
            return
        reuse = gen(model, **call, **pixels, past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
        assert torch.equal(reuse.sequences[:, : ids.shape[1]], ids)
        if image_only(method):
            everything = every_pixel(family, inputs, new)
            fresh = gen(model, **call, **everything, max_new_tokens=2)
            assert torch.equal(reuse.sequences, fresh.sequences)
            torch.testing.assert_close(torch.stack(reuse.logits), torch.stack(fresh.logits), **TOL)
            if method == "divprune":  # which pixels are dropped does not depend on the method: one per family
                given_all = gen(model, **call, **everything, past_key_values=copy.deepcopy(out.past_key_values),
                                max_new_tokens=2)
                assert torch.equal(given_all.sequences, fresh.sequences)
        assert pruned_cache.original_length(reuse.past_key_values) == reuse.sequences.shape[1] - 1
        tail = torch.cat([reuse.sequences[:, -1:], words(processor, " ok ?", rows)], dim=1)
        mask3 = torch.cat([mask, torch.ones_like(reuse.sequences[:, ids.shape[1]:]), torch.ones_like(tail[:, 1:])], 1)
        assert_chunk_equals_steps(model, reuse.past_key_values, tail, mask3)


def test_new_image_in_a_later_turn(turn):
    """Turn 2 = turn 1's sequences + a new turn with a NEW image, on the returned cache: the new image is pruned as
    it enters, with its own budget. For an image-only selector that is a fresh pruned run of the whole conversation
    (both images, each with the same per-image budget: keep is per image, per crop on LLaVA-NeXT), whether the call
    passes the new image's pixels or every image's. A third turn continues the grown cache: chunk == token by token.
    Decoder-stage methods decline (docs/conversations.md)."""
    check_new_image_turn(*turn)


OTHER_FAMILIES = ("qwen3_vl", "qwen3_5", "llava_onevision", "internvl", "gemma3")
OTHER_CASES = [(f, m) for f in OTHER_FAMILIES for m in ("divprune", "random", "fastv") if runs_on(f, m)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family, method", OTHER_CASES, ids=[f"{f}-{m}" for f, m in OTHER_CASES])
def test_new_image_in_a_later_turn_on_every_family(family, method):
    """The same on the families outside the matrix (real depth; one row on InternVL3, whose pixel inputs are tiles)."""
    model, processor = _own_model(family)
    rows = 1 if family == "internvl" else 2
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)][:rows]
    disable_pruning(model)
    enable_pruning(model, method, keep=KEEP)
    try:
        inputs = visual_prompts(family, processor, ["USER : {}" + q for q in QUESTIONS][:rows], images, first=True)
        with torch.no_grad():
            out = gen(model, **inputs, past_key_values=DynamicCache(config=model.config), max_new_tokens=2)
        check_new_image_turn(family, method, model, processor, inputs, out)
    finally:
        disable_pruning(model)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_new_image_in_one_row_of_two(family, cache):
    """Turn 2 brings a new image in row 0 only (row 1: text; the processor pads the new turn, so the conversation has
    padding inside it): == a fresh pruned run of the whole conversation (three images), on a dynamic or a static
    cache (one long enough for both turns)."""
    model, processor = _own_model(family)
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)]
    inputs = visual_prompts(family, processor, ["USER : {}" + q for q in QUESTIONS], images, first=True)
    enable_pruning(model, "divprune", keep=KEEP)
    try:
        with torch.no_grad():
            first_cache = DynamicCache() if cache == "dynamic" else StaticCache(config=model.config, max_cache_len=400)
            out = gen(model, **inputs, past_key_values=first_cache, max_new_tokens=2)
            g = out.sequences.shape[1] - inputs["input_ids"].shape[1]
            new = visual_prompts(family, processor, [" USER : {}and this one ? ASSISTANT :", " USER : and else ?"],
                                 [random_image(70, 98, seed=3)], first=False)
            call = dict(input_ids=torch.cat([out.sequences, new["input_ids"]], dim=1), attention_mask=torch.cat(
                [inputs["attention_mask"], torch.ones_like(out.sequences[:, -g:]), new["attention_mask"]], dim=1))
            if "mm_token_type_ids" in new:
                call["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                       torch.zeros_like(out.sequences[:, -g:]),
                                                       new["mm_token_type_ids"]], dim=1)
            pixels = {k: v for k, v in new.items() if k not in call}
            reuse = gen(model, **call, **pixels, past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
            if family.startswith("qwen"):
                first = torch.split(inputs["pixel_values"], inputs["image_grid_thw"].prod(-1).tolist())
                grids = inputs["image_grid_thw"]
                everything = dict(pixel_values=torch.cat([first[0], new["pixel_values"], first[1]]),
                                  image_grid_thw=torch.stack([grids[0], new["image_grid_thw"][0], grids[1]]))
            else:
                everything = dict(pixel_values=torch.cat([inputs["pixel_values"][:1], new["pixel_values"],
                                                          inputs["pixel_values"][1:]]))
            fresh = gen(model, **call, **everything, max_new_tokens=2)
    finally:
        disable_pruning(model)
    assert torch.equal(reuse.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reuse.logits), torch.stack(fresh.logits), **TOL)


# Families whose UNPRUNED model continues a cache with a new image itself (transformers 5.23). Qwen's does not:
# its generate computes M-RoPE over the whole ids with the new turn's grids only, or encodes every image's pixels
# for the uncached placeholders; there keep=1.0 is checked against the unpruned fresh run of the conversation.
HF_CONTINUES_WITH_NEW_IMAGE = ("llava", "llava_next", "llava_onevision", "internvl", "gemma3")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", FAMILIES + OTHER_FAMILIES)
def test_keep_all_new_image_turn_equals_unpruned(family):
    """keep=1.0: turn 2 with a new image on the returned cache gives the unpruned model's ids and logits (bit for
    bit where transformers continues such a cache itself; else its fresh run of the whole conversation)."""
    model, processor = _own_model(family)
    rows = 1 if family == "internvl" else 2
    images = [random_image(84, 140, seed=1), random_image(56, 84, seed=2)][:rows]
    inputs = visual_prompts(family, processor, ["USER : {}" + q for q in QUESTIONS][:rows], images, first=True)

    def turn2(keep: float | None, fresh: bool = False):
        disable_pruning(model)
        if keep is not None:
            enable_pruning(model, "divprune", keep=keep)
        out = gen(model, **inputs, past_key_values=DynamicCache(config=model.config), max_new_tokens=2)
        call, pixels, new = new_image_call(family, processor, inputs, out)
        if fresh:
            return gen(model, **call, **every_pixel(family, inputs, new), max_new_tokens=2)
        return gen(model, **call, **pixels, past_key_values=out.past_key_values, max_new_tokens=2)

    try:
        with torch.no_grad():
            mine = turn2(1.0)
            expected = turn2(None, fresh=family not in HF_CONTINUES_WITH_NEW_IMAGE)
    finally:
        disable_pruning(model)
    assert torch.equal(mine.sequences, expected.sequences)
    if family in HF_CONTINUES_WITH_NEW_IMAGE:
        assert all(torch.equal(a, b) for a, b in zip(mine.logits, expected.logits, strict=True))
    else:
        torch.testing.assert_close(torch.stack(mine.logits), torch.stack(expected.logits), **TOL)


def test_resumed_generation_equals_one_longer_generate(turn):
    family, method, model, processor, inputs, out = turn
    n = out.sequences.shape[1] - inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, -n:])], dim=1)
    with torch.no_grad():
        resumed = gen(model, input_ids=out.sequences, attention_mask=mask,
                      past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
        longer = gen(model, **inputs, max_new_tokens=n + 2)
    assert torch.equal(resumed.sequences, longer.sequences)
    torch.testing.assert_close(torch.stack(resumed.logits), torch.stack(longer.logits[n:]), **TOL)


def test_prompt_reuse_with_deepcopy(turn):
    """Prefill the image + a system line once (a forward), then one ``copy.deepcopy`` per question: each copy answers
    as the original cache does (the pruning state travels with the copy); image-only selectors == a fresh run."""
    family, method, model, processor, _, _ = turn
    prefix = encode(family, processor, ["answer in one word ."])
    with torch.no_grad():
        cache = model(**prefix, past_key_values=DynamicCache()).past_key_values
        answers = []
        for text in (" what is it ? ASSISTANT :", " is it red ? ASSISTANT :"):
            ids = torch.cat([prefix["input_ids"], words(processor, text, 1)], dim=1)
            answers.append(gen(model, input_ids=ids, past_key_values=copy.deepcopy(cache), max_new_tokens=2))
        again = gen(model, input_ids=ids, past_key_values=cache, max_new_tokens=2)  # the original, after two copies
        assert torch.equal(again.sequences, answers[-1].sequences)
        torch.testing.assert_close(torch.stack(again.logits), torch.stack(answers[-1].logits), **TOL)
        if image_only(method):
            fresh = gen(model, **extend(prefix, ids), max_new_tokens=2)
            assert torch.equal(answers[-1].sequences, fresh.sequences)
            torch.testing.assert_close(torch.stack(answers[-1].logits), torch.stack(fresh.logits), **TOL)


def test_static_cache_equals_dynamic(turn):
    family, method, model, processor, inputs, out = turn
    with torch.no_grad():
        static = gen(model, **inputs, cache_implementation="static", max_new_tokens=2)
    assert torch.equal(static.sequences, out.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(out.logits), **TOL)


def test_beams_and_several_samples_run(turn):
    family, method, model, processor, inputs, out = turn
    prompt_ids = inputs["input_ids"].repeat_interleave(3, dim=0)
    with torch.no_grad():
        beams = model.generate(**inputs, num_beams=3, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        torch.manual_seed(0)
        samples = model.generate(**inputs, num_return_sequences=3, do_sample=True, max_new_tokens=2,
                                  min_new_tokens=2)
    assert torch.equal(beams[:, : prompt_ids.shape[1]], inputs["input_ids"])
    assert torch.equal(samples[:, : prompt_ids.shape[1]], prompt_ids)
    assert beams.shape[1] == samples.shape[1] == prompt_ids.shape[1] + 2


def test_keep_all_equals_unpruned_in_every_pattern(turn):
    """keep=1.0: a follow-up turn on the returned cache, a deep-copied cache, the static cache and beams give the
    unpruned model's ids and logits."""
    family, method, model, processor, inputs, _ = turn

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            first = gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
            conversation = torch.cat([first.sequences, words(processor, FOLLOW_UP, first.sequences.shape[0])], dim=1)
            mask = torch.cat([inputs["attention_mask"],
                              torch.ones_like(conversation[:, inputs["input_ids"].shape[1]:])], dim=1)
            follow = gen(model, input_ids=conversation, attention_mask=mask,
                         past_key_values=copy.deepcopy(first.past_key_values), max_new_tokens=2)
            static = gen(model, **inputs, cache_implementation="static", max_new_tokens=2)
            beams = model.generate(**inputs, num_beams=3, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        return [first.sequences, *first.logits, follow.sequences, *follow.logits, static.sequences, *static.logits,
                beams]

    try:
        disable_pruning(model)
        expected = run()
        enable_pruning(model, method, keep=1.0)
        got = run()
    finally:
        disable_pruning(model)
        enable_pruning(model, method, keep=KEEP)  # the module fixture's state for the next pattern
    for mine, theirs in zip(got, expected, strict=True):
        assert torch.equal(mine, theirs)


def test_calls_that_cannot_continue_a_pruned_cache_raise_at_the_call():
    """What cannot be continued exactly is declined with a ValueError that says what to do (docs/conversations.md
    lists them), before anything runs: never a silent wrong answer or a shape error from inside attention."""
    model, processor = real_depth("llava")  # its own instance: the matrix's models stay as their fixture left them
    enable_pruning(model, "divprune", keep=KEEP)
    try:
        inputs = encode("llava", processor, list(QUESTIONS))
        with torch.no_grad():
            out = gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
            cache = out.past_key_values
            other = out.sequences.clone()
            other[:, -3] = (other[:, -3] + 1) % 20  # another history than the cached prompt
            with pytest.raises(ValueError, match="do not start with that prompt"):
                model.generate(other, past_key_values=copy.deepcopy(cache), max_new_tokens=1)
            with pytest.raises(ValueError, match="add nothing new"):
                model.generate(out.sequences[:, :-1], past_key_values=copy.deepcopy(cache), max_new_tokens=1)
            with pytest.raises(ValueError, match="not a repetition"):
                model.generate(out.sequences[:1].expand(3, -1), past_key_values=copy.deepcopy(cache),
                               max_new_tokens=1)
            image = new_turn("llava", processor, 2)
            later = torch.cat([out.sequences, image["input_ids"]], dim=1)
            with pytest.raises(ValueError, match="the pixel inputs describe 3"):
                model.generate(later, pixel_values=torch.cat([image["pixel_values"]] * 3)[:3],
                               past_key_values=copy.deepcopy(cache), max_new_tokens=1)
            with pytest.raises(ValueError, match="this forward adds a new image or video on a pruned KV cache"):
                model(input_ids=image["input_ids"], pixel_values=image["pixel_values"],
                      past_key_values=copy.deepcopy(cache))
            with pytest.raises(ValueError, match="the attention mask has"):
                model(input_ids=out.sequences[:, -1:], attention_mask=torch.ones(2, 5, dtype=torch.long),
                      past_key_values=copy.deepcopy(cache))
    finally:
        disable_pruning(model)
