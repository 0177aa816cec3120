"""The released Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE shapes: real-depth models (depths, DeepStack
indexes, layer types) running methods at their default layers, and the FLOPs and KV-cache counts (only the active
experts of a mixture; Qwen3.5's Gated DeltaNet layers as linear attention)."""

import pytest
import torch
from conftest import left_clean
from qwen3_cases import GEN, METHODS, PROMPT

from tokenprune import disable_pruning, enable_pruning
from tokenprune.tiny_models import random_image
from tokenprune.tiny_qwen3 import QWEN3_FAMILIES, tiny_qwen3

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("family", QWEN3_FAMILIES)
def test_real_depth_models_have_the_released_depths_and_run_methods_at_their_default_layers(family):
    from tokenprune.real_depth import real_depth

    model, processor = real_depth(family, "sdpa")
    config = model.config
    assert len(model.model.visual.blocks) == 27
    layers = {"qwen3_vl": 36, "qwen3_vl_moe": 48, "qwen3_5": 32, "qwen3_5_moe": 40}[family]
    assert len(model.model.language_model.layers) == layers
    if family.startswith("qwen3_vl"):
        assert list(config.vision_config.deepstack_visual_indexes) == [8, 16, 24]
    else:
        full = [i for i, t in enumerate(config.text_config.layer_types) if t == "full_attention"]
        assert full == list(range(3, layers, 4))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    for method in METHODS:  # every vision-stage method at its default (paper) layers
        handle = enable_pruning(model, method, keep=0.25)
        with torch.no_grad():
            model(**one)
        assert handle.last.n_kept == 3
        disable_pruning(model)
    # FastV's default K=2: on Qwen3-VL before the last DeepStack addition (after LLM layers 0, 1, 2); on Qwen3.5
    # scored at full-attention layer 3 and pruned from 4
    handle = enable_pruning(model, "fastv", keep=0.5)
    with torch.no_grad():
        cached = model.generate(**one, **GEN)
        assert torch.equal(cached, model.generate(**one, **GEN, use_cache=False))
    pruned = 2 if family.startswith("qwen3_vl") else 4
    assert handle.last.tokens_per_layer[pruned - 1] > handle.last.tokens_per_layer[pruned]
    disable_pruning(model)
    assert left_clean(model)


def test_flops_count_active_experts_only():
    from tokenprune.budget.flops import ModelShape, prefill_flops, preset

    model, _ = tiny_qwen3("qwen3_vl_moe")  # 4 experts of width 64, 2 active
    shape = ModelShape.from_config(model.config)
    assert shape.intermediate_size == 2 * 64 and shape.num_layers == 2
    dense = ModelShape.from_config(tiny_qwen3("qwen3_vl")[0].config)
    assert dense.intermediate_size == 256
    moe = preset("qwen3-vl-30b-a3b")
    assert moe.intermediate_size == 8 * 768 and moe.num_kv_heads == 4 and moe.num_layers == 48
    assert prefill_flops(moe, 1000) < prefill_flops(preset("qwen3-vl-8b"), 1000)  # ~3B active vs 8B


def test_flops_count_qwen3_5_linear_attention_layers_from_their_modules():
    """Qwen3.5's Gated DeltaNet layers are counted as linear attention: every ``nn.Linear`` of the layer once per
    token, the depthwise conv, the delta-rule state (3 d_k d_v per value head and token), no n^2 term; its gated
    full-attention layers add the n^2 term to their Linears (q_proj includes the output gate). KV bytes: what the
    attention layers' cache really holds."""
    from tokenprune.budget.flops import ModelShape, kv_bytes, layer_flops, prefill_flops, preset

    model, processor = tiny_qwen3("qwen3_5")
    shape = ModelShape.from_config(model.config)
    n = 10
    for i, layer in enumerate(model.model.language_model.layers):
        macs = n * sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
        if shape.is_linear(i):
            _, value_heads, d_k, d_v, _ = shape.linear_attention
            state = 3 * n * value_heads * d_k * d_v
            assert layer_flops(shape, n, layer=i) == macs + n * layer.linear_attn.conv1d.weight.numel() + state
            assert layer_flops(shape, 2 * n, layer=i) == 2 * layer_flops(shape, n, layer=i)
        else:
            assert layer_flops(shape, n, layer=i) == macs + 2 * n * n * shape.num_heads * shape.d_head
    assert [shape.is_linear(i) for i in range(4)] == [True, True, True, False]
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    with torch.no_grad():
        cache = model(**one, use_cache=True).past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers if hasattr(layer, "get_seq_length")
               for t in (layer.keys, layer.values))
    assert held == kv_bytes(shape, one["input_ids"].shape[1], bytes_per_value=4) > 0
    moe = preset("qwen3.5-35b-a3b")
    assert sum(not moe.is_linear(i) for i in range(40)) == 10 and moe.intermediate_size == 8 * 512 + 512
    dense_stack = ModelShape(**{**moe.__dict__, "layer_types": None})  # every layer counted as full attention
    assert prefill_flops(moe, 4000) < prefill_flops(dense_stack, 4000)
    assert moe.with_layers(8).layer_types == moe.layer_types[:8]
