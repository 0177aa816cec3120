"""Composition (a vision stage then a decoder stage) through enable_pruning and PruningConfig."""

import pytest
import torch

from tokenprune import PruningConfig, disable_pruning, enable_pruning
from tokenprune.methods import METHODS, DivPrune, FastV, TwoStageMethod
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava, tiny_qwen

GEN = dict(max_new_tokens=4, do_sample=False)


def test_config_round_trips_stage_lists():
    config = PruningConfig(["divprune", "fastv"], [0.5, 0.25], [{}, {"k": 3}])
    assert config.method == ("divprune", "fastv") and config.keep == (0.5, 0.25)
    assert PruningConfig.from_json(config.to_json()) == config
    assert PruningConfig.from_dict(config.to_dict()).build_method()[1].k == 3
    assert PruningConfig(["divprune", "fastv"], 0.5).keep == (0.5, 0.5)
    with pytest.raises(ValueError, match="one vision-stage method followed by one decoder-stage"):
        PruningConfig(["fastv", "divprune"], 0.5)
    with pytest.raises(ValueError, match="one vision-stage"):
        PruningConfig(["divprune", "random"], 0.5)
    with pytest.raises(ValueError, match="one keep"):
        PruningConfig(["divprune", "fastv"], [0.5])


@pytest.mark.parametrize("family", ["llava", "qwen2.5"])
def test_vision_then_decoder_stage(family):
    if family == "llava":
        model, processor = tiny_llava(LlavaSize(text_layers=4))
        prompt = "USER : <image>\nwhat is in the image ? ASSISTANT :"
        inputs = processor(images=[random_image(80, 96, seed=1)], text=[prompt], return_tensors="pt")
    else:
        model, processor = tiny_qwen("2.5", text_layers=4)
        prompt = "USER : <|vision_start|><|image_pad|><|vision_end|>what is in the image ? ASSISTANT :"
        inputs = processor(text=[prompt], images=[random_image(84, 140, seed=1)])
    with torch.no_grad():
        vision = enable_pruning(model, "divprune", keep=0.5)
        model(**inputs)
        vision_kept = vision.last.images[0].kept
        disable_pruning(model)
        handle = enable_pruning(model, [DivPrune(), FastV(k=2)], keep=[0.5, 0.5])
        out = model(**inputs)
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    assert torch.equal(cached, uncached) and torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    record = handle.last
    n = record.images[0].n
    after_vision = round(0.5 * n + 1e-9)
    assert record.method == "divprune+fastv"
    final = round(0.5 * after_vision + 1e-9)
    assert record.visual_per_layer == (after_vision, after_vision, final, final)  # FastV K=2 of 4 layers
    assert bool(torch.isin(record.images[0].kept, vision_kept).all())  # composed: original image indices
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == list(record.tokens_per_layer)
    assert "DivPrune" not in repr(handle) and "divprune(" in repr(handle) and "fastv(" in repr(handle)
    with pytest.raises(TypeError, match="instances"):
        enable_pruning(model, ["divprune", "fastv"], keep=0.5, k=3)
    disable_pruning(model)


class _DivThenFastV(TwoStageMethod):
    """A test two-stage method: DivPrune keeps half, FastV (K=2) then keeps half of those: one keep, split evenly."""

    name = "testtwostage"
    paper = "test"

    def stages(self):
        return DivPrune(), FastV(k=2)

    def stage_keeps(self, keep):
        return keep**0.5, keep**0.5


def test_two_stage_method_installs_what_its_stage_list_would(monkeypatch):
    monkeypatch.setitem(METHODS, _DivThenFastV.name, _DivThenFastV)  # configs resolve methods by name
    model, processor = tiny_llava(LlavaSize(text_layers=4))
    prompt = "USER : <image>\nwhat is in the image ? ASSISTANT :"
    inputs = processor(images=[random_image(80, 96, seed=1)], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        listed = enable_pruning(model, ["divprune", "fastv"], keep=[0.5, 0.5])
        expected = model(**inputs).logits
        expected_counts = listed.last.visual_per_layer
        disable_pruning(model)
        two = enable_pruning(model, _DivThenFastV(), keep=0.25)
        got = model(**inputs).logits
    assert two.last.visual_per_layer == expected_counts and expected_counts[-1] < expected_counts[0]
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="use it alone"):
        enable_pruning(model, [_DivThenFastV(), FastV()], keep=0.5)
    with pytest.raises(ValueError, match="keep= budget instead"):
        enable_pruning(model, _DivThenFastV(), flops=0.5)
    disable_pruning(model)
