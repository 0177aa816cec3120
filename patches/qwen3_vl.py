"""Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE (model_types ``qwen3_vl``, ``qwen3_vl_moe``, ``qwen3_5``,
``qwen3_5_moe``): vision-stage pruning of images and videos.

What is the same as Qwen2-VL, and so inherited from :class:`~tokenprune.patches.qwen2_vl.QwenVLAdapter`: the vision
tower returns merged 2x2 tokens per image/video through ``get_image_features`` / ``get_video_features``, the model
takes them back as ``mm_encoder_outputs``, M-RoPE positions come from the model's own ``get_rope_index`` on the
UNPRUNED prompt and are gathered for the kept tokens (interleaved M-RoPE is a property of the rotary tables, not of
the position ids), ``rope_deltas`` continues decoding at the unpruned prompt's next position, videos are budgeted
per frame. The Qwen3-VL video prompt writes each frame's timestamp as text between frames; those are text tokens
and are never pruned, and the frame's tokens are one selection unit as before.

What differs:

* **DeepStack** (Qwen3-VL and its MoE): the vision output also carries one feature map per
  ``deepstack_visual_indexes`` ViT block, added to the hidden states of the first LLM layers at the visual positions.
  Each DeepStack map is gathered with the same kept indices as the main features; a merged token (VisionDrop's
  contextual tokens) gets the same combination of its members' DeepStack rows as of their main features (the
  weights recovered from the main features by least squares, checked to reproduce them).
* **Qwen3.5's hybrid decoder** (Gated DeltaNet linear attention in three layers of four): a vision-stage pruning
  only shortens the prompt; every layer, linear or full, runs on the pruned sequence with its own cache.
* **Decoder-stage methods** (FastV, PDrop, ...) run on Qwen3-VL (dense and MoE) from LLM layer
  ``len(deepstack_visual_indexes)`` on (3 on the released checkpoints): every DeepStack map has been added by then,
  so the Qwen2 decoder loop applies unchanged. A method whose first pruned layer comes earlier (FastV's default
  ``k=2``) declines with an error that says which layer to set; handing the later DeepStack maps only the surviving
  tokens is not wired. On Qwen3.5 they decline: its linear-attention layers carry a recurrent and a conv state that
  a pruning step inside the LLM would have to rebuild on the pruned sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.patches.qwen2_vl import QwenVLAdapter
from tokenprune.patches.units import ImageSelection

RELEASED_DEEPSTACK_LEVELS = 3  # deepstack_visual_indexes [8, 16, 24] of the released Qwen3-VL checkpoints
_MERGE_TOLERANCE = 1e-4  # relative residual of a merged token rebuilt from its members' main features


class Qwen3VLAdapter(QwenVLAdapter):
    model_types = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")

    @classmethod
    def decoder_reason(cls, model_type: str, name: str, first_layer: int, config: Any = None) -> str | None:
        if model_type.startswith("qwen3_5"):
            return (
                f"decoder-stage method {name!r} is not supported on {model_type!r} yet: pruning inside its hybrid "
                f"LLM would have to let the Gated DeltaNet linear-attention layers after the pruning step rebuild "
                f"their recurrent and conv state on the pruned sequence. Use a vision-stage method (e.g. "
                f"'divprune', 'cdpruner', 'hiprune') on this model"
            )
        levels = (len(config.vision_config.deepstack_visual_indexes) if config is not None
                  else RELEASED_DEEPSTACK_LEVELS)
        if first_layer < levels:
            return (
                f"decoder-stage method {name!r} prunes from LLM layer {first_layer}, but this {model_type!r} model "
                f"still adds DeepStack visual features after layers 0..{levels - 1} ({levels} "
                f"deepstack_visual_indexes); pruning is supported from layer {levels} on. Set the method's layer "
                f"option to {levels} or later (e.g. fastv k={levels})"
            )
        return None

    def _encoder_output(
        self, vision_out: Any, features: list[torch.Tensor], kept: list[torch.Tensor], chosen: list[ImageSelection]
    ) -> BaseModelOutputWithPooling:
        levels = getattr(vision_out, "deepstack_features", None)
        if not levels:  # Qwen3.5: no DeepStack
            return BaseModelOutputWithPooling(pooler_output=kept)
        out = type(vision_out)(pooler_output=kept)  # BaseModelOutputWithDeepstackFeatures
        out.deepstack_features = [
            [deepstack_like(level[i], features[i], c) for i, c in enumerate(chosen)] for level in levels
        ]
        return out


def deepstack_like(deepstack: torch.Tensor, features: torch.Tensor, chosen: ImageSelection) -> torch.Tensor:
    """One image's DeepStack map ``[n, Ds]`` reduced as its main ``features`` ``[n, D]`` were: the kept rows in
    ``chosen.slots`` order, and each merged token the same combination of its members' rows as of their features."""
    rows = deepstack[chosen.slots.to(deepstack.device)]
    if not chosen.n_merged:
        return rows
    assign = chosen.assign
    for j in range(chosen.n_merged):
        group = (assign == j).nonzero().squeeze(1)
        where = int((chosen.slots == group.min()).nonzero()[0, 0])
        target = chosen.features[where].double()
        members = features[group.to(features.device)].double()  # [m, D]
        weights = torch.linalg.lstsq(members.T, target[:, None]).solution[:, 0]  # [m]
        residual = float((weights @ members - target).norm() / target.norm().clamp_min(1e-12))
        if residual > _MERGE_TOLERANCE:
            raise RuntimeError(
                f"a merged token is not a linear combination of the tokens it absorbed (relative residual "
                f"{residual:.2e}); its DeepStack features cannot be merged the same way. Use a method that keeps "
                f"tokens without merging on Qwen3-VL"
            )
        rows[where] = (weights @ deepstack[group.to(deepstack.device)].double()).to(rows.dtype)
    return rows
