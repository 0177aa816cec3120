"""Hypothesis fuzz of the public API: any ``keep``, any image size and aspect ratio, batches of 1-4 prompts with
0-2 images each. Every case either runs and keeps the promised count (``handle.last`` against
:func:`tokenprune.budget.kept_count`) or raises a clear ``ValueError``/``TypeError`` before the model runs.

The models are the small tiny ones, built once per module; ``max_examples`` keeps the file under a minute."""

import functools
import math
import numbers
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import hook_and_attribute_census
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenprune import PruningConfig, disable_pruning, enable_pruning
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS
from tokenprune.tiny_models import random_image, tiny_llava, tiny_llava_next, tiny_qwen

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
WORDS = ("what", "is", "in", "the", "image", "dog", "red", "circle", "blue", "square", "how", "many")
# (family, method, scope): scope "image" on LLaVA-NeXT makes one budget per image for every method
CASES = {
    "llava": [("divprune", None), ("fastervlm", None), ("random", None), ("visionzip", None), ("uniform", None)],
    "llava_next": [("divprune", None), ("fastervlm", "image"), ("visionzip", "image"), ("random", "image")],
    "qwen2_vl": [("divprune", None), ("visiondrop", None), ("random", None)],
}
FUZZ = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@functools.cache
def family(name: str):
    torch.manual_seed(0)
    if name == "llava":
        return tiny_llava(attn_implementation="eager")
    if name == "llava_next":
        return tiny_llava_next(attn_implementation="eager")
    return tiny_qwen("2", attn_implementation="eager")


def valid_keep(keep: object) -> bool:
    """The documented rule, written independently of the library: a real ratio in (0, 1] or an integer >= 1."""
    if isinstance(keep, bool):
        return False
    if isinstance(keep, numbers.Integral):
        return keep >= 1
    if isinstance(keep, numbers.Real) and not isinstance(keep, numbers.Rational):
        return math.isfinite(keep) and 0 < keep <= 1
    return False


ODD_KEEPS = [0, 0.0, -0.0, 1.0, 1, 64, 65, 64.0, 0.5 + 1e-17, 1.0 + 1e-12, 5e-324, math.nan, math.inf, -math.inf,
             -0.5, -3, True, False, None, "0.5", "64", b"1", Fraction(1, 2), np.float64(0.25), np.float32(0.1),
             np.int64(8), np.int32(0), np.uint8(3), np.bool_(True), torch.tensor(0.5), torch.tensor(8), [0.5], (8,),
             {"keep": 0.5}, 10**30]
KEEPS = st.one_of(
    st.sampled_from(ODD_KEEPS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    st.integers(min_value=-5, max_value=300),
    st.integers(min_value=1, max_value=64).map(lambda j: j / 64),  # fractions of N
    st.text(max_size=3),
)


@given(keep=KEEPS, scope=st.sampled_from([None, "image", "crop", "IMAGE", "", 0]))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_any_keep_is_accepted_exactly_when_the_rule_allows_it_and_never_touches_the_model(keep, scope):
    model, _ = family("llava")
    before = hook_and_attribute_census(model)
    good = valid_keep(keep) and scope in (None, "image", "crop")
    try:
        handle = enable_pruning(model, "divprune", keep=keep, scope=scope)
    except (TypeError, ValueError) as err:
        assert not good, f"keep={keep!r}, scope={scope!r} is valid but was refused: {err}"
        assert ("keep" in str(err)) or ("scope" in str(err)), str(err)
        assert hook_and_attribute_census(model) == before  # refused before anything was installed
        return
    assert good, f"keep={keep!r}, scope={scope!r} is invalid but was accepted"
    try:
        assert type(handle.config.keep) in (int, float)  # normalised: a plain number, JSON round trip exact
        assert PruningConfig.from_json(handle.config.to_json()) == handle.config
        assert kept_count(handle.config.keep, 64) == kept_count(keep, 64)
    finally:
        disable_pruning(model)
    assert hook_and_attribute_census(model) == before


def _prompt(family_name: str, n_images: int, words: list[str]) -> str:
    text = " ".join(words) or "what"
    if family_name == "qwen2_vl":
        return f"USER : {QWEN_IMAGE * n_images}{text} ? ASSISTANT :"
    return "USER : " + "<image>\n" * n_images + f"{text} ? ASSISTANT :"


@st.composite
def batches(draw, family_name: str):
    rows = draw(st.integers(1, 4))
    counts = [draw(st.integers(0, 2)) for _ in range(rows)]
    prompts = [_prompt(family_name, c, draw(st.lists(st.sampled_from(WORDS), max_size=6))) for c in counts]
    side = st.integers(8, 200)
    images = [random_image(draw(side), draw(side), seed=draw(st.integers(0, 9))) for _ in range(sum(counts))]
    return prompts, images


def _encode(processor, prompts, images):
    if images:
        return processor(images=images, text=prompts, return_tensors="pt", padding=True)
    return processor(text=prompts, return_tensors="pt", padding=True)


def _candidates(record, method: str) -> int:
    """Tokens one budget covers: LLaVA-NeXT's newline tokens (NaN boxes) only for methods that select them."""
    if record.boxes is None or METHODS[method].newline_candidates:
        return record.n
    return record.n - int(torch.isnan(record.boxes[:, 0]).sum())


def _run_and_check(family_name: str, method: str, scope, keep, batch):
    model, processor = family(family_name)
    prompts, images = batch
    inputs = _encode(processor, prompts, images)
    with torch.no_grad():
        ref = model(**inputs).logits
    handle = enable_pruning(model, method, keep=keep, scope=scope)
    try:
        with torch.no_grad():
            out = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        disable_pruning(model)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    if not images:  # prompts without an image are left untouched
        assert handle.last is None and torch.equal(out, ref)
        return
    record = handle.last
    assert len(record.images) == len(images)
    budgets = [(kept_count(keep, _candidates(image, method)), _candidates(image, method)) for image in record.images]
    full = all(k >= n for k, n in budgets)
    for image, (k, _) in zip(record.images, budgets, strict=True):
        assert image.n_kept == (image.n if full else k), (image.n, k, image.n_kept)
    if full:  # nothing to prune anywhere: bit-identical to the unpruned model
        assert torch.equal(out, ref)
    else:  # every row lost exactly what its images lost; the pruned prompt is as long as its longest row
        mask = inputs["attention_mask"]
        lost = [0] * len(prompts)
        for image in record.images:
            lost[image.row] += image.n - image.n_kept
        lengths = [int(mask[r].sum()) - lost[r] for r in range(len(prompts))]
        assert out.shape[1] == record.seq_len_after == max(lengths)


VALID_KEEPS = st.one_of(
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    st.integers(min_value=1, max_value=80),
    st.sampled_from([1.0, 1, 16, 64, 65, 1 / 64, 0.5, np.int64(7), np.float32(0.3)]),
)


@pytest.mark.parametrize("family_name", sorted(CASES))
@given(data=st.data(), keep=VALID_KEEPS)
@FUZZ
def test_random_batches_keep_the_promised_count(family_name, data, keep):
    method, scope = data.draw(st.sampled_from(CASES[family_name]), label="method")
    batch = data.draw(batches(family_name), label="batch")
    _run_and_check(family_name, method, scope, keep, batch)


@pytest.mark.parametrize("family_name, method, scope, keep, batch", [
    # a row without an image used to hold the pruned batch at its unpruned length (its padding was kept)
    ("llava", "divprune", None, 0.5, (["USER : what ? ASSISTANT :", "USER : <image>\nwhat ? ASSISTANT :"],
                                      [random_image(8, 8)])),
    # a budget covering every candidate keeps LLaVA-NeXT's newline tokens too; the record used to say they went
    ("llava_next", "fastervlm", "image", 32, (["USER : <image>\nwhat ? ASSISTANT :"], [random_image(8, 8)])),
], ids=["padding-of-a-text-only-row", "llava-next-full-budget-record"])
def test_cases_the_fuzzer_found(family_name, method, scope, keep, batch):
    _run_and_check(family_name, method, scope, keep, batch)
