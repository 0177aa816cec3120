"""What the vLLM tests run: prompts, images, generation length, and the result record."""

from __future__ import annotations

from dataclasses import dataclass

from tokenprune.tiny_models import random_image

PROMPTS = {
    "llava": "USER : <image>\nwhat is in the image ? ASSISTANT :",
    "qwen2_vl": "USER : <|vision_start|><|image_pad|><|vision_end|> what is in the image ? ASSISTANT :",
}
PROMPTS["qwen2_5_vl"] = PROMPTS["qwen2_vl"]
PROMPTS["llava_next"] = PROMPTS["llava"]
PROMPTS["qwen3_vl"] = PROMPTS["qwen3_vl_moe"] = PROMPTS["qwen2_vl"]
PROMPTS["llava_onevision"] = PROMPTS["llava"]
# Qwen: 112 px wide, 168 px tall -> 12 x 8 patches -> 6 x 4 = 24 merged tokens; taller than wide, so a text position
# resuming at llm_grid_w (vLLM's EVS helper) instead of max(h, w) would show. LLaVA: 64 px -> 8 x 8 = 64 tokens.
# LLaVA-NeXT: 70 px wide, 40 px tall -> 16 base-tile tokens + a 4 x 8 unpadded grid with 4 newlines = 52 tokens.
# Qwen3-VL: 96 px wide, 160 px tall -> 3 x 5 = 15 merged tokens (patch 16), taller than wide.
IMAGE_SIZE = {"llava": (64, 64), "qwen2_vl": (112, 168), "qwen2_5_vl": (112, 168),
              "llava_next": (70, 40), "qwen3_vl": (96, 160), "qwen3_vl_moe": (96, 160)}  # (width, height)
# LLaVA-OneVision: 120 px wide, 100 px tall -> 4 x 4 crops of 32 px, unpadded to 14 x 16 tokens, down-scaled
# (AnyRes-max-9) to 11 x 12, + 11 newlines + the 16-token base tile = 159 tokens.
IMAGE_SIZE["llava_onevision"] = (120, 100)
MAX_TOKENS = 6


def image(name: str):
    width, height = IMAGE_SIZE[name]
    return random_image(height, width, seed=3)


@dataclass(frozen=True)
class Run:
    prompt_len: int
    tokens: list[int]
    logprobs: list[float]
