"""Every way people call ``generate`` on a pruned KV cache, for every method on real-depth models
(``tokenprune.real_depth.real_depth``): a follow-up question on the returned cache, resumed generation, prompt reuse
with ``copy.deepcopy``, the static cache, beams and several samples -- exact, or a clear error.

One parametrized matrix (family x method): a new family in ``FAMILIES`` or a new registered method gets it for free.
Each case prunes ONE conversation turn once (a module fixture) and every pattern continues copies of that cache.
Gemma 3 (sliding-window and global layers, bidirectional image blocks) runs its decoder-stage and two-stage methods
here (``DECODER_FAMILIES``); its vision-stage patterns are in tests/test_gemma3.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import DynamicCache

from tokenprune import disable_pruning, enable_pruning
from tokenprune.catalog import unsupported_reason
from tokenprune.methods import METHODS, TEXT_EMBEDDINGS
from tokenprune.patches import ADAPTERS, pruned_cache
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

FAMILIES = ("llava", "qwen2_5_vl", "llava_next", "qwen2_vl")
DECODER_FAMILIES = ("gemma3",)  # families whose decoder-stage and two-stage methods run here
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


CASES = [(f, m) for f in FAMILIES for m in sorted(METHODS) if runs_on(f, m)]
CASES += [(f, m) for f in DECODER_FAMILIES for m in sorted(METHODS)
          if METHODS[m].stage in ("decoder", "two-stage") and runs_on(f, m)]


@functools.cache
def _model(family: str):
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
        chunk = model(input_ids=tail, attention_mask=mask, past_key_values=copy.deepcopy(out.past_key_values))
        steps, cache = [], copy.deepcopy(out.past_key_values)
        for i in range(tail.shape[1]):
            width = mask.shape[1] - tail.shape[1] + i + 1
            step = model(input_ids=tail[:, i:i + 1], attention_mask=mask[:, :width], past_key_values=cache)
            steps.append(step.logits[:, -1])
        torch.testing.assert_close(chunk.logits, torch.stack(steps, dim=1), **TOL)

        conversation = torch.cat([out.sequences, question], dim=1)
        follow = gen(model, input_ids=conversation, attention_mask=mask,
                     past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
        assert torch.equal(follow.sequences[:, : conversation.shape[1]], conversation)
        if image_only(method):
            fresh = gen(model, **extend(inputs, conversation), max_new_tokens=2)
            assert torch.equal(follow.sequences, fresh.sequences)
            torch.testing.assert_close(torch.stack(follow.logits), torch.stack(fresh.logits), **TOL)


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
            image = encode("llava", processor, ["and this one ?"])
            later = torch.cat([out.sequences[:1], image["input_ids"]], dim=1)
            with pytest.raises(ValueError, match="new image or video after a pruned KV cache"):
                model.generate(later, pixel_values=image["pixel_values"], past_key_values=copy.deepcopy(cache),
                               max_new_tokens=1)
            with pytest.raises(ValueError, match="the attention mask has"):
                model(input_ids=out.sequences[:, -1:], attention_mask=torch.ones(2, 5, dtype=torch.long),
                      past_key_values=copy.deepcopy(cache))
    finally:
        disable_pruning(model)
