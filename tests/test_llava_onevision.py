"""LLaVA-OneVision end to end on tiny models (eager and sdpa): SigLIP (no [CLS]) signals, AnyRes-max packing with
bilinear down-scaling, several images per row, videos pooled 2x2; every method with a signal there; the others
decline by name."""

import pytest
import torch
from conftest import (
    MERGING,
    cached_model,
    decoder_methods,
    hook_and_attribute_census,
    runnable_methods,
    two_stage_methods,
)

from tokenprune import disable_pruning, enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS as REGISTRY
from tokenprune.tiny_models import random_image
from tokenprune.tiny_onevision import random_video_ov, tiny_onevision

PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
OTHER = "USER : <image>\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
TWO = "USER : <image>\n<image>\nhow many dog are there ? ASSISTANT :"
BOTH = "USER : <image> what is in the image ? <video> what is the dog doing ? ASSISTANT :"  # two visual runs
GEN = dict(max_new_tokens=4, do_sample=False)
OPTIONS = {"hiprune": {"object_layer": 0}}  # the tiny tower has 3 layers; HiPrune's paper layer is deeper
# Methods that decline on LLaVA-OneVision, and the words their error must contain (a new decline fails the test).
DECLINES = {
    "fastervlm": r"\[CLS\].*'hiprune'", "fopru": r"\[CLS\].*'hiprune'",
    "recoverable": r"\[CLS\].*'cdpruner'", "visionzip": r"\[CLS\].*'visiondrop'", "flowcut": r"\[CLS\].*'divprune'",
}
METHODS = [m for m in runnable_methods("llava_onevision") if m not in DECLINES]
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def ov(attn):
    """One tiny model per kernel for the module; pruning is removed after every test."""
    yield from cached_model(_MODELS, attn, lambda: tiny_onevision(attn))


def _both(processor, size=(120, 120), seed=1):
    """An image (120x120: 4x4 crops, down-scaled 16x16 -> 12x12: 16 + 144 + 12 newlines = 172 tokens) and a
    3-frame video (3 x 2x2 pooled + 1 newline = 13 tokens) in one prompt."""
    return processor(text=[BOTH], images=[random_image(*size, seed=seed)], videos=[random_video_ov(3, seed=seed)])


def enable(model, method, keep, **kwargs):
    return enable_pruning(model, method, keep=keep, **OPTIONS.get(method, {}), **kwargs)


def adapter(model):
    return getattr(model, _HANDLE_ATTR)._adapter


def _left_clean(model) -> bool:
    return not ({_HANDLE_ATTR, "forward", "generate"} & set(model.__dict__))


def _feature_layer(model, pixels):
    """``hidden_states[-1]`` of the tower (the feature layer; ``last_hidden_state`` has SigLIP's post-norm too)."""
    return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]


# --- layout: the adapter's packing is transformers' packing --------------------------------------------------------
@pytest.mark.parametrize("size, rows", [((40, 70), 1), ((120, 120), 1), ((32, 32), 1), ((20, 90), 1), ((40, 70), 2)])
def test_packing_reproduces_the_models_own_features(size, rows):
    """Per-tile projector outputs packed by the adapter (unpadding, bilinear down-scaling, the base tile alone in a
    row with two images) are the model's own packed features; newline slots are where the layout says."""
    model, processor = _MODELS.setdefault("sdpa", tiny_onevision("sdpa"))
    images = [random_image(*size, seed=1)] * rows
    inputs = processor(text=[PROMPT if rows == 1 else TWO], images=images)
    enable_pruning(model, "random", keep=1.0)
    try:
        ad = adapter(model)
        n_tiles = ad.tower_rows(inputs, rows)
        with torch.no_grad():
            packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                    batch_num_images=inputs["batch_num_images"]).pooler_output
            tiles = model.model.multi_modal_projector(
                _feature_layer(model, inputs["pixel_values"][0, : n_tiles[0]])
            )
        layout = ad.layout(size, n_tiles[0])
        mine = ad.pack(layout, list(tiles))
    finally:
        disable_pruning(model)
    assert packed[0].shape[0] == layout.crop.numel()
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(p.shape[0] for p in packed)
    newline = layout.newline
    torch.testing.assert_close(mine[~newline], packed[0][~newline], rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed[0][newline], model.model.image_newline.expand(int(newline.sum()), -1))
    if size == (120, 120):
        assert layout.resized == (12, 12) and packed[0].shape[0] == 16 + 12 * 13
        assert torch.bincount(layout.crop[~newline]).tolist() == [16] + [9] * 16  # 3x3 resized tokens per crop


def test_video_packing_pools_each_frame_and_ends_with_one_newline():
    model, processor = _MODELS.setdefault("sdpa", tiny_onevision("sdpa"))
    video = random_video_ov(3, seed=2)
    enable_pruning(model, "random", keep=1.0)
    try:
        ad = adapter(model)
        with torch.no_grad():
            packed = model.model.get_video_features(video[None]).pooler_output[0]
            tiles = model.model.multi_modal_projector(_feature_layer(model, video))
        layout = ad.video_layout(3)
        mine = ad.pack(layout, list(tiles))
    finally:
        disable_pruning(model)
    assert packed.shape[0] == layout.crop.numel() == 13 and layout.crop.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [-1]
    torch.testing.assert_close(mine[:-1], packed[:-1], rtol=1e-5, atol=1e-5)


# --- the matrix: every method with a signal, eager and sdpa -------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_and_disable_leaves_nothing(ov, method):
    model, processor = ov
    inputs = _both(processor)
    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        census = hook_and_attribute_census(model)  # after a first generate (which adds HF attributes of its own)
        handle = enable(model, method, 1.0)
        logits, ids = model(**inputs).logits, model.generate(**inputs, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    assert handle.last.n_kept == handle.last.n_visual == 172 + 13
    assert [im.kind for im in handle.last.images] == ["image", "video"]
    disable_pruning(model)
    assert _left_clean(model) and hook_and_attribute_census(model) == census
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_returns_the_prompt_and_cache_is_consistent(ov, method):
    model, processor = ov
    inputs = _both(processor)
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
    inputs = _both(processor)
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
    alone = []
    with torch.no_grad():
        for prompt, imgs in zip(prompts, images, strict=True):
            out = model(**processor(text=[prompt], images=imgs)).logits[0, -1]
            alone.append((out, [im.kept for im in handle.last.images]))
        batch = processor(text=prompts, images=[im for imgs in images for im in imgs])
        assert bool((batch["attention_mask"] == 0).any())
        logits = model(**batch).logits[:, -1]
        batch_kept = [im.kept for im in handle.last.images]
        ids = model.generate(**batch, **GEN)
        ids_nocache = model.generate(**batch, **GEN, use_cache=False)
    assert [im.n for im in handle.last.images] == [172, 94, 17, 17]
    flat_alone = [k for _, kept in alone for k in kept]
    assert all(torch.equal(a, b) for a, b in zip(flat_alone, batch_kept, strict=True))
    for row, (out, _) in enumerate(alone):
        torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids[:, : batch["input_ids"].shape[1]], batch["input_ids"]) and torch.equal(ids, ids_nocache)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_pruned_forward_equals_the_llm_fed_the_kept_features(ov, method):
    """Oracle: the unpatched model given the prompt without the dropped placeholders and, through
    ``mm_encoder_outputs``, exactly the kept rows of its own packed image and video features."""
    model, processor = ov
    inputs = _both(processor)
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
    assert _left_clean(model) and hook_and_attribute_census(model) == census


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
    assert _left_clean(model) and hook_and_attribute_census(model) == census


def test_a_placeholder_count_that_does_not_match_the_pixels_fails_clearly(ov):
    model, processor = ov
    inputs = _both(processor)
    inputs["input_ids"] = inputs["input_ids"][:, 3:]  # three image placeholders cut off
    inputs["attention_mask"] = inputs["attention_mask"][:, 3:]
    enable_pruning(model, "divprune", keep=0.5)
    with pytest.raises(ValueError, match="image placeholder tokens .* features; build the inputs with the model"):
        with torch.no_grad():
            model(**inputs)



# --- decoder-stage and two-stage methods: the LLaVA decoder loop on the Qwen2 LLM ----------------------------------
DECODER_METHODS = [m for m in decoder_methods() + two_stage_methods() if m not in DECLINES]
DECODER_OPTIONS = {"fastv": {"k": 2}, "dart": {"k": 2}, "feather": {"layers": (1, 2)}, "pdrop": {"layers": (1, 2, 3)},
                   "transprune": {"layers": (1, 2, 3)}, "todre": {"layer": 1, "tau": 1.0},
                   "sparsevlm": {"layers": (0, 1, 2)}, "adaptinfer": {"layers": (0, 1, 2)},
                   "vflowopt": {"layers": (1, 2)}}
DECODER_OPTIONS["catp"] = {"layer": 1}  # 4 layers: in-context pool scored at 0 and 1, cut from 2; query from 3


@pytest.fixture
def deep_ov(attn):
    """4 LLM layers, so that every decoder method prunes at least once with small layer options."""
    yield from cached_model(_MODELS, (attn, "decoder"), lambda: tiny_onevision(attn, text_layers=4))


def _enable_decoder(model, method, keep):
    return enable_pruning(model, method, keep=keep, **DECODER_OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_keep_all_bit_identical_and_cache_consistent(deep_ov, method):
    model, processor = deep_ov
    inputs = _both(processor, size=(40, 70))
    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        census = hook_and_attribute_census(model)
        _enable_decoder(model, method, 1.0)
        assert torch.equal(model(**inputs).logits, ref_logits) and torch.equal(model.generate(**inputs, **GEN), ref_ids)
        disable_pruning(model)
        assert _left_clean(model) and hook_and_attribute_census(model) == census
        handle = _enable_decoder(model, method, 0.5)
        cached = model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        uncached = model.generate(**inputs, **GEN, use_cache=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(cached.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert torch.equal(cached.sequences, uncached.sequences)
    for step_cached, step_uncached in zip(cached.logits, uncached.logits, strict=True):
        torch.testing.assert_close(step_cached, step_uncached, rtol=1e-4, atol=1e-4)
    assert handle.last.visual_per_layer[-1] < handle.last.n_visual


@pytest.mark.parametrize("method", DECODER_METHODS)
def test_decoder_methods_padded_batch_rows_match_each_prompt_alone(deep_ov, method):
    model, processor = deep_ov
    prompts, images = [PROMPT, OTHER], [random_image(120, 120, seed=1), random_image(40, 70, seed=2)]
    handle = _enable_decoder(model, method, 0.4)
    alone = []
    with torch.no_grad():
        for prompt, image in zip(prompts, images, strict=True):
            alone.append((model(**processor(text=[prompt], images=[image])).logits[0, -1],
                          [im.kept for im in handle.last.images]))
        batch = processor(text=prompts, images=images)
        logits = model(**batch).logits[:, -1]
        kept = [im.kept for im in handle.last.images]
        ids, ids_nocache = model.generate(**batch, **GEN), model.generate(**batch, **GEN, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip([k for _, ks in alone for k in ks], kept, strict=True))
    for row, (out, _) in enumerate(alone):
        torch.testing.assert_close(logits[row], out, rtol=1e-4, atol=1e-4)
    assert torch.equal(ids, ids_nocache)


def test_real_depth_model_runs_every_method_at_its_default_layers():
    """SigLIP 26 layers and a 28-layer Qwen2 (LLaVA-OneVision-7B): every method at its paper's layers."""
    from tokenprune.real_depth import real_depth

    model, processor = real_depth("llava_onevision", "sdpa")
    assert len(model.model.vision_tower.encoder.layers) == 26
    assert len(model.model.language_model.layers) == 28
    inputs = _both(processor, size=(40, 70))
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
    assert _left_clean(model)


def test_flops_estimate_counts_the_qwen2_llm_and_the_7b_preset_is_its_shape():
    from tokenprune.budget.flops import ModelShape, prefill_flops, preset

    model, processor = _MODELS.setdefault("sdpa", tiny_onevision("sdpa"))
    inputs = _both(processor)
    handle = enable_pruning(model, "divprune", keep=0.25)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        disable_pruning(model)
    shape = ModelShape.from_config(model.config)
    assert shape.num_kv_heads == 2 and shape.num_layers == 2
    last = handle.last
    assert last.tflops_unpruned == pytest.approx(prefill_flops(shape, last.seq_len_before) / 1e12)
    assert last.tflops_pruned == pytest.approx(prefill_flops(shape, last.seq_len_after) / 1e12)
    seven = preset("llava-onevision-7b")  # Qwen2-7B: d 3584, 28 layers, 28 heads, 4 KV heads
    assert (seven.hidden_size, seven.num_layers, seven.num_heads, seven.num_kv_heads) == (3584, 28, 28, 4)
    assert prefill_flops(seven, 7290) > prefill_flops(preset("llava-next-7b"), 2880)


@pytest.mark.parametrize("size", [(120, 120), (40, 70)])  # down-scaled 12x12 grid; unpadded 2x3 crops
def test_visualize_draws_exactly_the_kept_tokens_of_a_onevision_record(size):
    from test_viz import assert_looks, grey

    from tokenprune.viz import GAP, HEADER, draw_kept, prune_once

    model, processor = _MODELS.setdefault("sdpa", tiny_onevision("sdpa"))
    image = grey(size[1], size[0])
    record = prune_once(model, processor, image, PROMPT, "divprune", keep=0.25)
    rec = record.images[0]
    assert rec.view == "image" and bool(rec.boxes[:, 0].isnan().any())  # newline tokens have no place
    panel = (280, round(280 * size[0] / size[1]))
    figure = draw_kept(image, record, size=280, legend=False)  # base tile and high-resolution panels
    second = 280 + GAP  # (a long caption may widen the figure beyond the second panel)
    assert figure.size[0] >= second + 280 and figure.size[1] == HEADER + panel[1]
    rect = (0, 0, *panel)
    assert_looks(figure, rec, lambda i: (0 if int(rec.segments[i]) == 0 else second, None), {0: rect, second: rect})
    assert _left_clean(model)


@pytest.mark.parametrize("method", ["divprune", "hiprune"])
def test_resumed_generation_on_the_pruned_cache_equals_one_longer_generate(ov, method):
    """The image and the video were pruned when they entered the cache; the second call feeds only the new tokens."""
    from transformers import DynamicCache

    model, processor = ov
    inputs = dict(_both(processor))
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
