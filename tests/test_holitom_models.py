"""HoliTom on 16-frame videos on tiny Qwen2.5-VL and LLaVA-OneVision (eager and sdpa; Qwen2-VL sdpa): keep=1.0,
cache, batch, an oracle per family, M-RoPE positions, disable, Qwen3-VL / Qwen3.5 videos, and the clear errors on
images and on families without videos. The functions and their worked examples: tests/test_holitom.py."""

import math

import pytest
import torch
from conftest import built, hook_and_attribute_census
from torch.nn import functional as nnf

from tokenprune import disable_pruning, enable_pruning, pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.functional.holitom import holitom_inner, holitom_outer
from tokenprune.tiny_models import random_image, random_video, tiny_qwen
from tokenprune.tiny_onevision import random_video_ov, tiny_onevision

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VID = "<|vision_start|><|video_pad|><|vision_end|>"
QWEN_VIDEO = f"USER : {VID}what is the dog doing ? ASSISTANT :"
QWEN_OTHER = f"USER : {VID}describe the red ball and where it goes ? ASSISTANT :"
OV_VIDEO = "USER : <video>\nwhat is the dog doing ? ASSISTANT :"
OV_OTHER = "USER : <video>\ndescribe the red ball and where it goes ? ASSISTANT :"
GEN = dict(max_new_tokens=4, do_sample=False)
LAYER = 2  # the tiny LLMs have 3 layers: the inner merge at layer 2 (scored at layer 1)
RUNS = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 4, 5, 6]  # frame -> source frame: static windows to find
_MODELS: dict = {}


def _model(family, attn):
    def build():
        if family.startswith("qwen"):
            return tiny_qwen("2.5" if family == "qwen2_5_vl" else "2", attn, text_layers=3)
        return tiny_onevision(attn, text_layers=3)

    return built(_MODELS, (family, attn), build)


def qwen_clip(seed=0):
    """16 frames (8 temporal patches of 2 x 3 merged tokens) in runs of repeated patches, a third of each patch's
    pixels moving: static windows and dynamic tokens."""
    pixels, grid = random_video(16, 56, 84, seed=seed)
    t = int(grid[0, 0])
    per = pixels.shape[0] // t
    p = pixels.reshape(t, per, -1)[torch.tensor(RUNS[::2])].clone()
    p[:, : per // 3] += torch.randn(t, per // 3, p.shape[-1], generator=torch.Generator().manual_seed(seed + 1))
    return p.reshape(pixels.shape), grid


def ov_clip(seed=0):
    """16 frames of one 32-px tile (2 x 2 pooled tokens each) in runs of repeated frames, one corner moving."""
    frames = random_video_ov(16, seed=seed)[torch.tensor(RUNS)].clone()
    frames[:, :, :16, :16] += torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1))
    return frames


def inputs_for(family, processor, clips, prompts):
    if family.startswith("qwen"):
        return processor(text=prompts, videos=clips)
    return processor(text=prompts, videos=clips, return_tensors="pt", padding=True)


def clip_for(family, seed=0):
    return qwen_clip(seed) if family.startswith("qwen") else ov_clip(seed)


def prompts_for(family):
    return (QWEN_VIDEO, QWEN_OTHER) if family.startswith("qwen") else (OV_VIDEO, OV_OTHER)


FAMILIES = ["qwen2_5_vl", "llava_onevision"]


@pytest.fixture(params=[(f, a) for f in FAMILIES for a in ("eager", "sdpa")] + [("qwen2_vl", "sdpa")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def video_model(request):
    family, attn = request.param
    model, processor = _model(family, attn)
    with torch.no_grad():  # transformers installs its output-capturing hooks on the first forward
        model(**inputs_for(family, processor, [clip_for(family)], [prompts_for(family)[0]]))
    census = hook_and_attribute_census(model)
    yield family, model, processor, census
    if _HANDLE_ATTR in model.__dict__:
        disable_pruning(model)
    assert hook_and_attribute_census(model) == census  # disable_pruning leaves nothing behind


def test_keep_one_is_bit_identical_and_pruning_is_consistent(video_model):
    family, model, processor, census = video_model
    inputs = inputs_for(family, processor, [clip_for(family)], [prompts_for(family)[0]])
    with torch.no_grad():
        ref_logits, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        enable_pruning(model, "holitom", keep=1.0, layer=LAYER)
        assert torch.equal(model(**inputs).logits, ref_logits)
        assert torch.equal(model.generate(**inputs, **GEN), ref_ids)
        disable_pruning(model)
        handle = enable_pruning(model, "holitom", keep=0.25, layer=LAYER)
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    prompt = inputs["input_ids"]
    assert torch.equal(cached[:, : prompt.shape[1]], prompt) and torch.equal(cached, uncached)
    record = handle.last
    visual = record.visual_per_layer
    n_video = int((prompt == model.config.video_token_id).sum())
    assert visual[0] < 0.4 * n_video  # the outer stage merged (25% of the video's tokens, rounding per window)
    assert visual[LAYER - 1] == visual[0] and visual[LAYER] == round(visual[0] * 0.5)  # inner merge at LAYER
    disable_pruning(model)
    assert hook_and_attribute_census(model) == census
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


def test_a_batch_of_two_videos_equals_each_row_alone(video_model):
    family, model, processor, _ = video_model
    clips, prompts = [clip_for(family, 0), clip_for(family, 7)], list(prompts_for(family))
    enable_pruning(model, "holitom", keep=0.3, layer=LAYER)
    with torch.no_grad():
        alone = [model(**inputs_for(family, processor, [c], [p])) for c, p in zip(clips, prompts, strict=True)]
        alone_ids = [model.generate(**inputs_for(family, processor, [c], [p]), **GEN)[0, -GEN["max_new_tokens"]:]
                     for c, p in zip(clips, prompts, strict=True)]
        batch = inputs_for(family, processor, clips, prompts)
        assert bool((batch["attention_mask"] == 0).any())  # the prompts differ in length: padded
        logits = model(**batch).logits
        ids = model.generate(**batch, **GEN)
    for row in range(2):
        torch.testing.assert_close(logits[row, -1], alone[row].logits[0, -1], rtol=1e-4, atol=1e-4)
        assert torch.equal(ids[row, -GEN["max_new_tokens"]:], alone_ids[row])


def _lm_positions(model):
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
    return seen, hook


def qwen_outer_oracle(model, inputs):
    """``(embeds [1, L', D], position_ids [4, 1, L'], video mask [L'])``: the prompt with HoliTom's outer-stage
    tokens (the functional's answer on the ViT's features and the attention they receive) at the slots of their
    first members, each slot at its ORIGINAL M-RoPE position; plus the functional's answer."""
    from tokenprune.methods import ATTENTION_RECEIVED, SignalRequest
    from tokenprune.patches.qwen_signals import QwenProbe

    grid = inputs["video_grid_thw"]
    with torch.no_grad():
        with QwenProbe(model.model.visual, [SignalRequest(ATTENTION_RECEIVED)], grid) as probe:
            feats = model.model.get_video_features(inputs["pixel_values_videos"], grid).pooler_output[0]
        received = probe.per_item()[0][ATTENTION_RECEIVED]
        positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                                  video_grid_thw=grid)
    t, h, w = int(grid[0, 0]), int(grid[0, 1]) // 2, int(grid[0, 2]) // 2
    out = holitom_outer(feats.reshape(t, h * w, -1), received.reshape(t, h * w), kept_ratio(t * h * w))
    firsts = [int((out.assign == j).nonzero().min()) for j in range(out.merged.shape[0])]
    slots = torch.tensor(out.kept.tolist() + firsts)
    order = slots.argsort()
    tokens = torch.cat([feats[out.kept], out.merged.to(feats.dtype)])[order]
    slots = slots[order]
    ids = inputs["input_ids"][0]
    video_pos = (ids == model.config.video_token_id).nonzero().squeeze(1)
    keep = ids != model.config.video_token_id
    keep[video_pos[slots]] = True
    video = ids[keep] == model.config.video_token_id
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[keep][None])
    embeds[0, video] = tokens
    text_row = torch.arange(int(keep.sum()))[None, None]
    return embeds, torch.cat([text_row, positions[:, :, keep]]), video, out


def test_qwen_oracle_and_monotone_time_axis():
    """Oracle: the LLM fed HoliTom's outer-stage tokens at their first members' slots and ORIGINAL positions."""
    model, processor = _model("qwen2_5_vl", "sdpa")
    inputs = inputs_for("qwen2_5_vl", processor, [qwen_clip()], [QWEN_VIDEO])
    embeds, position_ids, video, out = qwen_outer_oracle(model, inputs)
    with torch.no_grad():
        handle = enable_pruning(model, "holitomouter", keep=0.25)
        seen, hook = _lm_positions(model)
        try:
            logits = model(**inputs).logits
        finally:
            hook.remove()
            disable_pruning(model)
        expected = model(inputs_embeds=embeds, position_ids=position_ids).logits
    assert handle.last.images[0].n_merged == out.merged.shape[0] > 0  # the clip has static windows
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    time_axis = seen[0][1, 0][video]  # the (t) row at the video's tokens
    assert bool((time_axis[1:] >= time_axis[:-1]).all()) and int(time_axis[-1]) > int(time_axis[0])


def test_qwen_inner_merge_oracle():
    """Oracle of the full method: the unpatched LLM runs the outer-stage prompt up to layer ``LAYER`` (eager, its
    own attention weights); the functional's inner merge of layer ``LAYER``'s input (scored by layer ``LAYER - 1``'s
    last-row attention) then goes through layers ``LAYER..`` alone (the model's own forward on those layers, the
    kept tokens at their positions)."""
    model, processor = _model("qwen2_5_vl", "eager")
    inputs = inputs_for("qwen2_5_vl", processor, [qwen_clip()], [QWEN_VIDEO])
    embeds, position_ids, video, _ = qwen_outer_oracle(model, inputs)
    lm = model.model.language_model
    with torch.no_grad():
        enable_pruning(model, "holitom", keep=0.25, layer=LAYER)
        try:
            logits = model(**inputs).logits
        finally:
            disable_pruning(model)
        full = lm(inputs_embeds=embeds, position_ids=position_ids, output_hidden_states=True, output_attentions=True)
        hidden = full.hidden_states[LAYER][0]  # input of layer LAYER
        slots = video.nonzero().squeeze(1)
        attention = full.attentions[LAYER - 1][0, :, -1].float().mean(dim=0)[slots]
        kept, weights = holitom_inner(attention, hidden[slots], round(slots.numel() * 0.5))
        merged = hidden.clone()
        merged[slots[kept]] = (weights @ hidden[slots].float()).to(hidden.dtype)
        keep = torch.ones(hidden.shape[0], dtype=torch.bool)
        keep[slots] = False
        keep[slots[kept]] = True
        layers = lm.layers
        lm.layers = layers[LAYER:]
        try:
            tail = lm(inputs_embeds=merged[keep][None], position_ids=position_ids[:, :, keep]).last_hidden_state
        finally:
            lm.layers = layers
        expected = model.lm_head(tail)
    assert int(keep.sum()) < hidden.shape[0]  # tokens were merged away
    torch.testing.assert_close(logits[0, -1], expected[0, -1], rtol=1e-4, atol=1e-4)


def kept_ratio(n: int) -> float:
    """The retain ratio HoliTom uses for ``keep=0.25`` on ``n`` tokens: the shared budget's count over ``n``."""
    from tokenprune.budget import kept_count

    return kept_count(0.25, n) / n


def test_onevision_oracle_official_layout():
    """Oracle: the unpatched model given, through ``mm_encoder_outputs``, HoliTom's tokens in the official order
    (per window: static clusters, then each frame's tokens) -- from the features and the attention each token
    receives in an eager tower run, pooled 2x2 as the features -- then the video's newline token."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, processor = _model("llava_onevision", "sdpa")
    inputs = inputs_for("llava_onevision", processor, [ov_clip()], [OV_VIDEO])
    tower = tiny_onevision("eager", text_layers=3)[0].model.vision_tower
    tower.load_state_dict(model.model.vision_tower.state_dict())
    with torch.no_grad():
        video = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]  # [16*4 + 1, D]
        received = tower(inputs["pixel_values_videos"][0], output_attentions=True).attentions[-1].mean(dim=(1, 2))
        side = int(received.shape[-1] ** 0.5)
        pooled = nnf.interpolate(received.reshape(16, 1, side, side), size=[math.ceil(side / 2)] * 2,
                                 mode="bilinear").reshape(16, -1)
        enable_pruning(model, "holitomouter", keep=0.25)
        logits = model(**inputs).logits
        disable_pruning(model)
    n = pooled.shape[1]
    out = holitom_outer(video[:-1].reshape(16, n, -1), pooled, kept_ratio(16 * n))
    assert out.merged.shape[0] > 0 and len(out.segments) < 16  # static windows were merged
    tokens = torch.cat([video[:-1][out.kept], out.merged.to(video.dtype)])[out.order]
    tokens = torch.cat([tokens, video[-1:]])  # the newline, last
    ids = inputs["input_ids"][0]
    slots = (ids == model.config.video_token_id).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[slots[tokens.shape[0]:]] = False
    fed = {"video": BaseModelOutputWithPooling(pooler_output=tokens[None])}
    with torch.no_grad():
        expected = model(input_ids=ids[keep][None], mm_encoder_outputs=fed).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_image_gets_a_clear_error_and_nothing_changes(family):
    model, processor = _model(family, "sdpa")
    if family.startswith("qwen"):
        inputs = processor(text=["USER : <|vision_start|><|image_pad|><|vision_end|>what ? ASSISTANT :"],
                           images=[random_image(56, 84, seed=1)])
    else:
        inputs = processor(text=["USER : <image>\nwhat ? ASSISTANT :"], images=[random_image(32, 32, seed=1)],
                           return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits
    census = hook_and_attribute_census(model)
    for method in ("holitom", "holitomouter"):
        with pruning(model, method, keep=0.25, **({"layer": LAYER} if method == "holitom" else {})), torch.no_grad():
            with pytest.raises(ValueError, match="frames of a video.*image.*'divprune'"):
                model(**inputs)
    assert hook_and_attribute_census(model) == census
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize(("family", "attn", "depth", "layer"), [
    ("qwen3_vl", "eager", 4, LAYER), ("qwen3_vl", "sdpa", 4, LAYER),
    ("qwen3_5", "sdpa", 8, 4),  # hybrid LLM: scored at the full-attention layer 3
])
def test_qwen3_videos_with_timestamps_and_deepstack(family, attn, depth, layer):
    """Qwen3-VL / Qwen3.5: timestamp text between the frames, DeepStack features for the merged tokens (the same
    combination of their members' rows); the inner merge runs per frame run (each one image for the decoder loop)."""
    from tokenprune.tiny_qwen3 import random_video3, tiny_qwen3

    model, processor = tiny_qwen3(family, attn, text_layers=depth)
    pixels, grid = random_video3(16, 64, 96, seed=3)  # 8 temporal patches of 2 x 3 merged tokens
    t = int(grid[0, 0])
    per = pixels.shape[0] // t
    p = pixels.reshape(t, per, -1)[torch.tensor(RUNS[::2])].clone()
    p[:, : per // 3] += torch.randn(t, per // 3, p.shape[-1], generator=torch.Generator().manual_seed(1))
    inputs = processor(text=[QWEN_VIDEO], videos=[(p.reshape(pixels.shape), grid)])
    with torch.no_grad():
        ref, ref_ids = model(**inputs).logits, model.generate(**inputs, **GEN)
        census = hook_and_attribute_census(model)
        enable_pruning(model, "holitom", keep=1.0, layer=layer)
        assert torch.equal(model(**inputs).logits, ref) and torch.equal(model.generate(**inputs, **GEN), ref_ids)
        disable_pruning(model)
        outer = enable_pruning(model, "holitomouter", keep=0.25)
        model(**inputs)
        assert outer.last.images[0].n_merged > 0
        disable_pruning(model)
        handle = enable_pruning(model, "holitom", keep=0.25, layer=layer)
        cached = model.generate(**inputs, **GEN)
        assert torch.equal(cached, model.generate(**inputs, **GEN, use_cache=False))
        disable_pruning(model)
    runs = handle.last.images  # one per frame run
    visual = handle.last.visual_per_layer
    assert visual[0] == sum(im.n for im in runs) and visual[layer] == sum(max(1, round(im.n * 0.5)) for im in runs)
    assert torch.equal(cached[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert hook_and_attribute_census(model) == census


def test_families_without_whole_videos_decline_at_enable_time():
    from tokenprune.tiny_models import tiny_llava

    model, _ = tiny_llava()
    census = hook_and_attribute_census(model)
    for method in ("holitom", "holitomouter"):
        with pytest.raises(ValueError, match="frames of a video.*'llava'.*'divprune'"):
            enable_pruning(model, method, keep=0.25)
    assert hook_and_attribute_census(model) == census
