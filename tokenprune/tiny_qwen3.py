"""Small Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE models, built offline from configs (tests, docs snippets).

The real transformers classes (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``) with random weights and the word-level
tokenizer of :mod:`tokenprune.tiny_models`. The processor is a stand-in (:class:`TinyQwen3Processor`): the real
``Qwen3VLProcessor`` needs torchvision for its video processor. What differs from Qwen2-VL:

* ViT patch 16 (one LLM token per 32x32 px after the 2x2 merge), learned position embeddings, no window attention;
* Qwen3-VL (dense and MoE): DeepStack -- the features of ``deepstack_visual_indexes`` ViT blocks are added to the
  hidden states of the first LLM layers at the visual positions;
* interleaved M-RoPE (``mrope_section`` spread over t/h/w frequencies in turn);
* videos are prompted frame by frame with the frame's timestamp as text in between (Qwen3-VL's processor);
* Qwen3.5: a hybrid decoder -- Gated DeltaNet linear attention in three layers of four, gated full attention in
  every fourth (``layer_types``).
"""

from __future__ import annotations

import torch

from tokenprune.tiny_models import TinyQwenProcessor, _finish, qwen_tokenizer

QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
PATCH = 16


class TinyQwen3Processor(TinyQwenProcessor):
    """:class:`TinyQwenProcessor` with Qwen3-VL's video prompt: each ``<|video_pad|>`` becomes, per temporal patch
    (frame pair), its timestamp as text then ``<|vision_start|>`` + the frame's tokens + ``<|vision_end|>``.

    Timestamps are ``t / fps`` of the middle of each frame pair (``fps`` = 2 here), written as digit tokens
    (``"0 . 5"``: the word-level tokenizer has no ``<0.5 seconds>`` token); they are text and never pruned.
    """

    fps = 2.0

    def __call__(self, text, images=None, videos=None, return_tensors="pt", padding=True):
        texts = [text] if isinstance(text, str) else list(text)
        if videos:
            grids = [v[1][0] for v in videos]
            texts = [self._frames(t, grids) for t in texts]
            if grids:
                raise ValueError("more videos than <|video_pad|> placeholders in the text")
        return super().__call__(texts, images=images, videos=videos, return_tensors=return_tensors, padding=padding)

    def _video_token_counts(self, grid_thw: torch.Tensor) -> list[int]:
        """One ``<|video_pad|>`` per frame (temporal patch) after :meth:`_frames`: ``h*w / merge**2`` tokens each."""
        per_frame = (grid_thw[:, 1:].prod(-1) // self.merge_size**2).tolist()
        return [n for n, t in zip(per_frame, grid_thw[:, 0].tolist(), strict=True) for _ in range(t)]

    def _frames(self, text: str, grids: list[torch.Tensor]) -> str:
        parts = text.split("<|video_pad|>")
        pieces = [parts[0]]
        for part in parts[1:]:
            if not grids:
                raise ValueError("more <|video_pad|> placeholders in the text than videos")
            t = int(grids.pop(0)[0])
            frames = []
            for f in range(t):
                stamp = f"{(2 * f + 0.5) / self.fps:.1f}".replace(".", " . ")
                frames.append(f" {stamp} <|vision_start|><|video_pad|><|vision_end|>")
            pieces.append("".join(frames) + part)
        return "".join(pieces)


def tiny_qwen3(
    family: str = "qwen3_vl", attn_implementation: str = "sdpa", seed: int = 0, max_pixels: int = 128 * 160,
    text_layers: int | None = None, vision_layers: int = 3, deepstack: tuple[int, ...] | None = None,
    linear_head_dim: int = 16,
):
    """``(model, processor)`` of ``family`` (one of :data:`QWEN3_FAMILIES`) with random weights.

    ``vision_layers`` ViT blocks (width 64); ``text_layers`` LLM layers (default 2 for Qwen3-VL, 4 for Qwen3.5: one
    full-attention layer, 3); ``deepstack`` the DeepStack ViT blocks of Qwen3-VL (default: every block but the
    last, at most 3). MoE variants: 4 experts, 2 active per token. ``linear_head_dim``: Qwen3.5's Gated DeltaNet
    key/value head dim (vLLM's CPU kernel needs multiples of 32: its checkpoint uses 32).
    """
    from transformers import Qwen2VLImageProcessorPil

    if family not in QWEN3_FAMILIES:
        raise ValueError(f"family must be one of {QWEN3_FAMILIES}; got {family!r}")
    tok, ids = qwen_tokenizer()
    moe = family.endswith("_moe")
    hybrid = family.startswith("qwen3_5")
    layers = text_layers if text_layers is not None else (4 if hybrid else 2)
    text = dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, rms_norm_eps=1e-6,
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    if hybrid:  # head_dim 64, a quarter of it rotary (as the real 0.25): 8 frequencies split t/h/w
        text.update(head_dim=64, linear_conv_kernel_dim=4, linear_key_head_dim=linear_head_dim,
                    linear_value_head_dim=linear_head_dim,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                     "mrope_section": [3, 3, 2], "mrope_interleaved": True})
        if moe:
            text.update(shared_expert_intermediate_size=64)
    else:  # head_dim 32: 16 frequencies
        text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [6, 5, 5], "mrope_interleaved": True})
    vision = dict(depth=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                  patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    if not hybrid:
        vision["deepstack_visual_indexes"] = list(
            deepstack if deepstack is not None else range(max(0, vision_layers - 4), vision_layers - 1)
        )
    config_cls, model_cls = _classes(family)
    config = config_cls(text_config=text, vision_config=vision, **ids)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = _finish(model_cls(config), tok, attn_implementation)
    # Random weights may emit a placeholder id, which a use_cache=False step would then take for an image token
    # (the real checkpoints never emit them): suppress the four vision ids in generation.
    model.generation_config.suppress_tokens = sorted(ids.values())
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=max_pixels,
    )
    return model, TinyQwen3Processor(tok, image_processor)


def _classes(family: str):
    import transformers

    names = {
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
        "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration"),
        "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration"),
        "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration"),
    }[family]
    return tuple(getattr(transformers, n) for n in names)


# Depths of the public checkpoints (config.json on the Hugging Face hub), at tiny width:
# Qwen3-VL-8B-Instruct: ViT 27 blocks, DeepStack blocks 8/16/24, LLM 36 layers;
# Qwen3-VL-30B-A3B-Instruct: ViT 27, DeepStack 8/16/24, LLM 48 layers (128 experts, 8 active);
# Qwen3.5-9B: ViT 27, LLM 32 layers (full attention in every 4th: 3, 7, ..., 31);
# Qwen3.5-35B-A3B: ViT 27, LLM 40 layers (full attention in every 4th; 256 experts, 8 active).
QWEN3_REAL_DEPTH = {
    "qwen3_vl": dict(vision_layers=27, text_layers=36, deepstack=(8, 16, 24)),
    "qwen3_vl_moe": dict(vision_layers=27, text_layers=48, deepstack=(8, 16, 24)),
    "qwen3_5": dict(vision_layers=27, text_layers=32),
    "qwen3_5_moe": dict(vision_layers=27, text_layers=40),
}


def random_video3(frames: int, height: int, width: int, seed: int = 0):
    """``(pixel_values_videos, video_grid_thw)`` of a random clip in the Qwen3 layout (patch 16): ``frames`` even,
    ``height``/``width`` multiples of 32."""
    if frames % 2 or height % 32 or width % 32:
        raise ValueError("frames must be even and height/width multiples of 32 (patch 16, 2x2 merge)")
    grid = torch.tensor([[frames // 2, height // PATCH, width // PATCH]])
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(int(grid.prod()), 3 * 2 * PATCH * PATCH, generator=generator), grid
