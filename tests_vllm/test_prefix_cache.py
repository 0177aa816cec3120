"""Prefix caching ON: the same image under two questions. vLLM keys its prefix-cache blocks and its encoder cache on
the image item's hash; a prompt-dependent method salts that hash with the text it selects for (prompt_text.py), so
a request never reuses a selection made for another question, while an image-only method shares the image's
blocks. Each request must equal its result alone, token for token and logprob for logprob."""

from __future__ import annotations

import gc

import pytest
from cases import MAX_TOKENS, PROMPTS, image
from engines import engine

from tokenprune.integrations.vllm import vllm_overrides

# A preamble of two full 32-token blocks and more (the tiny tokenizers are word level), so the blocks before the image
# are shared by every request and the cached-token count shows where sharing stops.
SYSTEM = " ".join(["describe the red circle and the blue square , how many are there ? one two three ."] * 5)
QUESTIONS = ("what is in the image ?", "describe the colours in the top left corner of this picture please")
BLOCK = 32
TOL = 1e-5  # batched and single-request steps differ by fp32 rounding (~2e-7 here)


def _prompt(name: str, question: str) -> str:
    return f"{SYSTEM} " + PROMPTS[name].replace("what is in the image ?", question)


def _engine(path: str, overrides: dict | None):
    return engine(path, overrides, enable_prefix_caching=True, block_size=BLOCK)


def _run(llm, name: str, questions) -> list[tuple[list[int], list[float], int]]:
    """(token ids, logprobs, prefix-cached prompt tokens) per question, all in ONE ``generate`` call."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt": _prompt(name, q), "multi_modal_data": {"image": image(name)}} for q in questions],
                        params, use_tqdm=False)
    results = []
    for out in outs:
        c = out.outputs[0]
        logprobs = [s[t].logprob for s, t in zip(c.logprobs, c.token_ids, strict=True)]
        results.append((list(c.token_ids), logprobs, out.num_cached_tokens or 0))
    return results


def _forget(llm) -> None:
    """Empty every cache that could carry one request's image into another's."""
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


def _text_before_image(llm, name: str) -> int:
    """Prompt tokens before the image's first placeholder."""
    tokenizer = llm.get_tokenizer()
    marker = "<image>" if name.startswith("llava") else "<|image_pad|>"
    return len(tokenizer(_prompt(name, QUESTIONS[0]).split(marker)[0], add_special_tokens=False).input_ids)


# (family, method, keep): image-only selections (the image's blocks are shared) and prompt-dependent ones (they must
# not be), on a tower with [CLS] and on Qwen's M-RoPE (positions rewritten after a partly cached prompt)
CASES = [("qwen2_5_vl", "divprune", 8), ("qwen2_5_vl", "cdpruner", 8), ("llava", "divprune", 12),
         ("llava", "mmtok", 12)]


@pytest.mark.parametrize(("name", "method", "keep"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_same_image_two_questions_each_equals_alone(name, method, keep, model_dirs):
    llm = _engine(model_dirs[name], vllm_overrides(name, method, keep=keep))
    try:
        before_image = _text_before_image(llm, name)
        first = _run(llm, name, QUESTIONS[:1])[0]           # caches the preamble and (its own) image
        second_after_first = _run(llm, name, QUESTIONS[1:])[0]
        first_again = _run(llm, name, QUESTIONS[:1])[0]     # the whole prompt is cached now
        _forget(llm)
        second_alone = _run(llm, name, QUESTIONS[1:])[0]
        _forget(llm)
        batch = _run(llm, name, QUESTIONS)                  # both at once, the image shared or not
    finally:
        del llm
        gc.collect()

    assert first[2] == 0 and second_alone[2] == 0
    assert first_again[:2] == first[:2]
    assert second_after_first[:2] == second_alone[:2]
    for together, alone in zip(batch, (first, second_alone), strict=True):  # a batch of two: fp32 noise only
        assert together[0] == alone[0]
        assert max(abs(a - b) for a, b in zip(together[1], alone[1], strict=True)) < TOL
    assert first_again[2] > before_image  # the prefix cache did serve the image's blocks to an identical prompt
    shared = second_after_first[2]
    if method in ("cdpruner", "mmtok"):  # the image was selected for the other question: nothing past it is shared
        assert BLOCK <= shared <= before_image
        assert second_after_first[:2] != first[:2]
    else:  # image-only: the blocks holding the image are reused
        assert shared > before_image


def test_keep_all_with_prefix_caching_is_bit_identical_to_vanilla(model_dirs):
    name = "qwen2_5_vl"
    results = []
    for overrides in (None, vllm_overrides(name, "divprune", keep=10_000)):
        llm = _engine(model_dirs[name], overrides)
        try:
            results.append(_run(llm, name, QUESTIONS[:1]) + _run(llm, name, QUESTIONS[1:]))
        finally:
            del llm
            gc.collect()
    vanilla, pruned = results
    assert pruned == vanilla  # tokens, logprobs and cached-token counts
    assert vanilla[1][2] > 0
