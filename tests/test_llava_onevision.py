"""LLaVA-OneVision end to end on tiny models (eager and sdpa), the vision stage: SigLIP (no [CLS]) signals, AnyRes-max
crops and videos pooled 2x2 as budget units, several images per row, an oracle; every method with a signal there; the
others decline by name. The packing and the overlay: tests/test_llava_onevision_layout.py; decoder-stage methods and
the real depth: tests/test_llava_onevision_decoder.py."""

import pytest
import torch
from conftest import (
    MERGING,
    assert_keep_all_is_unpruned,
    assert_rows_match_alone,
    built,
    cached_model,
    generate_cached_and_uncached,
    hook_and_attribute_census,
    left_clean,
)
from onevision_cases import DECLINES, GEN, METHODS, OTHER, PROMPT, TWO, adapter, both, enable

from tokenprune import disable_pruning, enable_pruning, pruning
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS as REGISTRY
from tokenprune.tiny_models import random_image
from tokenprune.tiny_onevision import tiny_onevision

_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def ov(attn):
    """One tiny model per kernel for the module; pruning is removed after every test."""
    yield from cached_model(_MODELS, attn, lambda: tiny_onevision(attn))


# --- the matrix: every method with a signal, eager and sdpa -------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_and_disable_leaves_nothing(ov, method):
    model, processor = ov
    inputs = both(processor)
    record = assert_keep_all_is_unpruned(model, inputs, lambda: enable(model, method, 1.0), **GEN)
    assert record.n_kept == record.n_visual == 172 + 13
    assert [im.kind for im in record.images] == ["image", "video"]


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_returns_the_prompt_and_cache_is_consistent(ov, method):
    model, processor = ov
    inputs = both(processor)
    handle = enable(model, method, 0.25)
    with torch.no_grad():
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    prompt = inputs["input_ids"]
    assert torch.equal(cached[:, : prompt.shape[1]], prompt) and torch.equal(cached, uncached)
    image, video = handle.last.images
    assert handle.last.seq_len_after == prompt.shape[1] - 185 + image.n_kept + video.n_kept
    if method not in MERGING:  # per frame (newline dropped), or one pool over the video (with it: DivPrune)
        cls = REGISTRY[method]
        pool = 13 if cls.newline_candidates else 12
        assert video.n_kept == (3 * kept_count(0.25, 4) if cls.crop_scope == "crop" else kept_count(0.25, pool))


def test_budget_units_per_crop_per_image_and_per_frame(ov):
    """HiPrune (per crop, as on LLaVA-NeXT): a quarter of the base tile and of each crop's down-scaled 3x3 tokens,
    no newline; ``scope="image"``: one pool; video: per frame. DivPrune: one pool with the newlines as candidates."""
    model, processor = ov
    inputs = both(processor)
    handle = enable(model, "hiprune", 0.25)
    with torch.no_grad():
        model(**inputs)
    layout = adapter(model).layout((120, 120), 17)
    image, video = handle.last.images
    assert torch.bincount(layout.crop[image.kept], minlength=17).tolist() == [4] + [kept_count(0.25, 9)] * 16
    assert not bool(layout.newline[image.kept].any())
    assert torch.bincount(video.kept // 4, minlength=3).tolist() == [1, 1, 1] and int(video.kept.max()) < 12
    disable_pruning(model)
    handle = enable(model, "hiprune", 0.25, scope="image")
    with torch.no_grad():
        model(**inputs)
    assert [im.n_kept for im in handle.last.images] == [kept_count(0.25, 160), kept_count(0.25, 12)]
    disable_pruning(model)
    handle = enable(model, "divprune", 0.25)
    with torch.no_grad():
        model(**inputs)
    assert [im.n_kept for im in handle.last.images] == [kept_count(0.25, 172), kept_count(0.25, 13)]


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_rows_match_each_prompt_alone(ov, method):
    """Different image sizes and tile counts (17 tiles down-scaled, 7 tiles), two images in one row (base tiles
    only), a video, different prompt lengths, left padding."""
    model, processor = ov
    prompts = [PROMPT, OTHER, TWO]
    images = [[random_image(120, 120, seed=1)], [random_image(40, 70, seed=2)],
              [random_image(70, 40, seed=3), random_image(64, 64, seed=4)]]
    handle = enable(model, method, 0.3)
    batch = processor(text=prompts, images=[im for imgs in images for im in imgs])
    assert bool((batch["attention_mask"] == 0).any())
    rows = [processor(text=[prompt], images=imgs) for prompt, imgs in zip(prompts, images, strict=True)]
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)
    assert [im.n for im in handle.last.images] == [172, 94, 17, 17]


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_pruned_forward_equals_the_llm_fed_the_kept_features(ov, method):
    """Oracle: the unpatched model given the prompt without the dropped placeholders and, through
    ``mm_encoder_outputs``, exactly the kept rows of its own packed image and video features."""
    model, processor = ov
    inputs = both(processor)
    with torch.no_grad():
        image = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                               batch_num_images=inputs["batch_num_images"]).pooler_output[0]
        video = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
        handle = enable(model, method, 0.3)
        logits = model(**inputs).logits
    kept_image, kept_video = (im.kept for im in handle.last.images)
    disable_pruning(model)
    ids = inputs["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    for token, kept in ((model.config.image_token_id, kept_image), (model.config.video_token_id, kept_video)):
        slots = (ids == token).nonzero().squeeze(1)
        keep[slots] = False
        keep[slots[kept]] = True
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    fed = {"image": BaseModelOutputWithPooling(pooler_output=[image[kept_image]]),
           "video": BaseModelOutputWithPooling(pooler_output=video[kept_video][None])}
    with torch.no_grad():
        expected = model(input_ids=ids[keep][None], mm_encoder_outputs=fed).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_attention_received_is_the_siglip_layers_own_attention(ov):
    """HiPrune's signal on SigLIP (no [CLS]): mean over heads and over every query row of the tile, read from an
    eager tower run with ``output_attentions``, packed as the features (base tile of a 1-tile image)."""
    model, processor = ov
    inputs = processor(text=[PROMPT], images=[random_image(32, 32, seed=5)])
    tower = tiny_onevision("eager")[0].model.vision_tower
    tower.load_state_dict(model.model.vision_tower.state_dict())
    with torch.no_grad():
        out = tower(inputs["pixel_values"][0, :2], output_attentions=True)
    received = out.attentions[-1].mean(dim=(1, 2))  # [tiles, 16]: last layer (the feature layer, -1)
    handle = enable_pruning(model, "hiprune", keep=4, object_layer=-1)
    with torch.no_grad():
        model(**inputs)
    kept = handle.last.images[0].kept
    from tokenprune import functional as F

    anchors = F.hiprune_anchor_count(4, REGISTRY["hiprune"]().alpha)
    assert torch.equal(kept[kept < 16], F.hiprune(received[0], received[0], 4, 4, anchors))


def test_vflowopt_reads_the_siglip_attention_map_of_each_tile(ov):
    """VFlowOpt's ViT stage on the base tile: the shipped 25% configuration applied to the head-mean attention map
    of the feature layer from an eager tower run (``output_attentions``), as the official SigLIP encoder reads it."""
    from tokenprune import functional as F
    from tokenprune.functional.vflowopt import vflowopt_config

    model, processor = ov
    inputs = processor(text=[PROMPT], images=[random_image(32, 32, seed=5)])
    tower = tiny_onevision("eager")[0].model.vision_tower
    tower.load_state_dict(model.model.vision_tower.state_dict())
    with torch.no_grad():
        attention = tower(inputs["pixel_values"][0, :1], output_attentions=True).attentions[-1][0].mean(0)  # [16, 16]
    config = vflowopt_config(0.25)
    importance = F.vflowopt_importance(attention, config.t)
    kept, groups = F.vflowopt_recycle(importance, (4, 4), config.r_vit, config.m)
    plain = kept[~torch.isin(kept, torch.tensor([g[0] for g in groups], dtype=torch.long))]
    enable_pruning(model, "vflowopt", keep=0.25, layers=(1,))
    with torch.no_grad():
        vision = adapter(model).prune(dict(inputs))  # the vision stage alone (the record composes both stages)
    mine = vision.record.images[0].kept
    assert plain.numel() < 16 and torch.equal(mine[mine < 16], plain)


# --- declines and bad input ----------------------------------------------------------------------------------------
def test_the_declines_are_exactly_the_listed_ones():
    from tokenprune.catalog import supported_families

    cannot = {name for name, cls in REGISTRY.items() if "llava_onevision" not in supported_families(cls())}
    assert cannot == set(DECLINES)


@pytest.mark.parametrize("method", sorted(DECLINES))
def test_methods_without_a_signal_here_decline_before_touching_the_model(ov, method):
    model, _ = ov
    census = hook_and_attribute_census(model)
    with pytest.raises(ValueError, match=DECLINES[method]):
        enable_pruning(model, method, keep=0.5)
    assert left_clean(model) and hook_and_attribute_census(model) == census


@pytest.mark.parametrize("method, keep, options, match", [
    ("no-such-method", 0.5, {}, "unknown method"), ("divprune", 0.0, {}, "keep"), ("divprune", 1.5, {}, "keep"),
    ("hiprune", 0.5, {"object_layer": 7}, "vision layer 7.*3 layers"),
    ("fastv", 0.5, {"k": 5}, "fastv.*do not exist.*2-layer"),
])
def test_bad_input_fails_clearly_before_the_model_is_touched(ov, method, keep, options, match):
    model, _ = ov
    census = hook_and_attribute_census(model)
    with pytest.raises(ValueError, match=match):
        enable_pruning(model, method, keep=keep, **options)
    assert left_clean(model) and hook_and_attribute_census(model) == census


def test_a_placeholder_count_that_does_not_match_the_pixels_fails_clearly(ov):
    model, processor = ov
    inputs = both(processor)
    inputs["input_ids"] = inputs["input_ids"][:, 3:]  # three image placeholders cut off
    inputs["attention_mask"] = inputs["attention_mask"][:, 3:]
    enable_pruning(model, "divprune", keep=0.5)
    with pytest.raises(ValueError, match="image placeholder tokens .* features; build the inputs with the model"):
        with torch.no_grad():
            model(**inputs)


def test_flops_estimate_counts_the_qwen2_llm_and_the_7b_preset_is_its_shape():
    from tokenprune.budget.flops import ModelShape, prefill_flops, preset

    model, processor = built(_MODELS, "sdpa", lambda: tiny_onevision("sdpa"))
    inputs = both(processor)
    with pruning(model, "divprune", keep=0.25) as handle, torch.no_grad():
        model(**inputs)
    shape = ModelShape.from_config(model.config)
    assert shape.num_kv_heads == 2 and shape.num_layers == 2
    last = handle.last
    assert last.tflops_unpruned == pytest.approx(prefill_flops(shape, last.seq_len_before) / 1e12)
    assert last.tflops_pruned == pytest.approx(prefill_flops(shape, last.seq_len_after) / 1e12)
    seven = preset("llava-onevision-7b")  # Qwen2-7B: d 3584, 28 layers, 28 heads, 4 KV heads
    assert (seven.hidden_size, seven.num_layers, seven.num_heads, seven.num_kv_heads) == (3584, 28, 28, 4)
    assert prefill_flops(seven, 7290) > prefill_flops(preset("llava-next-7b"), 2880)


@pytest.mark.parametrize("method", ["divprune", "hiprune"])
def test_resumed_generation_on_the_pruned_cache_equals_one_longer_generate(ov, method):
    """The image and the video were pruned when they entered the cache; the second call feeds only the new tokens."""
    from transformers import DynamicCache

    model, processor = ov
    inputs = dict(both(processor))
    enable(model, method, 0.25)
    steps = dict(do_sample=False, max_new_tokens=3, min_new_tokens=3)
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        cache = DynamicCache()
        first = model.generate(**inputs, past_key_values=cache, **steps)
        resumed = model.generate(**dict(inputs, input_ids=first, attention_mask=torch.ones_like(first)),
                                 past_key_values=cache, **steps)
    assert torch.equal(first[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(resumed, full)
