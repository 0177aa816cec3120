"""Per-family wiring of the large-image front-end: the tile size taken from the model's input size, the image
placeholder of a prompt, and where each visual token of a tile lies in that tile (to vote for the next level)."""

from __future__ import annotations

import math
from typing import Any

import torch

from tokenprune.patches.llava_next import packed_layout
from tokenprune.record import grid_boxes

QWEN_TILE = 448  # px: 16 x 16 merged tokens per tile on Qwen2-VL/2.5-VL, unless max_pixels allows less
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
SUPPORTED = ("llava_next", *QWEN_TYPES)


def check_family(model: Any) -> str:
    """The model's ``model_type``, or a ``ValueError`` naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"answer_large_image supports model_type {', '.join(SUPPORTED)}; got {model_type!r}. "
            f"For other families, tile the image yourself and use enable_pruning on the model."
        )
    return model_type


def tile_size(model: Any, processor: Any) -> int:
    """Tile side in px: LLaVA-NeXT's base crop (336 px on the released checkpoints); Qwen: :data:`QWEN_TILE` rounded
    down to whole merged patches that fit the processor's ``max_pixels``."""
    image_processor = processor.image_processor
    if model.config.model_type == "llava_next":
        crop = image_processor.crop_size
        return int(crop["height"] if isinstance(crop, dict) else crop.height)
    unit = image_processor.patch_size * image_processor.merge_size
    max_pixels = image_processor.size["longest_edge"]
    return max(unit, min(QWEN_TILE, math.isqrt(int(max_pixels)) // unit * unit))


def placeholder(model: Any) -> str:
    """What marks one image in the prompt text."""
    if model.config.model_type == "llava_next":
        return "<image>"
    return "<|vision_start|><|image_pad|><|vision_end|>"


def image_token_id(model: Any) -> int:
    return int(model.config.image_token_id)


def token_boxes(model: Any, inputs: Any) -> list[torch.Tensor]:
    """Per image of the processed prompt ``inputs``: ``[n_i, 4]`` boxes of its visual tokens in prompt order, as
    fractions of the image given to the processor (NaN rows: LLaVA-NeXT's newline tokens)."""
    config = model.config
    if config.model_type == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        out = []
        for size in inputs["image_sizes"].tolist():
            n_crops = image_size_to_num_patches(
                image_size=tuple(size), grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            out.append(packed_layout(config, tuple(size), n_crops).boxes)
        return out
    merge = config.vision_config.spatial_merge_size
    return [grid_boxes((h // merge, w // merge)) for _, h, w in inputs["image_grid_thw"].tolist()]
