"""The probe's signals equal the same quantities from an eager ``output_attentions``/``output_hidden_states`` run."""

import pytest
import torch
from conftest import PROMPT, encode

from tokenprune.methods import (
    ATTENTION_MAP,
    ATTENTION_RECEIVED,
    CLS_ATTENTION,
    CLS_ATTENTION_WIDE,
    CLS_HIDDEN,
    SIGNALS,
    VISION_HIDDEN,
    VISION_KEYS,
    SignalRequest,
)
from tokenprune.patches.clip_signals import PROBE_SIGNALS, ClipProbe, encoder_layers
from tokenprune.tiny_models import random_image, tiny_llava

REQUESTS = [SignalRequest(name) for name in sorted(PROBE_SIGNALS)] + [SignalRequest(ATTENTION_RECEIVED, 0)]


@pytest.fixture(scope="module")
def tower_and_pixels():
    model, processor = tiny_llava(attn_implementation="sdpa", seed=3)
    images = [random_image(80, 96, seed=1), random_image(60, 60, seed=2)]
    pixels = encode(processor, [PROMPT, PROMPT], images)["pixel_values"]
    return model.model.vision_tower, pixels


def _eager_reference(tower, pixels):
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(pixels, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation("sdpa")


def test_every_probe_signal_matches_the_eager_maps(tower_and_pixels):
    tower, pixels = tower_and_pixels
    feature_layer = len(encoder_layers(tower)) - 2  # vision_feature_layer = -2
    with ClipProbe(tower, REQUESTS, feature_layer) as probe, torch.no_grad():
        tower(pixels)
    rows = probe.per_image(drop_cls=True)
    ref = _eager_reference(tower, pixels)
    attn = ref.attentions[feature_layer].float()  # [B, H, T, T]
    layer = encoder_layers(tower)[feature_layer]
    keys = layer.self_attn.k_proj(layer.layer_norm1(ref.hidden_states[feature_layer])).detach()  # [B, T, D]
    heads = layer.self_attn.num_heads
    q = layer.self_attn.q_proj(layer.layer_norm1(ref.hidden_states[feature_layer])).detach()
    wide = torch.softmax(q[:, :1] @ keys.transpose(-1, -2) / keys.shape[-1] ** 0.5, dim=-1)[:, 0]
    close = dict(rtol=1e-5, atol=1e-5)
    assert len(rows) == 2
    for b, row in enumerate(rows):
        torch.testing.assert_close(row[CLS_ATTENTION], attn[b, :, 0, 1:], **close)
        torch.testing.assert_close(row[ATTENTION_RECEIVED], attn[b].mean(0).mean(0)[1:], **close)
        torch.testing.assert_close(row[f"{ATTENTION_RECEIVED}@0"], ref.attentions[0][b].mean(0).mean(0)[1:], **close)
        torch.testing.assert_close(row[ATTENTION_MAP], attn[b].mean(0)[1:, 1:], **close)
        torch.testing.assert_close(row[VISION_HIDDEN], ref.hidden_states[feature_layer + 1][b, 1:], **close)
        torch.testing.assert_close(row[CLS_HIDDEN], ref.hidden_states[feature_layer + 1][b, 0], **close)
        expected_keys = keys[b].view(keys.shape[1], heads, -1).transpose(0, 1)[:, 1:]
        torch.testing.assert_close(row[VISION_KEYS], expected_keys, **close)
        torch.testing.assert_close(row[CLS_ATTENTION_WIDE], wide[b, 1:], **close)
    assert not torch.allclose(attn[0, :, 0], ref.attentions[-1][0, :, 0].float())  # the layer matters


def test_probe_keeps_cls_for_the_full_strategy_and_removes_its_hooks(tower_and_pixels):
    tower, pixels = tower_and_pixels
    before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tower.modules())
    with ClipProbe(tower, [SignalRequest(CLS_ATTENTION), SignalRequest(VISION_HIDDEN)], 1) as probe:
        # the attention module's hook, the key projection's (keeps the tower's keys), the layer's output hook
        assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tower.modules()) == before + 3
        with torch.no_grad():
            tower(pixels)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in tower.modules()) == before
    row = probe.per_image(drop_cls=False)[0]
    assert row[CLS_ATTENTION].shape[-1] == row[VISION_HIDDEN].shape[0] == pixels.shape[-1] ** 2 // 64 + 1


@pytest.mark.parametrize("name", [ATTENTION_RECEIVED, ATTENTION_MAP, VISION_KEYS])
def test_full_row_signals_reuse_the_towers_own_projections(tower_and_pixels, name):
    """Every-query-row signals (HiPrune, FoPru, VFlowOpt) and keys read the q/k the tower computes anyway: each
    projection of the probed layer runs once per forward, as without the probe (no second projection pass)."""
    tower, pixels = tower_and_pixels
    attention = encoder_layers(tower)[0].self_attn
    calls = {"q": 0, "k": 0}

    def counter(part):
        def hook(module, args, output):
            calls[part] += 1
        return hook

    handles = [attention.q_proj.register_forward_hook(counter("q")),
               attention.k_proj.register_forward_hook(counter("k"))]
    try:
        with ClipProbe(tower, [SignalRequest(name, 0)], 1) as probe, torch.no_grad():
            tower(pixels)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"q": 1, "k": 1}
    assert probe.per_image()[0][f"{name}@0"].shape[-1 if name != VISION_KEYS else -2] == pixels.shape[-1] ** 2 // 64


def test_out_of_range_layer_is_a_clear_error(tower_and_pixels):
    tower, _ = tower_and_pixels
    with pytest.raises(ValueError, match="vision tower has 3 layers"):
        ClipProbe(tower, [SignalRequest(ATTENTION_RECEIVED, 8)], 1)


def test_all_probe_signals_are_documented_signals():
    assert PROBE_SIGNALS <= set(SIGNALS)
