"""Without an engine: entry point, the processors' placeholder counts, the M-RoPE position code, option checks."""

from __future__ import annotations

import re

import pytest
import torch

from tokenprune.budget import kept_count
from tokenprune.integrations.vllm import ARCHITECTURES, vllm_overrides
from tokenprune.integrations.vllm.mrope import MediaSpan, media_coords, placeholder_positions
from tokenprune.integrations.vllm.options import parse_options, supported_methods
from tokenprune.integrations.vllm.prompt_text import salted_hash, text_after_images
from tokenprune.tiny_models import random_image, tiny_qwen


def test_entry_point_registers_new_architectures_and_the_runner_fix():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    load_general_plugins()  # what every vLLM process does: runs tokenprune's entry point
    archs = set(ModelRegistry.get_supported_archs())
    for stock, ours, _ in ARCHITECTURES.values():
        assert stock in archs and ours in archs
    assert ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration").__module__.startswith("vllm.")
    assert ModelRegistry._try_load_model_cls("TokenpruneLlavaForConditionalGeneration").__module__ == (
        "tokenprune.integrations.vllm.llava")
    for runner in (CPUModelRunner, GPUModelRunner):
        assert getattr(runner.__dict__["load_model"], "_tokenprune_patched", False)


# --- processors --------------------------------------------------------------------------------------------------
def _processor(path: str, overrides: dict | None):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    config = ModelConfig(model=path, dtype="float32", hf_overrides=overrides or {}, max_model_len=1024)
    return MULTIMODAL_REGISTRY.create_processor(config)


def _placeholders(processor, prompt: str, images) -> tuple[list[int], int]:
    out = processor(prompt, processor.info.parse_mm_data({"image": images}))
    lengths = [p.length for p in out["mm_placeholders"]["image"]]
    image_id = processor.info.get_hf_config().image_token_id
    return lengths, sum(t == image_id for t in out["prompt_token_ids"])


PROMPT2 = {
    "llava": "USER : <image> <image>\nwhat is in the image ? ASSISTANT :",
    "qwen2_5_vl": "USER : <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
                  " what ? ASSISTANT :",
}


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("keep", [0.25, 5, 1.0, 10_000])
def test_processor_emits_the_kept_number_of_placeholders(name, keep, model_dirs):
    images = [random_image(168, 112, seed=1), random_image(56, 196, seed=2)]  # tall, then wide
    stock, stock_count = _placeholders(_processor(model_dirs[name], None), PROMPT2[name], images)
    ours, count = _placeholders(_processor(model_dirs[name], vllm_overrides(name, "divprune", keep=keep)),
                                PROMPT2[name], images)
    assert (stock == [64, 64]) if name == "llava" else (stock == [24, 14])  # 6x4 and 2x7 merged tokens
    assert ours == [kept_count(keep, n) for n in stock]
    assert (stock_count, count) == (sum(stock), sum(ours))


# --- M-RoPE positions ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    model, processor = tiny_qwen("2.5", max_pixels=28 * 28 * 64)
    return model, processor


def _hf_positions(model, processor, prompt, images=None, video=None):
    inputs = processor(text=prompt, images=images, videos=None if video is None else [video[:2]])
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=None if video is None else torch.tensor([video[2]]),
    )
    return inputs, positions[:, 0]  # [3, L]


def _spans(inputs, key: str, lengths=None, t_factor: float = 1.0) -> list[MediaSpan]:
    ids = inputs["input_ids"][0]
    token = 1 if key == "image_grid_thw" else 2
    starts = [i for i in range(len(ids)) if inputs["mm_token_type_ids"][0, i] == token
              and (i == 0 or inputs["mm_token_type_ids"][0, i - 1] != token)]
    spans = []
    for j, (start, (t, h, w)) in enumerate(zip(starts, inputs[key].tolist(), strict=True)):
        length = t * (h // 2) * (w // 2) if lengths is None else lengths[j]
        spans.append(MediaSpan(start, length, t, h // 2, w // 2, t_factor))
    return spans


TWO_IMAGES = ("USER : <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|> "
              "what ? ASSISTANT :")


def test_unpruned_placeholder_positions_equal_hf(qwen):
    model, processor = qwen
    images = [random_image(168, 112, seed=1), random_image(56, 196, seed=2)]
    inputs, hf = _hf_positions(model, processor, TWO_IMAGES, images)
    ours, delta = placeholder_positions(hf.shape[1], _spans(inputs, "image_grid_thw"))
    assert torch.equal(ours, hf)
    assert delta == int(hf.max()) + 1 - hf.shape[1]


def test_video_positions_follow_vllm(qwen):
    """Videos are not pruned, so their positions must be vLLM's unpruned ones: media positions as HF's, and the text
    after the video resuming at the media's max position + 1 (vLLM's ``get_mrope_input_positions``). transformers
    5.19 resumes at ``base + max(t, h, w)`` instead when ``t_factor != 1`` (Qwen2.5-VL videos); the two engines
    disagree there, and the plugin follows vLLM."""
    from tokenprune.tiny_models import random_video

    model, processor = qwen
    pixels, grid = random_video(4, 56, 84)
    seconds = 1.5
    prompt = "USER : <|vision_start|><|video_pad|><|vision_end|> what ? ASSISTANT :"
    inputs, hf = _hf_positions(model, processor, prompt, video=(pixels, grid, seconds))
    factor = seconds * model.config.vision_config.tokens_per_second
    assert factor != 1.0
    spans = _spans(inputs, "video_grid_thw", t_factor=factor)
    span = spans[0]
    end = span.offset + span.length
    ours, _ = placeholder_positions(hf.shape[1], spans)
    assert torch.equal(ours[:, :end], hf[:, :end])
    resume = int(hf[:, span.offset:end].max()) + 1
    assert torch.equal(ours[:, end:], torch.arange(resume, resume + hf.shape[1] - end).expand(3, -1))
    coords = media_coords(span.t, span.h, span.w, span.t_factor)
    base = hf[0, span.offset - 1] + 1  # the token before the video is <|vision_start|>
    assert torch.equal(coords[:, :3].T + base, hf[:, span.offset:end])
    assert int(coords[0, 3]) + base == resume


def _recompute(ids, coords, provisional, config):
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions

    return recompute_mrope_positions(
        ids, [c.T.long() for c in coords], provisional, 0, config.vision_start_token_id, config.image_token_id,
        config.video_token_id,
    )


def test_pruned_positions_after_the_runner_rewrite_equal_hf_columns(qwen):
    """Step 1 (placeholders) + step 2 (vLLM's recompute with our coords) == HF's unpruned positions, pruned columns
    dropped; with vLLM's EVS coords (extent = grid width) the text after a tall image would be shifted."""
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media

    model, processor = qwen
    images = [random_image(168, 112, seed=1), random_image(56, 196, seed=2)]
    inputs, hf = _hf_positions(model, processor, TWO_IMAGES, images)
    full = _spans(inputs, "image_grid_thw")
    generator = torch.Generator().manual_seed(0)
    kept = [torch.sort(torch.randperm(24, generator=generator)[:7]).values, torch.tensor([0, 5, 13])]
    keep = torch.ones(hf.shape[1], dtype=torch.bool)
    for span, idx in zip(full, kept, strict=True):
        keep[span.offset:span.offset + span.length] = False
        keep[span.offset + idx] = True
    ids = inputs["input_ids"][0, keep]
    pruned_spans = _spans({**inputs, "input_ids": ids[None], "mm_token_type_ids": inputs["mm_token_type_ids"][:, keep]},
                          "image_grid_thw", lengths=[7, 3])
    provisional, _ = placeholder_positions(len(ids), pruned_spans)
    coords = [media_coords(s.t, s.h, s.w)[idx] for s, idx in zip(full, kept, strict=True)]
    positions, delta = _recompute(ids, coords, provisional, model.config)
    assert torch.equal(positions, hf[:, keep])
    assert delta == int(hf.max()) + 1 - len(ids)

    evs = [compute_mrope_for_media(torch.tensor([s.t, 2 * s.h, 2 * s.w]), 2)[idx] for s, idx in zip(full, kept,
                                                                                                      strict=True)]
    evs_positions, _ = _recompute(ids, evs, provisional, model.config)
    assert not torch.equal(evs_positions, hf[:, keep])


# --- options -------------------------------------------------------------------------------------------------------
def test_supported_methods():
    """Every vision-stage method with a count known before the encoder runs, on each tower where it is defined."""
    assert set(supported_methods(cls_token=True)) == {
        "cdpruner", "divprune", "fastervlm", "fopru", "hiprune", "holov", "kcenter", "mmtok", "random", "uniform",
        "visiondrop", "visionzip"}
    assert set(supported_methods(cls_token=False)) == {
        "cdpruner", "divprune", "hiprune", "holov", "kcenter", "mmtok", "random", "uniform", "visiondrop"}


@pytest.mark.parametrize(("raw", "cls_token", "message"), [
    ({"method": "recoverable", "keep": 64}, True, "decides its kept count"),
    ({"method": "recoverable", "keep": 64}, True, "nearest method the vLLM plugin runs on this model is 'visionzip'"),
    ({"method": "fastv", "keep": 64}, True, "runs at the 'decoder' stage"),
    ({"method": "fastv", "keep": 64}, False, "nearest method the vLLM plugin runs on this model is 'hiprune'"),
    ({"method": "todre", "keep": 64}, True, "nearest method the vLLM plugin runs on this model is 'kcenter'"),
    ({"method": "fastervlm", "keep": 64}, False, "without a [CLS] token"),
    ({"method": "flowcut", "keep": 64}, True, "'vision-encoder' stage"),
    ({"method": "divprune"}, True, "needs 'method' and 'keep'"),
    ({"method": "divprune", "keep": 1.5}, True, "ratio"),
    ({"method": ["divprune", "fastv"], "keep": 64}, True, "one vision-stage method"),
    ({"method": "nope", "keep": 64}, True, "unknown method 'nope'"),
])
def test_unsupported_options_raise_clear_errors(raw, cls_token, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        parse_options(raw, cls_token)


# --- prompt text -----------------------------------------------------------------------------------------------------
def test_text_after_images_follows_the_hf_definition():
    """Text after each image, placeholders of every image excluded; all text when none follows; expanded runs too."""
    img, vid = 7, 8
    prompt = [1, 2, img, 3, 4, img, 5, vid, 6]
    assert text_after_images(prompt, 2, img, (img, vid)) == [[3, 4, 5, 6], [5, 6]]
    assert text_after_images([1, img, img], 2, img, (img,)) == [[1], [1]]  # nothing after: all text
    expanded = [1, img, img, img, 2, img, img, 3]
    assert text_after_images(expanded, 2, img, (img,)) == [[2, 3], [3]]
    with pytest.raises(ValueError, match="one placeholder"):
        text_after_images(expanded, 3, img, (img,))


def test_salted_hash_depends_on_the_text():
    assert salted_hash("abc", [1, 2]) != salted_hash("abc", [1, 3]) != salted_hash("abd", [1, 3])
    assert salted_hash("abc", [1, 2]) == salted_hash("abc", [1, 2])
