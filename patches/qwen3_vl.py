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
* **Decoder-stage methods** (FastV, PDrop, ...) run on Qwen3-VL (dense and MoE) at their paper layers. The
  DeepStack maps are added after LLM layers ``0 .. len(deepstack_visual_indexes) - 1`` (0, 1, 2 on the released
  checkpoints); a pruning step before the last of them (FastV's ``K=2``) hands the later additions only the
  surviving tokens' DeepStack rows (``patches/deepstack_carry.py``, run by the decoder loop).
* **Decoder-stage methods on Qwen3.5's hybrid LLM** (:meth:`Qwen3VLAdapter.decoder_plan`): the attention a stage
  scores with can only be recomputed at a full-attention layer, so each stage's scoring layer moves to the first
  full-attention layer at or after the paper's, and its pruning layer follows at the paper's offset (FastV K=2,
  scored at layer 1: scored at 3, pruned from 4; PDrop's 8/16/24, scored at their own layer: 11/19/27). The Gated
  DeltaNet layers after a pruning step run on the pruned sequence and build their conv and recurrent state from it
  (the loop hands them the 2-D padding mask of the pruned layout), so cached decoding continues on that state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.patches.qwen2_vl import QwenVLAdapter
from tokenprune.patches.units import ImageSelection

# LLM depth of the released checkpoints (Qwen3.5-9B, Qwen3.5-35B-A3B): full attention in layers 3, 7, 11, ...
RELEASED_QWEN3_5_LAYERS = {"qwen3_5": 32, "qwen3_5_moe": 40}
_MERGE_TOLERANCE = 1e-4  # relative residual of a merged token rebuilt from its members' main features


class Qwen3VLAdapter(QwenVLAdapter):
    model_types = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")

    @classmethod
    def mixture_of_experts(cls, model_type: str) -> bool:
        return model_type.endswith("_moe")

    @classmethod
    def decoder_plan(cls, name: str, plan: tuple, config: Any = None, model_type: str | None = None) -> tuple:
        """Qwen3.5 (hybrid): each stage scored at the first full-attention layer at or after its paper scoring layer,
        pruned at the paper's offset after it (module docstring); other models: the plan unchanged. ``config=None``:
        the released layout of ``model_type`` (Qwen3.5-9B: 32 layers, Qwen3.5-35B-A3B: 40; full attention in every
        4th)."""
        if config is not None:
            types = list(getattr(config.get_text_config(), "layer_types", None) or [])
        elif model_type in RELEASED_QWEN3_5_LAYERS:
            depth = RELEASED_QWEN3_5_LAYERS[model_type]
            types = [("full_attention" if i % 4 == 3 else "linear_attention") for i in range(depth)]
        else:
            return plan
        if "linear_attention" not in types:
            return plan
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        mapped, last = [], -1
        for p in plan:
            score = next((i for i in full if i >= p.score_layer), None)
            layer = None if score is None else score + p.layer - p.score_layer
            # the first full-attention layer keeps the whole prompt: HF reads the cache length there
            if layer is None or layer >= len(types) or layer <= max(last, full[0]):
                raise ValueError(
                    f"{name}: stage pruned at layer {p.layer} (scored at {p.score_layer}) maps to no layer of this "
                    f"{len(types)}-layer hybrid LLM: scores are read at full-attention layers only ({full}), the "
                    f"first one at or after the paper's, the pruning follows at the paper's offset, after the first "
                    f"full-attention layer (whose cache HF reads the prompt length from), and the stages stay in "
                    f"order. Set the method's layer option to other layers"
                )
            mapped.append(dataclasses.replace(p, layer=layer, score_layer=score))
            last = layer
        return tuple(mapped)

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
