"""Qwen3-VL and Qwen3-VL-MoE in vLLM with visual-token pruning after the patch merger, original M-RoPE positions kept.

The same mechanism as Qwen2/2.5-VL (:mod:`.qwen`: placeholder runs cut to the kept count, the kept tokens' original
(t, h, w) positions appended as 4 channels and written by vLLM's runner after the encoder), with two differences:

* **DeepStack**: vLLM's Qwen3-VL tower returns each token's main features followed by its DeepStack features (one
  map per ``deepstack_visual_indexes`` block, added to the first LLM layers). The method selects on the main
  features, as ``enable_pruning`` does; the DeepStack columns follow the kept rows, and a merged token gets the same
  combination of its members' DeepStack rows as of their main features (``patches/qwen3_vl.deepstack_like``).
* **Positions in 4 channels, not vLLM's 5**: vLLM's Qwen3-VL image/video format resumes the text after an image at
  the max position of the KEPT tokens; the unpruned prompt (and ``enable_pruning``) resume after the whole grid. The
  model therefore uses the Qwen2.5-VL (t, h, w, extent) format. Videos are refused while pruning (their frames
  interleave timestamp text with vision tokens, which the 4-channel format does not describe): serve them with an
  engine without ``tokenprune`` or ``limit_mm_per_prompt={"video": 0}``.

Imported by vLLM lazily.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.mrope import MediaSpan, placeholder_positions
from tokenprune.integrations.vllm.qwen import _QwenProcessor, _QwenPruning
from tokenprune.patches.qwen3_vl import deepstack_like


class TokenpruneQwen3VLProcessor(_QwenProcessor, Qwen3VLMultiModalProcessor):
    """Qwen3-VL's processor with pruned placeholder runs (also Qwen3-VL-MoE's and Qwen3.5's)."""


class _Qwen3Pruning(_QwenPruning):
    def _tokenprune_init(self, vllm_config) -> None:
        super()._tokenprune_init(vllm_config)
        if self.tokenprune is None:
            return
        if vllm_config.model_config.multimodal_config.get_limit_per_prompt("video") > 0:
            raise ValueError(
                "tokenprune on Qwen3-VL in vLLM prunes images only; videos (frames interleaved with timestamp text) "
                "are not served while pruning. Start the engine with limit_mm_per_prompt={'image': N, 'video': 0} "
                "(CLI: --limit-mm-per-prompt '{\"image\": N, \"video\": 0}'), or serve videos without tokenprune"
            )

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.tokenprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        spans = []
        for feature in mm_features:  # images only (videos refused at start)
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            spans.append(MediaSpan(feature.mm_position.offset, feature.mm_position.length, t, h // merge, w // merge))
        return placeholder_positions(len(input_tokens), spans)

    def _tokenprune_split(self, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return item[:, : self.visual_dim], item[:, self.visual_dim:]

    def _tokenprune_join(self, chosen, features: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        if extra is None or extra.shape[1] == 0:
            return chosen.features
        deepstack = [deepstack_like(level, features, chosen) for level in extra.split(self.visual_dim, dim=1)]
        return torch.cat([chosen.features, *deepstack], dim=1)


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneQwen3VLProcessor, info=Qwen3VLProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class TokenpruneQwen3VLForConditionalGeneration(_Qwen3Pruning, Qwen3VLForConditionalGeneration):
    """``Qwen3VLForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's tokens."""


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneQwen3VLProcessor, info=Qwen3VLMoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class TokenpruneQwen3VLMoeForConditionalGeneration(_Qwen3Pruning, Qwen3VLMoeForConditionalGeneration):
    """``Qwen3VLMoeForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's
    tokens."""
