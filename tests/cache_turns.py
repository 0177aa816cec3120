"""What the cache-pattern test files share (tests/test_cache_patterns.py: the family x method matrix;
tests/test_cache_new_image.py: a new image in a later turn on every family): the real-depth models, the two-row
conversation, greedy generation with logits, "a chunk == the same tokens fed one at a time", and the turn that
brings a new image."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from tokenprune.catalog import unsupported_reason
from tokenprune.methods import METHODS, TEXT_EMBEDDINGS
from tokenprune.patches import ADAPTERS, pruned_cache
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

FAMILIES = ("llava", "qwen2_5_vl", "llava_next", "qwen2_vl")  # the matrix's families (every method runs there)
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


@functools.cache
def matrix_model(family: str):
    """The real-depth model the matrix of tests/test_cache_patterns.py prunes (one per family and process)."""
    return real_depth(family)


@functools.cache
def own_model(family: str):
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
