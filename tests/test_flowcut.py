"""FlowCut on LLaVA-1.5: the encoder loop against an independent reference, fewer tokens in later layers, and
clear refusals on the families it does not run on. (The LLaVA matrix in test_llava.py runs it end to end.)"""

import pytest
import torch
from conftest import PROMPT, TWO_IMAGES, encode
from flowcut_reference import flowcut_reference, sharpen_vision_attention

from tokenprune import enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava, tiny_llava_next

DEEP = LlavaSize(vision_layers=8)  # feature layer 6: prune steps after layers 1, 3, 5 (forced)


@pytest.fixture
def deep(attn):
    model, processor = tiny_llava(DEEP, attn_implementation=attn)
    sharpen_vision_attention(model, 8.0)
    return model, processor


def layer_lengths(model):
    """Sequence length seen by each vision encoder layer, per call, via forward pre-hooks (removed by caller)."""
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, args[0].shape[1])))
             for i, layer in enumerate(model.model.vision_tower.encoder.layers)]
    return seen, hooks


def test_encoder_loop_matches_the_reference_and_the_oracle(deep):
    """Kept indices and final features equal an independent eager, float64-scored re-implementation; the pruned
    forward equals the LLM run on those reference features at contiguous positions."""
    model, processor = deep
    inputs = encode(processor, [TWO_IMAGES], [random_image(80, 96, seed=1), random_image(60, 60, seed=2)])
    handle = enable_pruning(model, "flowcut", keep=7)
    with torch.no_grad():
        logits = model(**inputs).logits
    ids = inputs["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[image_pos] = False
    expected_feats = []
    for i, image in enumerate(handle.last.images):
        feats, kept, lengths = flowcut_reference(model, inputs["pixel_values"][i], 7)
        assert lengths[2] < 65 and lengths[4] < lengths[2]  # really pruned before the forced final step
        assert image.kept.tolist() == kept.tolist()
        keep[image_pos[64 * i:64 * i + 7]] = True  # the first 7 placeholders of each image carry its survivors
        expected_feats.append(feats)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[keep][None])
        embeds[0, ids[keep] == model.config.image_token_id] = torch.cat(expected_feats)
        expected = model(inputs_embeds=embeds).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_later_encoder_layers_process_fewer_tokens(deep):
    model, processor = deep
    inputs = encode(processor, [PROMPT], [random_image(80, 96, seed=1)])
    seen, hooks = layer_lengths(model)
    try:
        with torch.no_grad():
            model(**inputs)
            stock = list(seen)
            seen.clear()
            enable_pruning(model, "flowcut", keep=7)
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert stock == [(i, 65) for i in range(8)]  # the stock tower runs all 8 layers on 65 tokens
    layers, lengths = zip(*seen, strict=True)
    assert layers == tuple(range(7))  # stops at the feature layer (6): the last layer's output is never read
    assert lengths[:2] == (65, 65) and lengths[-1] == 8  # feature layer runs on [CLS] + 7 kept patches
    assert all(a >= b for a, b in zip(lengths, lengths[1:], strict=False)) and 8 < lengths[3] < 65
    assert sum(lengths) < 0.7 * 7 * 65


def test_keep_all_runs_the_stock_tower(llava, one_prompt):
    model, _ = llava
    seen, hooks = layer_lengths(model)
    try:
        enable_pruning(model, "flowcut", keep=64)
        with torch.no_grad():
            model(**one_prompt)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [(i, 65) for i in range(3)]


def test_llava_next_refuses_with_the_reason(attn):
    model, _ = tiny_llava_next(attn)
    with pytest.raises(ValueError, match="inside the vision encoder.*'llava_next'.*fastervlm"):
        enable_pruning(model, "flowcut", keep=0.11)
    assert _HANDLE_ATTR not in model.__dict__ and "forward" not in model.__dict__


def test_full_select_strategy_is_refused(llava, one_prompt):
    model, _ = llava
    enable_pruning(model, "flowcut", keep=8)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"), torch.no_grad():
        model(**one_prompt, vision_feature_select_strategy="full")
