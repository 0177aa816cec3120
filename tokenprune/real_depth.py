"""Tiny models as DEEP as the real checkpoints (towers and LLMs), for the method matrices: every method runs at its
default layers on them, as it does on the real checkpoint. Widths stay tiny (vision 64), so they build in a second."""

from __future__ import annotations

from tokenprune.tiny_gemma3 import real_depth_gemma3
from tokenprune.tiny_internvl import INTERNVL_REAL_DEPTH, tiny_internvl
from tokenprune.tiny_models import LlavaSize, tiny_llava, tiny_llava_next, tiny_qwen
from tokenprune.tiny_onevision import ONEVISION_REAL_DEPTH, tiny_onevision
from tokenprune.tiny_qwen3 import QWEN3_REAL_DEPTH, tiny_qwen3

# Depths of the real checkpoints (towers and LLMs) at tiny width: every method runs at its DEFAULT layers on them.
# CLIP ViT-L/14(-336): 24 layers (LLaVA-1.5 and LLaVA-NeXT read layer -2); Llama-2-7B / Vicuna-7B: 32 layers;
# Qwen2-VL-7B and Qwen2.5-VL-7B: 32 ViT blocks (2.5: full attention in blocks 7, 15, 23, 31) and a 28-layer LLM.
# Qwen3-VL / Qwen3.5 (dense and MoE): :data:`tokenprune.tiny_qwen3.QWEN3_REAL_DEPTH`.
# InternVL3-8B: :data:`tokenprune.tiny_internvl.INTERNVL_REAL_DEPTH`.
# Gemma 3 (12B): :data:`tokenprune.tiny_gemma3.GEMMA3_REAL_DEPTH`.
REAL_DEPTH_FAMILIES = (
    "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe",
    "internvl", "gemma3",
)
REAL_DEPTH_FAMILIES += ("llava_onevision",)  # LLaVA-OneVision-7B: tokenprune.tiny_onevision.ONEVISION_REAL_DEPTH


def real_depth(family: str, attn_implementation: str = "sdpa", seed: int = 0):
    """``(model, processor)`` of ``family`` (a ``model_type`` in :data:`REAL_DEPTH_FAMILIES`) with the vision tower
    and the LLM as deep as the real checkpoint's (7B; Qwen3: 8B, 30B-A3B, 9B, 35B-A3B) at tiny widths (vision 64)."""
    if family == "llava":
        return tiny_llava(LlavaSize(vision_layers=24, text_layers=32), attn_implementation, seed)
    if family == "llava_next":
        return tiny_llava_next(attn_implementation, seed, text_layers=32, vision_layers=24)
    if family == "qwen2_vl":
        return tiny_qwen("2", attn_implementation, seed, text_layers=28, vision_layers=32)
    if family == "qwen2_5_vl":
        return tiny_qwen("2.5", attn_implementation, seed, text_layers=28, vision_layers=32,
                         fullatt_block_indexes=(7, 15, 23, 31))
    if family == "llava_onevision":
        return tiny_onevision(attn_implementation, seed, **ONEVISION_REAL_DEPTH)
    if family in QWEN3_REAL_DEPTH:
        return tiny_qwen3(family, attn_implementation, seed, **QWEN3_REAL_DEPTH[family])
    if family == "internvl":
        return tiny_internvl(attn_implementation, seed, **INTERNVL_REAL_DEPTH)
    if family == "gemma3":
        return real_depth_gemma3(attn_implementation, seed)
    raise ValueError(f"family must be one of {REAL_DEPTH_FAMILIES}; got {family!r}")
