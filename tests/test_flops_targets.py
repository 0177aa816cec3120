"""``flops=`` budgets: the largest budget whose estimated LLM prefill FLOPs stay within the target."""

import json

import pytest
import torch
from conftest import OTHER_PROMPT, PROMPT, TWO_IMAGES, encode

from tokenprune import PruningConfig, disable_pruning, enable_pruning
from tokenprune.budget import split_count, validate_flops
from tokenprune.tiny_models import random_image, tiny_llava


def macs(cfg, n):
    """One prompt of ``n`` tokens through the tiny LLM, written out independently of tokenprune.budget.flops."""
    t = cfg.text_config
    d, m, heads, kv = t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads
    dh = d // heads
    return t.num_hidden_layers * (2 * n * d * heads * dh + 2 * n * d * kv * dh + 2 * n * n * heads * dh + 3 * n * d * m)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.mark.parametrize("method", ["divprune", "fastervlm", "random"])
@pytest.mark.parametrize("target", [0.2, 0.35, 0.5, 0.8])
def test_flops_target_is_met_by_the_largest_budget(model, method, target):
    llava, processor = model
    inputs = encode(processor, [PROMPT], [random_image(80, 96, seed=1)])
    handle = enable_pruning(llava, method, flops=target)
    try:
        with torch.no_grad():
            llava(**inputs)
    finally:
        disable_pruning(llava)
    rec = handle.last
    n, k, length = rec.images[0].n, rec.n_kept, rec.seq_len_before
    text = length - n
    assert rec.seq_len_after == text + k
    full = macs(llava.config, length)
    assert rec.tflops_unpruned == pytest.approx(full / 1e12, rel=1e-12)
    assert rec.tflops_pruned == pytest.approx(macs(llava.config, text + k) / 1e12, rel=1e-12)
    assert rec.tflops_pruned <= target * rec.tflops_unpruned
    assert macs(llava.config, text + k + 1) > target * full  # one more token would exceed the target


def test_batch_rows_are_solved_separately_and_images_share_a_row(model):
    llava, processor = model
    images = [random_image(64, 64, seed=s) for s in range(4)]
    inputs = encode(processor, [PROMPT, TWO_IMAGES, OTHER_PROMPT], images)
    handle = enable_pruning(llava, "divprune", flops=0.3)
    try:
        with torch.no_grad():
            llava(**inputs)
    finally:
        disable_pruning(llava)
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    total_unpruned = total_pruned = 0
    for row, length in enumerate(lengths):
        ims = [im for im in handle.last.images if im.row == row]
        n, k = sum(im.n for im in ims), sum(im.n_kept for im in ims)
        text = length - n
        assert macs(llava.config, text + k) <= 0.3 * macs(llava.config, length) < macs(llava.config, text + k + 1)
        assert max(im.n_kept for im in ims) - min(im.n_kept for im in ims) <= 1  # shared evenly
        total_unpruned += macs(llava.config, length)
        total_pruned += macs(llava.config, text + k)
        # the same prompt alone gets the same budget
        alone = enable_pruning(llava, "divprune", flops=0.3)
        prompt = [PROMPT, TWO_IMAGES, OTHER_PROMPT][row]
        own = images[:1] if row == 0 else images[1:3] if row == 1 else images[3:]
        with torch.no_grad():
            llava(**encode(processor, [prompt], own))
        disable_pruning(llava)
        assert [im.n_kept for im in alone.last.images] == [im.n_kept for im in ims]
    assert handle.last.tflops_unpruned == pytest.approx(total_unpruned / 1e12)
    assert handle.last.tflops_pruned == pytest.approx(total_pruned / 1e12)


def test_flops_one_keeps_everything_and_tiny_targets_warn(model, one_prompt_tiny):
    llava, _ = model
    with torch.no_grad():
        reference = llava(**one_prompt_tiny).logits
        handle = enable_pruning(llava, "divprune", flops=1.0)
        logits = llava(**one_prompt_tiny).logits
        disable_pruning(llava)
        assert torch.equal(logits, reference) and handle.last.flops_ratio == 1.0
        enable_pruning(llava, "divprune", flops=0.01)
        with pytest.warns(UserWarning, match="one visual token per image already exceeds"):
            llava(**one_prompt_tiny)
        disable_pruning(llava)


@pytest.fixture
def one_prompt_tiny(model):
    return encode(model[1], [PROMPT], [random_image(80, 96, seed=1)])


def test_keep_budgets_also_get_an_estimate(model, one_prompt_tiny):
    llava, _ = model
    handle = enable_pruning(llava, "divprune", keep=16)
    with torch.no_grad():
        llava.generate(**one_prompt_tiny, max_new_tokens=2, do_sample=False)
    disable_pruning(llava)
    length = one_prompt_tiny["input_ids"].shape[1]
    assert handle.last.tflops_pruned == pytest.approx(macs(llava.config, length - 64 + 16) / 1e12)


def test_config_round_trips_with_flops_and_rejects_two_budgets(model):
    cfg = PruningConfig("divprune", flops=0.25)
    assert json.loads(cfg.to_json()) == {"method": "divprune", "flops": 0.25, "options": {}}
    assert PruningConfig.from_json(cfg.to_json()) == cfg and PruningConfig.from_dict(cfg.to_dict()).keep is None
    handle = enable_pruning(model[0], cfg)
    assert "flops=0.25" in repr(handle)
    disable_pruning(model[0])
    for kwargs in ({"keep": 0.5, "flops": 0.5}, {}):
        with pytest.raises(TypeError, match="exactly one budget|needs keep= .* or flops="):
            enable_pruning(model[0], "divprune", **kwargs)
    with pytest.raises(TypeError, match="exactly one budget"):
        PruningConfig.from_dict({"method": "divprune", "keep": 0.5, "flops": 0.5})
    for bad, exc in ((0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), (True, TypeError),
                     ("0.2", TypeError)):
        with pytest.raises(exc, match="flops"):
            validate_flops(bad)


@pytest.mark.parametrize("total, sizes, expected", [
    (10, [64], [10]), (11, [64, 64], [6, 5]), (3, [100, 1, 1], [1, 1, 1]), (1, [5, 5], [1, 1]),
    (50, [10, 90], [5, 45]), (200, [10, 90], [10, 90]), (7, [2, 9], [1, 6]), (9, [3, 3, 3], [3, 3, 3]),
])
def test_split_count(total, sizes, expected):
    counts = split_count(total, sizes)
    assert counts == expected
    assert all(1 <= c <= n for c, n in zip(counts, sizes, strict=True))
