"""Small LLaVA-OneVision models (``LlavaOnevisionForConditionalGeneration``), built offline from configs (tests, docs).

The real transformers classes with random weights: a SigLIP vision tower (no [CLS]; ``vision_feature_layer=-1``,
``vision_feature_select_strategy="full"`` as the released checkpoints), a Qwen2 LLM (1-D RoPE) and the real
``LlavaOnevisionImageProcessorPil`` (AnyRes tiles: the base image, then the crops). The processor is a stand-in
(:class:`TinyOnevisionProcessor`): transformers' ``LlavaOnevisionProcessor`` cannot be built without torchvision (its
video processor needs it); the token counts are the real processor's own functions.

Tiny shape: 32-px tiles of 4x4 SigLIP patches (16 tokens per tile, the real 384-px tiles have 27x27 = 729). With
``anyres_max_9`` (released) an image whose unpadded crop grid holds more than ``1.1**2 x 9 x 16`` tokens is
bilinearly down-scaled, e.g. a 120x120 image: 4x4 crops = 16x16 tokens -> 12x12 (+ 12 newlines) + 16 base = 172.
Videos: each frame is one 32-px tile pooled 2x2 (bilinear) to 2x2 = 4 tokens; one newline after the whole video.
"""

from __future__ import annotations

import math

import torch
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from tokenprune.tiny_models import LlavaSize, _finish, expand_placeholders, make_tokenizer

# (height, width) of the AnyRes grids: up to 4x4 crops of 32 px, so that a large image is down-scaled.
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64], [96, 96], [128, 128]]
TILE, PATCH = 32, 8

# Depths of the public checkpoint llava-hf/llava-onevision-qwen2-7b-ov-hf (config.json): SigLIP so400m with
# num_hidden_layers 26 (the last of the 27 layers is dropped; vision_feature_layer -1 reads layer 25) and a
# Qwen2-7B LLM with 28 layers.
ONEVISION_REAL_DEPTH = dict(vision_layers=26, text_layers=28)


class TinyOnevisionProcessor:
    """What ``LlavaOnevisionProcessor`` does to a prompt, on the real ``LlavaOnevisionImageProcessorPil``.

    Each ``<image>`` of the text becomes the image's number of tokens -- computed by the real processor's
    ``_get_number_of_features`` (base tile + unpadded, possibly down-scaled grid + one newline per row) for a row
    with one image, ``16 + 1`` (base tile + newline) for a row with several (``batch_num_images``) -- and each
    ``<video>`` ``frames x pooled**2 + 1``. Videos are given as ready-made ``[frames, 3, 32, 32]`` pixel tensors
    (:func:`random_video_ov`; the real video processor needs torchvision).
    """

    _get_number_of_features = LlavaOnevisionProcessor._get_number_of_features  # the real counting functions
    _get_unpadded_features = LlavaOnevisionProcessor._get_unpadded_features

    def __init__(self, tokenizer, image_processor, vision_aspect_ratio: str = "anyres_max_9"):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.num_image_tokens = (TILE // PATCH) ** 2
        self.vision_aspect_ratio = vision_aspect_ratio

    def __call__(self, text, images=None, videos=None, return_tensors="pt", padding=True):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        out: dict[str, torch.Tensor] = {}
        image_counts: list[int] = []
        if images is not None:
            if not isinstance(images, (list, tuple)):
                images = [images]
            per_row = [t.count("<image>") for t in texts]
            nested, flat = [], list(images)
            for n in per_row:
                nested.append(flat[:n])
                flat = flat[n:]
            if flat or sum(per_row) != len(images):
                raise ValueError(f"{len(images)} images for {sum(per_row)} <image> placeholders in the text")
            vision = self.image_processor(images=[row for row in nested if row], return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_sizes=vision["image_sizes"],
                       batch_num_images=vision["batch_num_images"])
            height, width = vision["pixel_values"].shape[-2:]
            for n in vision["batch_num_images"].tolist():
                for size in vision["image_sizes"][len(image_counts):len(image_counts) + n].tolist():
                    image_counts.append(self.num_image_tokens + 1 if n != 1
                                        else self._get_number_of_features(*size, height, width))
        video_counts: list[int] = []
        if videos:
            out["pixel_values_videos"] = torch.stack(list(videos))
            pooled = math.ceil(math.isqrt(self.num_image_tokens) / 2)
            video_counts = [v.shape[0] * pooled * pooled + 1 for v in videos]
        expanded = [expand_placeholders(t, "<image>", image_counts) for t in texts]
        expanded = [expand_placeholders(t, "<video>", video_counts) for t in expanded]
        if image_counts or video_counts:
            raise ValueError("more images/videos than placeholders in the text")
        enc = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        return BatchFeature({**enc, **out})


def tiny_onevision(
    attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 2, vision_layers: int = 3,
    vision_aspect_ratio: str = "anyres_max_9",
):
    """``(model, processor)``: a LLaVA-OneVision model with random weights (eval mode, fp32): SigLIP tower of
    ``vision_layers`` layers (width 64, 32-px tiles of 4x4 patches), Qwen2 LLM of ``text_layers`` layers (width 128)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        SiglipVisionConfig,
    )

    tok = make_tokenizer(("<video>",))
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=TILE, patch_size=PATCH, vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_qwen2_text_config(tok, text_layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = _finish(LlavaOnevisionForConditionalGeneration(config), tok, attn_implementation)
    # Random weights may emit a placeholder id, which a use_cache=False step would then take for an image or video
    # token (the real checkpoints never emit them): suppress both in generation.
    model.generation_config.suppress_tokens = [config.image_token_id, config.video_token_id]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=ONEVISION_PINPOINTS,
    )
    return model, TinyOnevisionProcessor(tok, image_processor, vision_aspect_ratio)


def random_video_ov(frames: int, seed: int = 0) -> torch.Tensor:
    """``[frames, 3, 32, 32]`` normalised pixels of a random clip (one tile per frame, as the video processor)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, TILE, TILE, generator=generator)


def _qwen2_text_config(tok, text_layers: int):
    """The Qwen2 LLM of the tiny OneVision: the shape of the tiny LLaVA's LLM (:class:`LlavaSize` defaults)."""
    from transformers import Qwen2Config

    size = LlavaSize(text_layers=text_layers)
    return Qwen2Config(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=size.max_positions,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
