"""Every way people call ``generate`` on a pruned KV cache, for every method on real-depth models
(``tokenprune.real_depth.real_depth``): a follow-up question on the returned cache, a new image in a later turn,
resumed generation, prompt reuse with ``copy.deepcopy``, the static cache, beams and several samples -- exact, or a
clear error.

One parametrized matrix (family x method): a new family in ``FAMILIES`` or a new registered method gets it for free.
Each case prunes ONE conversation turn once (a module fixture) and every pattern continues copies of that cache. The
patterns are written once (``Patterns``) and run by one class per family: each class is one unit of work for
``make test``'s ``--dist loadscope``, so the families spread over the workers. Gemma 3 (sliding-window and global
layers, bidirectional image blocks) runs one decoder-stage or two-stage method per decoder-loop mechanism here
(``DECODER_METHODS``); its vision-stage patterns are in tests/test_gemma3.py. The new-image turn on the families
outside the matrix: tests/test_cache_new_image.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cache_turns import (
    FAMILIES,
    FOLLOW_UP,
    KEEP,
    QUESTIONS,
    TOL,
    assert_chunk_equals_steps,
    check_new_image_turn,
    encode,
    extend,
    gen,
    image_only,
    matrix_model,
    new_turn,
    runs_on,
    words,
)
from transformers import DynamicCache

from tokenprune import disable_pruning, enable_pruning
from tokenprune.methods import METHODS
from tokenprune.patches import pruned_cache
from tokenprune.real_depth import real_depth

DECODER_FAMILIES = ("gemma3",)  # families whose decoder-stage and two-stage methods run here
# On those, one method per decoder-loop mechanism (attention-row scoring, staged pyramids, text raters and recycling,
# merged tokens, the sparse MLP, a vision stage before the decoder stage): the 48-layer Gemma 3 is slow, and every
# Gemma 3 method runs cached == uncached and batch == rows in tests/test_gemma3_decoder.py.
DECODER_METHODS = ("fastv", "pdrop", "sparsevlm", "visiondropllm", "corematching", "todre")

# Video-only methods (HoliTom) decline these image prompts at the call (listed in tests/test_matrix_real_depth.py);
# their generate patterns on videos are in tests/test_holitom_models.py.
CASES = [(f, m) for f in FAMILIES for m in sorted(METHODS) if runs_on(f, m) and not METHODS[m].video_only]
CASES += [(f, m) for f in DECODER_FAMILIES for m in DECODER_METHODS
          if METHODS[m].stage in ("decoder", "two-stage") and runs_on(f, m) and not METHODS[m].video_only]
UNPRUNED: dict[str, list[torch.Tensor]] = {}  # family -> the unpruned model's outputs in every keep=1.0 pattern


@pytest.fixture(scope="module")
def turn(request):
    """Turn 1 of a two-row conversation, pruned at ``KEEP``: (model, processor, inputs, output with its cache)."""
    family, method = request.param
    model, processor = matrix_model(family)
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


def on(family: str):
    """Runs a ``Patterns`` subclass on ``family``'s cases (the module fixture ``turn``, one per case)."""
    cases = [case for case in CASES if case[0] == family]
    return pytest.mark.parametrize("turn", cases, indirect=True, ids=[f"{f}-{m}" for f, m in cases])


class Patterns:
    """The patterns, on the cache of one pruned turn (``turn``); run by the family classes below."""

    def test_follow_up_question_chunk_equals_decode_steps(self, turn):
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

    def test_new_image_in_a_later_turn(self, turn):
        """Turn 2 = turn 1's sequences + a new turn with a NEW image, on the returned cache: the new image is pruned as
        it enters, with its own budget. For an image-only selector that is a fresh pruned run of the whole conversation
        (both images, each with the same per-image budget: keep is per image, per crop on LLaVA-NeXT), whether the call
        passes the new image's pixels or every image's. A third turn continues the grown cache: chunk == token by token.
        Decoder-stage methods decline (docs/conversations.md)."""
        check_new_image_turn(*turn)

    def test_resumed_generation_equals_one_longer_generate(self, turn):
        family, method, model, processor, inputs, out = turn
        n = out.sequences.shape[1] - inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(out.sequences[:, -n:])], dim=1)
        with torch.no_grad():
            resumed = gen(model, input_ids=out.sequences, attention_mask=mask,
                          past_key_values=copy.deepcopy(out.past_key_values), max_new_tokens=2)
            longer = gen(model, **inputs, max_new_tokens=n + 2)
        assert torch.equal(resumed.sequences, longer.sequences)
        torch.testing.assert_close(torch.stack(resumed.logits), torch.stack(longer.logits[n:]), **TOL)

    def test_prompt_reuse_with_deepcopy(self, turn):
        """Prefill the image + a system line once (a forward), then one ``copy.deepcopy`` per question: each copy
        answers as the original cache does (the pruning state travels with the copy); image-only selectors == a fresh
        run."""
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

    def test_static_cache_equals_dynamic(self, turn):
        family, method, model, processor, inputs, out = turn
        with torch.no_grad():
            static = gen(model, **inputs, cache_implementation="static", max_new_tokens=2)
        assert torch.equal(static.sequences, out.sequences)
        torch.testing.assert_close(torch.stack(static.logits), torch.stack(out.logits), **TOL)

    def test_beams_and_several_samples_run(self, turn):
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

    def test_keep_all_equals_unpruned_in_every_pattern(self, turn):
        """keep=1.0: a follow-up turn on the returned cache, a deep-copied cache, the static cache and beams give the
        unpruned model's ids and logits (the unpruned run is the same for every method: once per family)."""
        family, method, model, processor, inputs, _ = turn

        def run() -> list[torch.Tensor]:
            with torch.no_grad():
                first = gen(model, **inputs, past_key_values=DynamicCache(), max_new_tokens=2)
                question = words(processor, FOLLOW_UP, first.sequences.shape[0])
                conversation = torch.cat([first.sequences, question], dim=1)
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
            if family not in UNPRUNED:
                UNPRUNED[family] = run()
            expected = UNPRUNED[family]
            enable_pruning(model, method, keep=1.0)
            got = run()
        finally:
            disable_pruning(model)
            enable_pruning(model, method, keep=KEEP)  # the module fixture's state for the next pattern
        for mine, theirs in zip(got, expected, strict=True):
            assert torch.equal(mine, theirs)


@on("llava")
class TestLlava(Patterns):
    """LLaVA-1.5: CLIP-L 24 layers, LLM 32; the pruned prompt is re-indexed."""


@on("llava_next")
class TestLlavaNext(Patterns):
    """LLaVA-NeXT: a base tile and crops with newline tokens, each budgeted alone."""


@on("qwen2_vl")
class TestQwen2VL(Patterns):
    """Qwen2-VL: the kept tokens at their original M-RoPE positions."""


@on("qwen2_5_vl")
class TestQwen25VL(Patterns):
    """Qwen2.5-VL: window attention in the ViT; M-RoPE as Qwen2-VL."""


@on("gemma3")
class TestGemma3(Patterns):
    """Gemma 3: sliding-window and global layers, bidirectional image blocks; one decoder method per mechanism."""


def test_every_case_runs_in_a_family_class():
    """A family added to ``FAMILIES`` or ``DECODER_FAMILIES`` needs its class above, or its cases would not run."""
    covered = [case for cls in Patterns.__subclasses__() for mark in cls.pytestmark for case in mark.args[1]]
    assert sorted(covered) == sorted(CASES)


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
