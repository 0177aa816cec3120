"""The FLOPs/KV calculator reproduces the published tables (PyramidDrop Tab. 1, FastV, DART)."""

import pytest

from tokenprune.budget.flops import (
    ModelShape,
    decode_flops,
    kv_bytes,
    kv_bytes_per_token,
    layer_flops,
    parse_schedule,
    prefill_flops,
    preset,
)


def tflops(model, schedule, formula="pdrop"):
    shape = preset(model)
    return prefill_flops(shape, parse_schedule(schedule, shape.num_layers), formula) / 1e12


@pytest.mark.parametrize("model, schedule, published", [
    ("llava-1.5-7b", "576", 3.82),                       # PyramidDrop Table 1: vanilla
    ("llava-1.5-7b", "576x2,288x30", 2.01),              # FastV K=2 R=50%
    ("llava-1.5-7b", "576x8,288x8,144x8,72x8", 1.78),    # PyramidDrop [8,16,24], lambda=0.5
    ("llava-next-7b", "2880", 20.8),
    ("llava-next-7b", "2880x2,1440x30", 10.6),
    ("llava-next-7b", "2880x8,1440x8,720x8,360x8", 9.5),
])
def test_published_table_within_half_a_percent(model, schedule, published):
    assert tflops(model, schedule) == pytest.approx(published, rel=0.005)


@pytest.mark.parametrize("schedule, ours", [
    ("576", 3.817), ("576x2,288x30", 2.007), ("576x8,288x8,144x8,72x8", 1.777),
    ("576x3,300x4,200x9,110x16", 1.329), ("576x3,303x4,110x9,36x16", 0.924), ("576x3,66x4,30x9,17x16", 0.521),
    ("576x2,192x30", 1.413), ("576x2,64x30", 0.628), ("64", 0.416), ("576x7,504x2,360x3,72x20", 1.557),
    ("576x2,132x30", 1.044),
])
def test_spec_validation_cells(schedule, ours):
    assert round(tflops("llava-1.5-7b", schedule), 3) == ours


def test_fastv_own_ratios_with_its_formula():
    """FastV counts 35 system + 576 image tokens with the 2-matrix FFN: 57% (7B, K=3) and 45% cut (13B, K=2)."""
    assert tflops("llava-1.5-7b", "611x3,323x29", "fastv") / tflops("llava-1.5-7b", "611", "fastv") == \
        pytest.approx(0.566, abs=5e-4)
    assert tflops("llava-1.5-13b", "611x2,323x38", "fastv") / tflops("llava-1.5-13b", "611", "fastv") == \
        pytest.approx(0.546, abs=5e-4)


def test_kv_cache_figures():
    s7, s13, qwen = preset("llava-1.5-7b"), preset("llava-1.5-13b"), preset("qwen2-vl-7b")
    assert kv_bytes_per_token(s7) == 512 * 1024 and kv_bytes_per_token(s13) == 800 * 1024
    assert kv_bytes_per_token(qwen) == kv_bytes_per_token(preset("qwen2.5-vl-7b")) == 56 * 1024
    assert kv_bytes(s7, 576) / 1e6 == pytest.approx(302, rel=0.005)
    assert kv_bytes(preset("llava-next-7b"), 2880) / 1e9 == pytest.approx(1.51, rel=0.005)
    assert kv_bytes(preset("llava-next-7b"), 320) / 1e6 == pytest.approx(168.0, rel=0.005)  # DART Table 2
    assert kv_bytes(qwen, 1000) / 1e6 == pytest.approx(57, rel=0.01)
    assert kv_bytes(s7, 576, bytes_per_value=4) == 2 * kv_bytes(s7, 576)
    assert kv_bytes(s7, [576] * 2 + [288] * 30) == kv_bytes_per_token(s7) // 32 * (576 * 2 + 288 * 30)


def test_exact_formula_is_gqa_aware():
    s7, qwen = preset("llava-1.5-7b"), preset("qwen2-vl-7b")
    assert layer_flops(s7, 700, "exact") == layer_flops(s7, 700, "pdrop")  # multi-head: identical
    n, d, m = 700, 3584, 18944
    assert layer_flops(qwen, n, "exact") == 2 * n * d * d + 2 * n * d * 512 + 2 * n * n * d + 3 * n * d * m
    assert layer_flops(qwen, n, "exact") < layer_flops(qwen, n, "pdrop")


def test_decode_flops_follow_todre():
    """Per token and layer: 4d^2 + 2dm + 2d(n + t - 1) with a 2-matrix FFN; the cache length is the only term
    pruning changes."""
    s = preset("llava-1.5-7b")
    d, m = 4096, 11008
    assert decode_flops(s, 600, "fastv") == 32 * (4 * d * d + 2 * d * m + 2 * d * 601)
    assert decode_flops(s, 600, "pdrop") - decode_flops(s, 100, "pdrop") == 32 * 2 * d * 500


def test_schedule_parsing_and_errors():
    assert parse_schedule("576x2,288x3") == [576, 576, 288, 288, 288]
    assert parse_schedule("64", 4) == [64] * 4 and parse_schedule("10*2,5x2", 4) == [10, 10, 5, 5]
    with pytest.raises(ValueError, match="576x2,288x30"):
        parse_schedule("576y2")
    with pytest.raises(ValueError, match="32 layers"):
        prefill_flops(preset("llava-1.5-7b"), [576] * 31)
    with pytest.raises(ValueError, match="presets: llava-1.5-7b"):
        preset("llava-9b")
    with pytest.raises(ValueError, match="unknown FLOPs formula"):
        layer_flops(preset("llava-1.5-7b"), 1, "f4")


def test_shape_from_a_transformers_config():
    from tokenprune.tiny_models import tiny_llava

    model, _ = tiny_llava()
    shape = ModelShape.from_config(model.config)
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_heads, shape.num_kv_heads,
            shape.d_head) == (128, 256, 2, 4, 2, 32)
    assert preset("llava-1.5-7b").with_layers(2).num_layers == 2
