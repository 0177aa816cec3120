"""Every other way transformers lets people call ``generate`` on a pruned model -- exact, or a clear error at the call.

tests/test_cache_patterns.py covers the cache patterns (follow-up turns, resumed generation, prompt reuse, static
cache, beams); this file covers the generate MODES: assisted generation (an assistant model, prompt lookup),
``use_cache=False``, ``return_dict_in_generate`` outputs, ``cache_implementation`` variants, ``min_new_tokens`` with
an end-of-sequence token, left-padded batches and the ``image-text-to-text`` pipeline. Each mode is compared with the
call known to be exact (assisted greedy == plain greedy on the same pruned model, token for token; uncached ==
cached), on the real-depth tiny LLaVA-1.5 and Qwen2.5-VL with one vision-stage (``divprune``) and one decoder-stage
(``fastv``) method. The table of modes is in docs/conversations.md.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tokenprune import disable_pruning, enable_pruning
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("llava", "qwen2_5_vl")
METHODS = ("divprune", "fastv")
CASES = [(f, m) for f in FAMILIES for m in METHODS]
IDS = [f"{f}-{m}" for f, m in CASES]
KEEP = 0.25
NEW = 5
TOL = dict(rtol=0, atol=1e-4)
QIMG = "<|vision_start|><|image_pad|><|vision_end|>"
QUESTIONS = ("what is in the image ?", "is there a dog left of the red circle ?")
IMAGES = ((84, 140, 1), (56, 84, 2))


@functools.cache
def _model(family: str, attn: str = "sdpa", seed: int = 0):
    return real_depth(family, attn, seed)


def encode(family: str, processor, rows: tuple[int, ...] = (0,)) -> dict:
    """The processor's inputs for the questions ``rows`` (each with its own image; several rows: left padding)."""
    images = [random_image(*IMAGES[r][:2], seed=IMAGES[r][2]) for r in rows]
    if family.startswith("qwen"):
        return dict(processor(text=[f"USER : {QIMG}{QUESTIONS[r]}" for r in rows], images=images))
    return dict(processor(images=images, text=[f"USER : <image>\n{QUESTIONS[r]}" for r in rows],
                          return_tensors="pt", padding=True))


@pytest.fixture
def pruned(request):
    """``(family, method, model, processor, handle)`` with ``method`` enabled at ``KEEP``; removed after the test."""
    family, method = request.param
    model, processor = _model(family)
    disable_pruning(model)
    handle = enable_pruning(model, method, keep=KEEP)
    try:
        yield family, method, model, processor, handle
    finally:
        disable_pruning(model)


def greedy(model, inputs: dict, **kwargs):
    """Greedy, ``NEW`` tokens (no early end), with the raw logits of every step."""
    kwargs.setdefault("max_new_tokens", NEW)
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_same(out, expected) -> None:
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), **TOL)


def assisted_calls(family: str) -> dict[str, dict]:
    """The assisted modes of transformers' core generate: an assistant model (an unpruned model of the family with
    other weights: it proposes tokens the pruned model rejects, so the verification forward's cache is cropped) and
    prompt lookup (candidates from the ids so far: mostly accepted)."""
    return {"assistant_model": dict(assistant_model=_model(family, seed=1)[0]),
            "prompt_lookup": dict(prompt_lookup_num_tokens=3)}


@pytest.mark.parametrize("pruned", CASES, ids=IDS, indirect=True)
def test_assisted_generation_equals_greedy_or_declines(pruned):
    """Assisted greedy == plain greedy on the same pruned model, token for token and logit for logit (the candidate
    verification forwards several tokens on the pruned cache and crops it by the rejected count). Decoder-stage
    methods decline: the first verification forward holds the prompt AND the candidates, where the method selects."""
    family, method, model, processor, _ = pruned
    inputs = encode(family, processor)
    plain = greedy(model, inputs)
    for mode, extra in assisted_calls(family).items():
        if method == "fastv":
            with pytest.raises(ValueError, match=r"decoder-stage method and this generate call is assisted"):
                greedy(model, inputs, **extra)
            continue
        out = greedy(model, inputs, **extra)
        assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]), mode
        assert_same(out, plain)


@pytest.mark.parametrize("pruned", CASES, ids=IDS, indirect=True)
def test_use_cache_false_and_left_padded_batch(pruned):
    """A left-padded batch of two == each row alone; ``use_cache=False`` (every step recomputes the whole sequence:
    the image is pruned again, identically; a decoder stage replays its first selection) == the cached run."""
    family, method, model, processor, _ = pruned
    batch = encode(family, processor, (0, 1))
    assert (batch["attention_mask"] == 0).any()  # the rows have different lengths: left padding
    cached = greedy(model, batch)
    assert_same(greedy(model, batch, use_cache=False), cached)
    for row in (0, 1):
        alone = greedy(model, encode(family, processor, (row,)))
        width = alone.sequences.shape[1]
        assert torch.equal(cached.sequences[row, -NEW:], alone.sequences[0, -NEW:])
        assert torch.equal(cached.sequences[row, -width:], alone.sequences[0])  # the row's own ids, unpadded
        torch.testing.assert_close(torch.stack(cached.logits)[:, row], torch.stack(alone.logits)[:, 0], **TOL)


# ``cache_implementation`` values transformers 5.23 builds in generate on a CPU (``"offloaded"`` needs CUDA there;
# ``"quantized"`` needs optimum-quanto, not installed: neither runs on the unpruned model here either).
CACHES = ("dynamic", "static", "sliding_window", "hybrid")


@pytest.mark.parametrize("pruned", CASES, ids=IDS, indirect=True)
def test_cache_implementations_equal_dynamic(pruned):
    family, method, model, processor, _ = pruned
    inputs = encode(family, processor)
    default = greedy(model, inputs)
    for implementation in CACHES:
        assert_same(greedy(model, inputs, cache_implementation=implementation), default)


@pytest.mark.parametrize("pruned", CASES, ids=IDS, indirect=True)
def test_min_new_tokens_with_end_of_sequence(pruned):
    """``eos_token_id`` = the first greedy token, ``min_new_tokens=3``: the end is suppressed for three steps, then
    generation stops at the first end token; cached == uncached (the exact recompute)."""
    family, method, model, processor, _ = pruned
    inputs = encode(family, processor)
    prompt = inputs["input_ids"].shape[1]
    eos = int(greedy(model, inputs, max_new_tokens=1).sequences[0, -1])
    call = dict(eos_token_id=eos, pad_token_id=eos, min_new_tokens=3, max_new_tokens=8)
    out = greedy(model, inputs, **call)
    assert torch.equal(out.sequences[:, :prompt], inputs["input_ids"])
    new = out.sequences[0, prompt:].tolist()
    assert eos not in new[:3] and len(new) >= 3
    assert eos not in new[:-1] and (new[-1] == eos or len(new) == 8)
    assert_same(greedy(model, inputs, use_cache=False, **call), out)


@pytest.mark.parametrize("method", METHODS)
def test_output_shapes_are_the_pruned_lengths(method):
    """``output_attentions`` / ``output_hidden_states`` of a pruned generate cover, per layer, the tokens that layer
    computes (the pruned prompt; after a decoder stage's layer, fewer), as ``handle.last.tokens_per_layer`` says;
    ``output_scores`` / ``output_logits`` have one ``[B, vocab]`` entry per new token, as unpruned (eager attention:
    transformers returns attention weights only from eager kernels)."""
    model, processor = _model("llava", "eager")
    inputs = encode("llava", processor)
    handle = enable_pruning(model, method, keep=KEEP)
    try:
        out = greedy(model, inputs, max_new_tokens=2, output_scores=True, output_attentions=True,
                     output_hidden_states=True)
    finally:
        disable_pruning(model)
    tokens = handle.last.tokens_per_layer
    n_layers = len(model.model.language_model.layers)
    assert len(tokens) == n_layers and len(set(tokens)) == (1 if method == "divprune" else 2)
    assert min(tokens) < inputs["input_ids"].shape[1]
    vocab = model.config.text_config.vocab_size
    assert [s.shape for s in out.scores] == [s.shape for s in out.logits] == [torch.Size([1, vocab])] * 2
    prefill_attn, step_attn = out.attentions
    assert [a.shape[-2:] for a in prefill_attn] == [torch.Size([n, n]) for n in tokens]
    assert [a.shape[-2:] for a in step_attn] == [torch.Size([1, n + 1]) for n in tokens]
    prefill_hidden, step_hidden = out.hidden_states  # the embeddings, then the output of every layer
    assert [h.shape[1] for h in prefill_hidden] == [tokens[0], *tokens]
    assert [h.shape[1] for h in step_hidden] == [1] * (n_layers + 1)


@pytest.mark.parametrize("method", METHODS)
def test_image_text_to_text_pipeline(method):
    """``transformers.pipeline("image-text-to-text")`` with the pruned model and its processor answers as
    ``model.generate`` on the processor's inputs; ``return_tensors=True`` gives the caller's prompt ids + the new ids.
    (LLaVA-1.5: the tiny Qwen models' processor is a stand-in, not a transformers processor a pipeline accepts.)"""
    from transformers import pipeline

    model, processor = _model("llava")
    text = f"USER : <image>\n{QUESTIONS[0]} ASSISTANT :"
    image = random_image(*IMAGES[0][:2], seed=IMAGES[0][2])
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    enable_pruning(model, method, keep=KEEP)
    try:
        inputs = dict(processor(images=image, text=text, return_tensors="pt"))
        expected = greedy(model, inputs, max_new_tokens=4).sequences[0]
        with torch.no_grad():
            answer = pipe(images=image, text=text, max_new_tokens=4, min_new_tokens=4, return_full_text=False)
            ids = pipe(images=image, text=text, max_new_tokens=4, min_new_tokens=4, return_tensors=True)
    finally:
        disable_pruning(model)
    prompt = inputs["input_ids"].shape[1]
    text = processor.tokenizer.decode(expected[prompt:], skip_special_tokens=True)
    assert answer[0]["generated_text"].strip() == text.strip()
    assert torch.equal(ids[0]["generated_token_ids"].reshape(-1), expected)


def test_keep_all_assisted_equals_unpruned():
    """``keep=1.0`` (vision stage): assisted generation (assistant model, prompt lookup) is bit for bit the unpruned
    model's assisted generation."""
    model, processor = _model("llava")
    inputs = encode("llava", processor)
    for extra in assisted_calls("llava").values():
        disable_pruning(model)
        expected = greedy(model, inputs, **extra)
        enable_pruning(model, "divprune", keep=1.0)
        try:
            out = greedy(model, inputs, **extra)
        finally:
            disable_pruning(model)
        assert torch.equal(out.sequences, expected.sequences)
        assert all(torch.equal(a, b) for a, b in zip(out.logits, expected.logits, strict=True))


@pytest.mark.parametrize("pruned", [c for c in CASES if c[1] == "divprune"], ids=["llava", "qwen2_5_vl"],
                         indirect=True)
def test_assisted_generation_on_a_warm_cache_declines(pruned):
    """A follow-up turn on the returned pruned cache, assisted: transformers 5.23's assisted loop feeds the whole
    ids on top of a warm cache (measured: other logits than the plain follow-up, unpruned too), so it is declined at
    the call; the same turn without the assistant stays exact (tests/test_cache_patterns.py)."""
    from transformers import DynamicCache

    family, method, model, processor, _ = pruned
    out = greedy(model, encode(family, processor), past_key_values=DynamicCache(), max_new_tokens=2)
    question = processor.tokenizer(" and the blue square ? ASSISTANT :", return_tensors="pt",
                                   add_special_tokens=False).input_ids
    conversation = torch.cat([out.sequences, question], dim=1)
    for extra in assisted_calls(family).values():
        with pytest.raises(ValueError, match=r"assisted \(\w+=\) and continues a KV cache that already holds"):
            greedy(model, {"input_ids": conversation}, past_key_values=out.past_key_values, **extra)
    follow = greedy(model, {"input_ids": conversation}, past_key_values=out.past_key_values)
    assert torch.equal(follow.sequences[:, : conversation.shape[1]], conversation)


class Recorder:
    """A ``generate`` streamer that keeps what it is given."""

    def __init__(self):
        self.puts: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(1, -1).clone())

    def end(self) -> None:
        self.puts.append(None)


@pytest.mark.parametrize("pruned", CASES, ids=IDS, indirect=True)
def test_streamer_sees_the_callers_ids(pruned):
    """A streamer is given the caller's prompt (not the pruned prompt the model runs on), then each new token, then
    ``end``: what it streams is the returned sequence, on a fresh prompt and on a follow-up turn on the pruned cache."""
    from transformers import DynamicCache

    family, method, model, processor, _ = pruned
    first = Recorder()
    out = greedy(model, encode(family, processor), past_key_values=DynamicCache(), max_new_tokens=2, streamer=first)
    question = processor.tokenizer(" and the blue square ? ASSISTANT :", return_tensors="pt",
                                   add_special_tokens=False).input_ids
    conversation = torch.cat([out.sequences, question], dim=1)
    second = Recorder()
    follow = greedy(model, {"input_ids": conversation}, past_key_values=out.past_key_values, max_new_tokens=2,
                    streamer=second)
    for streamer, result in ((first, out), (second, follow)):
        assert streamer.puts[-1] is None and len(streamer.puts) == 4  # prompt, two tokens, end
        assert torch.equal(torch.cat(streamer.puts[:-1], dim=1), result.sequences)


@pytest.mark.parametrize("pruned", CASES, ids=IDS, indirect=True)
def test_absolute_lengths_count_the_callers_prompt(pruned):
    """``max_length`` / ``min_length`` count the caller's prompt (as without pruning), not the shorter prompt the
    model runs on: ``max_length=prompt + 4`` == ``max_new_tokens=4``; ``min_length=prompt + 3`` with the first
    greedy token as end of sequence == ``min_new_tokens=3`` (as a call and through a ``GenerationConfig``)."""
    from transformers import GenerationConfig

    family, method, model, processor, _ = pruned
    inputs = encode(family, processor)
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad():
        by_total = model.generate(**inputs, do_sample=False, max_length=prompt + 4)
        by_new = model.generate(**inputs, do_sample=False, max_new_tokens=4)
        assert by_total.shape[1] == prompt + 4 and torch.equal(by_total, by_new)
        eos = int(by_new[0, prompt])
        by_new = model.generate(**inputs, do_sample=False, max_new_tokens=6, min_new_tokens=3, eos_token_id=eos,
                                pad_token_id=eos)
        config = GenerationConfig(do_sample=False, max_length=prompt + 6, min_length=prompt + 3, eos_token_id=eos,
                                  pad_token_id=eos)
        by_total = model.generate(**inputs, generation_config=config)
    assert by_new.shape[1] >= prompt + 3 and torch.equal(by_total, by_new)
