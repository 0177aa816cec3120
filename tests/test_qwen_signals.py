"""Qwen ViT signals from the probe equal the same quantities computed from HF's own eager attention weights."""

import sys

import pytest
import torch

from tokenprune.methods import ATTENTION_RECEIVED, VISION_HIDDEN, SignalRequest
from tokenprune.patches.qwen_signals import QwenProbe
from tokenprune.tiny_models import random_image, tiny_qwen


def _reference_received(weights, grid_thw, visual):
    """Per merged token in raster order: mean over heads and query rows, mean over the 2x2 unit (HF's weights)."""
    rows = torch.cat([w[0].float().mean(dim=(0, 1)) for w in weights])  # per key row, segment by segment
    units = rows.reshape(-1, 4).mean(dim=1)
    if hasattr(visual, "window_size"):
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid_thw, 2, visual.window_size, visual.patch_size)
        units = units[torch.argsort(window_index)]
    return units


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("block", [0, 1])
def test_attention_received_matches_eager_weights(version, block, monkeypatch):
    model, processor = tiny_qwen(version, "eager")
    visual = model.model.visual
    inputs = processor(text=["<|image_pad|><|image_pad|>"],
                       images=[random_image(112, 168, seed=1), random_image(56, 84, seed=2)])
    grid = inputs["image_grid_thw"]
    module = sys.modules[type(visual.blocks[block].attn).__module__]
    captured = []
    original = module.eager_attention_forward

    def recording(attn, *args, **kwargs):
        out, weights = original(attn, *args, **kwargs)
        if attn is visual.blocks[block].attn:
            captured.append(weights)
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    requests = [SignalRequest(ATTENTION_RECEIVED, block), SignalRequest(VISION_HIDDEN)]
    with torch.no_grad(), QwenProbe(visual, requests, grid) as probe:
        out = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
    items = probe.per_item()
    expected = _reference_received(captured, grid, visual)
    got = torch.cat([item[f"{ATTENTION_RECEIVED}@{block}"] for item in items])
    assert got.shape == (sum(f.shape[0] for f in out.pooler_output),)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if version == "2.5" and block == 0:  # windowed block: the raster order really differs from the window order
        assert len(captured) > 2
    hidden = [item[VISION_HIDDEN] for item in items]
    assert [h.shape[0] for h in hidden] == [f.shape[0] for f in out.pooler_output]


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_vision_hidden_is_in_raster_order(version):
    """The merger applied to the probe's un-permuted rows reproduces HF's (un-permuted) merged features."""
    model, processor = tiny_qwen(version, "sdpa")
    visual = model.model.visual
    inputs = processor(text=["<|image_pad|>"], images=[random_image(112, 168, seed=3)])
    grid = inputs["image_grid_thw"]
    captured = {}
    hook = visual.blocks[-1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
    with torch.no_grad(), QwenProbe(visual, [SignalRequest(VISION_HIDDEN)], grid) as probe:
        out = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
    hook.remove()
    (item,) = probe.per_item()
    with torch.no_grad():
        merged = visual.merger(captured["h"])  # window order for 2.5
        if version == "2.5":
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
            assert not torch.equal(window_index, torch.arange(window_index.numel()))
            merged = merged[torch.argsort(window_index)]
    torch.testing.assert_close(merged, out.pooler_output[0])
    rows = captured["h"].reshape(-1, 4, captured["h"].shape[-1]).mean(1)
    if version == "2.5":
        rows = rows[torch.argsort(window_index)]
    torch.testing.assert_close(item[VISION_HIDDEN], rows.float())
