"""Tiny random-weight checkpoints saved in the layout vLLM loads, for offline tests and the docs snippet.

The models are :mod:`tokenprune.tiny_models` (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; text head_dim 32, which
vLLM's CPU attention needs), :mod:`tokenprune.tiny_qwen3` and :mod:`tokenprune.tiny_onevision`. Two things make a saved
tiny model loadable by vLLM 0.32: the LLaVA families' CLIP / SigLIP weights are renamed to the hub layout
(``vision_tower.vision_model.*``; transformers >= 5 saves ``vision_tower.*``),
and Qwen gets a real ``Qwen2VLProcessor`` (image + video processor; the latter needs torchvision, present in vLLM's
environment).
"""

from __future__ import annotations

import os


def _hub_clip_name(key: str) -> str:
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + key[len(prefix):]
    return key


def _save_llava(path: str, next_: bool = False, mid: bool = False) -> None:
    from tokenprune.tiny_models import DEMO, tiny_llava, tiny_llava_next

    model, processor = tiny_llava_next() if next_ else tiny_llava(DEMO) if mid else tiny_llava()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _hub_tower_names(path)


def _hub_tower_names(path: str) -> None:
    """The CLIP / SigLIP tower's weights renamed to the hub layout (``vision_tower.vision_model.*``)."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    state = {_hub_clip_name(key): value for key, value in load_file(file).items()}
    save_file(state, file, metadata={"format": "pt"})


def _save_qwen(path: str, version: str) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from tokenprune.tiny_models import tiny_qwen

    model, tiny_processor = tiny_qwen(version)
    model.save_pretrained(path)
    sizes = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tiny_processor.tokenizer,
        video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=None,
    )
    processor.save_pretrained(path)


def _hub_expert_layout(file: str) -> None:
    """Qwen3-VL-MoE's fused expert weights in the hub layout (``gate_up_proj`` [E, hidden, 2*inter], ``down_proj``
    [E, inter, hidden]), which vLLM 0.32 loads; transformers >= 5 saves them transposed (its own layout)."""
    from safetensors.torch import load_file, save_file

    state = load_file(file)
    for key, value in state.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            state[key] = value.transpose(1, 2).contiguous()
    save_file(state, file, metadata={"format": "pt"})


def _save_qwen3(path: str, family: str, hub_layout: bool = True, **sizes) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from tokenprune.tiny_qwen3 import PATCH, tiny_qwen3

    model, tiny_processor = tiny_qwen3(family, **sizes)
    if family.endswith("_moe"):  # vLLM 0.32 reads it; transformers' Qwen3-VL-MoE always renormalises the top-k
        model.config.text_config.norm_topk_prob = True
    model.save_pretrained(path)
    if family.endswith("_moe") and hub_layout:
        _hub_expert_layout(os.path.join(path, "model.safetensors"))
    sizes = dict(patch_size=PATCH, merge_size=2, temporal_patch_size=2)
    pixels = dict(min_pixels=32 * 32, max_pixels=128 * 160)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes, **pixels), tokenizer=tiny_processor.tokenizer,
        video_processor=Qwen3VLVideoProcessor(**sizes, size={"shortest_edge": 32 * 32, "longest_edge": 128 * 160}),
        chat_template=None,
    )
    processor.save_pretrained(path)


def _save_gemma3(path: str) -> None:
    from tokenprune.tiny_gemma3 import tiny_gemma3

    model, processor = tiny_gemma3(newline_runs=True)  # vLLM's processor looks up the newline-run tokens
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _hub_tower_names(path)  # SigLIP as on the hub (transformers >= 5 saves model.vision_tower.*)


def _save_internvl(path: str) -> None:
    from transformers import InternVLProcessor, InternVLVideoProcessor

    from tokenprune.tiny_internvl import TILE, TOKENS_PER_TILE, named_tokenizer, tiny_internvl

    model, tiny_processor = tiny_internvl()
    model.save_pretrained(path)
    processor = InternVLProcessor(  # the real processor (vLLM runs it); it needs the image tokens as named attributes
        image_processor=tiny_processor.image_processor, tokenizer=named_tokenizer(tiny_processor.tokenizer),
        video_processor=InternVLVideoProcessor(size={"height": TILE, "width": TILE}), image_seq_length=TOKENS_PER_TILE,
        chat_template=None,
    )
    processor.save_pretrained(path)


def _save_onevision(path: str) -> None:
    """The tiny LLaVA-OneVision (:mod:`tokenprune.tiny_onevision`): SigLIP weights in the hub layout and the real
    ``LlavaOnevisionProcessor`` (its video processor needs torchvision, present in vLLM's environment)."""
    from transformers import LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from tokenprune.tiny_onevision import TILE, tiny_onevision

    model, tiny_processor = tiny_onevision()
    model.save_pretrained(path)
    _hub_tower_names(path)
    tile = {"height": TILE, "width": TILE}
    processor = LlavaOnevisionProcessor(
        image_processor=tiny_processor.image_processor, tokenizer=tiny_processor.tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=tile, crop_size=tile),
        num_image_tokens=tiny_processor.num_image_tokens, vision_feature_select_strategy="full",
        vision_aspect_ratio=tiny_processor.vision_aspect_ratio, chat_template=None,
    )
    processor.save_pretrained(path)


def save_tiny_checkpoint(model_type: str, path: str, for_vllm: bool = True) -> str:
    """Save a tiny ``model_type`` (``"llava"``, ``"llava_next"``, ``"qwen2_vl"``, ``"qwen2_5_vl"``) model that vLLM
    can load; returns ``path``. LLaVA: 64x64 px images, 64 visual tokens; LLaVA-NeXT: 32 px tiles of 16 tokens,
    AnyRes up to 64x64 px; Qwen2/2.5: one token per 28x28 px, up to 64 per image; Qwen3-VL (+MoE): one token per
    32x32 px, up to 20 per image. ``for_vllm=False``: Qwen3-VL-MoE's experts in transformers' own layout (what
    ``from_pretrained`` of transformers >= 5 reads) instead of the hub's (what vLLM reads). ``"llava_mid"``: the serving
    benchmark's LLaVA-1.5-shaped model (336 px, 576 visual tokens, a 4-layer 512-wide LLM). ``"llava_onevision"``:
    32 px tiles of 16 tokens, AnyRes-max-9 up to 4 x 4 crops (a large image's grid is down-scaled).
    ``"gemma3"``: 96 px images, 36 tokens each (:mod:`tokenprune.tiny_gemma3`, its tokenizer with the
    newline-run tokens vLLM looks up).
    ``"internvl"``: InternVL3 in the HF format, 64 px tiles of 16 tokens (:mod:`tokenprune.tiny_internvl`), the real
    ``InternVLProcessor``. ``"qwen3_5"`` / ``"qwen3_5_moe"``: Qwen3.5 (+MoE) with Gated DeltaNet head dims of 64
    (vLLM's CPU kernel; serve in bfloat16, the only dtype it runs)."""
    savers = {"llava": _save_llava, "llava_next": lambda p: _save_llava(p, next_=True),
              "llava_mid": lambda p: _save_llava(p, mid=True), "qwen2_vl": lambda p: _save_qwen(p, "2"),
              "qwen2_5_vl": lambda p: _save_qwen(p, "2.5"), "qwen3_vl": lambda p: _save_qwen3(p, "qwen3_vl"),
              "qwen3_vl_moe": lambda p: _save_qwen3(p, "qwen3_vl_moe", hub_layout=for_vllm)}
    savers["gemma3"] = _save_gemma3
    savers["internvl"] = _save_internvl
    savers["qwen3_5"] = lambda p: _save_qwen3(p, "qwen3_5", linear_head_dim=64)  # vLLM's CPU Gated DeltaNet
    savers["qwen3_5_moe"] = lambda p: _save_qwen3(p, "qwen3_5_moe", hub_layout=for_vllm, linear_head_dim=64)
    savers["llava_onevision"] = _save_onevision
    if model_type not in savers:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {', '.join(savers)}")
    savers[model_type](path)
    return path
