"""LLaVA-1.5 in vLLM with visual-token pruning after the projector.

The processor reserves the kept count of placeholders per image (``get_num_image_tokens``), the model returns that
many projected tokens per image. [CLS] attention is recomputed for the [CLS] query row only, from the CLIP layer's
own ``qkv_proj`` (a forward pre-hook on that layer's attention captures its input), never read from the kernel.
Imported by vLLM lazily, in the engine and worker processes.
"""

from __future__ import annotations

import math

import torch
from transformers import CLIPVisionConfig
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.layers.attention import MMEncoderAttention
from vllm.model_executor.models.clip import CLIPEncoderLayer
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.options import CONFIG_KEY, VllmPruning, parse_options
from tokenprune.integrations.vllm.selection import image_rows, select_image
from tokenprune.methods import CLS_ATTENTION, FEATURES


def _pass_through(hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states


def _pruning(hf_config) -> VllmPruning | None:
    return parse_options(getattr(hf_config, CONFIG_KEY, None), cls_token=True)


class TokenpruneLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        pruning = _pruning(self.get_hf_config())
        return n if pruning is None else pruning.kept(n)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=TokenpruneLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's tokens.

    Images given as ``image_embeds`` are not pruned (their placeholder count is their own row count).
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenprune = _pruning(self.config)
        self._captured: dict[str, torch.Tensor] | None = None
        self._cls_keys: list[str] = []
        if self.tokenprune is None:
            return
        requests = [r for r in self.tokenprune.method.requests(cls_token=True) if r.name == CLS_ATTENTION]
        if requests:
            self._install_cls_probes(requests, vllm_config, prefix)

    # --- signals -------------------------------------------------------------------------------------------------
    def _install_cls_probes(self, requests, vllm_config, prefix: str) -> None:
        """A forward pre-hook per requested CLIP layer computes its [CLS] attention row from the layer's input.

        vLLM builds the tower only up to the feature layer. A layer past it (k-center's pivot reads the LAST layer)
        is appended as a signal-only layer: its weights are loaded, the pre-hook reads its input (the feature
        layer's output), and its forward returns that input unchanged, so the features stay the feature layer's.
        """
        vision = self.config.vision_config
        if not isinstance(vision, CLIPVisionConfig):
            raise ValueError(
                f"{self.tokenprune.method.name} needs [CLS] attention from a CLIP vision tower; this model's tower is "
                f"{type(vision).__name__}"
            )
        layers = self.vision_tower.vision_model.encoder.layers
        total, built = vision.num_hidden_layers, len(layers)
        for request in requests:
            if request.layer is not None and not -total <= request.layer < total:
                raise ValueError(
                    f"{self.tokenprune.method.name} asks for [CLS] attention at vision layer {request.layer}; the "
                    f"tower has {total} layers (valid: {-total}..{total - 1})"
                )
            index = built - 1 if request.layer is None else request.layer % total
            while len(layers) <= index:
                i = len(layers)
                layer = CLIPEncoderLayer(
                    vision, vllm_config.quant_config, attn_cls=MMEncoderAttention,
                    prefix=f"{maybe_prefix(prefix, 'vision_tower')}.vision_model.encoder.layers.{i}",
                )
                layer.forward = _pass_through
                layers.append(layer)
            layers[index].register_forward_pre_hook(self._cls_hook(request.key))
            self._cls_keys.append(request.key)

    def _cls_hook(self, key: str):
        def hook(layer, args):
            if self._captured is not None:
                self._captured[key] = self._cls_attention(layer.self_attn, layer.layer_norm1(args[0]))
        return hook

    @staticmethod
    def _cls_attention(attn, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, H, T]`` fp32 softmax of the [CLS] query row over all keys of this layer, every head of the layer
        (heads are gathered from the tensor-parallel ranks)."""
        batch, length, _ = hidden.shape
        heads, head_dim = attn.num_heads_per_partition, attn.head_dim
        with torch.no_grad():
            qkv, _ = attn.qkv_proj(hidden)
            q, k, _ = qkv.chunk(3, dim=-1)
            q = q[:, :1].float().view(batch, 1, heads, head_dim).transpose(1, 2)       # [B, h, 1, d]
            k = k.float().view(batch, length, heads, head_dim).transpose(1, 2)          # [B, h, T, d]
            probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)[:, :, 0]  # [B, h, T]
        if heads != attn.num_heads:  # tensor-parallel tower: each rank holds num_heads / tp heads
            probs = tensor_model_parallel_all_gather(probs.contiguous(), dim=1)
        return probs

    # --- pruning -------------------------------------------------------------------------------------------------
    def _process_image_input(self, image_input):
        if self.tokenprune is None or self.tokenprune.keeps_all or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        captured = self._captured = {}
        try:
            embeds = super()._process_image_input(image_input)  # [B, N, D]: pixel inputs share one size
        finally:
            self._captured = None
        drop_cls = self.config.vision_feature_select_strategy == "default"
        n = embeds.shape[1]
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else None
        kept = []
        for b in range(embeds.shape[0]):
            signals = {FEATURES: embeds[b]}
            for key in self._cls_keys:
                signals[key] = captured[key][b, :, 1:] if drop_cls else captured[key][b]   # [H, N]
            selection = select_image(self.tokenprune, n, signals, grid, cls_token=True, allow_extra_rows=True)
            kept.append(image_rows(embeds[b], selection))
        return torch.stack(kept)
