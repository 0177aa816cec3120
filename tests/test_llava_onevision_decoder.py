"""Decoder-stage and two-stage methods on a tiny LLaVA-OneVision (eager and sdpa; the LLaVA decoder loop on the Qwen2
LLM): keep=1.0, cache and padded batches on a 4-LLM-layer model; every method at its default layers on the real-depth
one (SigLIP 26 layers, Qwen2 28). The vision stage: tests/test_llava_onevision.py."""

import pytest
import torch
from conftest import (
    DECODER_OPTIONS,
    assert_keep_all_is_unpruned,
    assert_rows_match_alone,
    cached_model,
    decoder_methods,
    generate_cached_and_uncached,
    generate_cached_and_uncached_logits,
    left_clean,
    two_stage_methods,
)
from onevision_cases import DECLINES, GEN, METHODS, OTHER, PROMPT, both

from tokenprune import disable_pruning, enable_pruning
from tokenprune.tiny_models import random_image
from tokenprune.tiny_onevision import tiny_onevision

_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


DECODER_METHODS = [m for m in decoder_methods() + two_stage_methods() if m not in DECLINES]
OPTIONS = {**DECODER_OPTIONS, "pdrop": {"layers": (1, 2, 3)}}


@pytest.fixture
def deep_ov(attn):
    """4 LLM layers, so that every decoder method prunes at least once with small layer options."""
    yield from cached_model(_MODELS, (attn, "decoder"), lambda: tiny_onevision(attn, text_layers=4))


def _enable_decoder(model, method, keep):
    return enable_pruning(model, method, keep=keep, **OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_keep_all_bit_identical_and_cache_consistent(deep_ov, method):
    model, processor = deep_ov
    inputs = both(processor, size=(40, 70))
    assert_keep_all_is_unpruned(model, inputs, lambda: _enable_decoder(model, method, 1.0), **GEN)
    handle = _enable_decoder(model, method, 0.5)
    generate_cached_and_uncached_logits(model, inputs, **GEN)
    assert handle.last.visual_per_layer[-1] < handle.last.n_visual


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_padded_batch_rows_match_each_prompt_alone(deep_ov, method):
    model, processor = deep_ov
    prompts, images = [PROMPT, OTHER], [random_image(120, 120, seed=1), random_image(40, 70, seed=2)]
    _enable_decoder(model, method, 0.4)
    rows = [processor(text=[prompt], images=[image]) for prompt, image in zip(prompts, images, strict=True)]
    batch = processor(text=prompts, images=images)
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)


def test_real_depth_model_runs_every_method_at_its_default_layers():
    """SigLIP 26 layers and a 28-layer Qwen2 (LLaVA-OneVision-7B): every method at its paper's layers."""
    from tokenprune.real_depth import real_depth

    model, processor = real_depth("llava_onevision", "sdpa")
    assert len(model.model.vision_tower.encoder.layers) == 26
    assert len(model.model.language_model.layers) == 28
    inputs = both(processor, size=(40, 70))
    for method in METHODS + DECODER_METHODS:
        handle = enable_pruning(model, method, keep=0.25)
        with torch.no_grad():
            if method in DECODER_METHODS:
                cached = model.generate(**inputs, **GEN)
                assert torch.equal(cached, model.generate(**inputs, **GEN, use_cache=False)), method
            else:
                model(**inputs)
        assert min(handle.last.visual_per_layer) < 94 + 13, method  # 40x70 image: 94 tokens; video: 13
        disable_pruning(model)
    assert left_clean(model)
