"""Qwen3.5 and Qwen3.5-MoE in vLLM with visual-token pruning: vLLM's ``Qwen3_5ForConditionalGeneration`` (and its
MoE subclass) is its Qwen3-VL model with a hybrid LLM (Gated DeltaNet and full-attention layers) and a ViT without
DeepStack, so the Qwen3-VL hooks (:mod:`.qwen3`: placeholder runs cut to the kept count, original M-RoPE positions
in 4 channels, images only) serve it unchanged. vLLM 0.32's CPU build runs Gated DeltaNet in bfloat16 only.
Imported by vLLM lazily.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import Qwen3VLDummyInputsBuilder
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.qwen3 import TokenpruneQwen3VLProcessor, _Qwen3Pruning


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneQwen3VLProcessor, info=Qwen3_5ProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class TokenpruneQwen3_5ForConditionalGeneration(_Qwen3Pruning, Qwen3_5ForConditionalGeneration):
    """``Qwen3_5ForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's tokens."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:  # the stock default prefix
        super().__init__(vllm_config=vllm_config, prefix=prefix)


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneQwen3VLProcessor, info=Qwen3_5MoeProcessingInfo, dummy_inputs=Qwen3VLDummyInputsBuilder
)
class TokenpruneQwen3_5MoeForConditionalGeneration(_Qwen3Pruning, Qwen3_5MoeForConditionalGeneration):
    """``Qwen3_5MoeForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's tokens."""

    def __init__(self, *, vllm_config, prefix: str = "model") -> None:  # the stock default prefix
        super().__init__(vllm_config=vllm_config, prefix=prefix)
