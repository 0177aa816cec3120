"""LLaVA-1.5 in vLLM with visual-token pruning after the projector.

The processor reserves the kept count of placeholders per image (``get_num_image_tokens``), the model returns that
many projected tokens per image. The CLIP signals are those of ``enable_pruning``: the same probe
(:class:`tokenprune.patches.clip_signals.ClipProbe`) recomputes what the method asked for from each layer's own
projections (vLLM's fused ``qkv_proj``, seen as ``q_proj``/``k_proj`` with every head gathered from the
tensor-parallel ranks), never from the attention kernel. Prompt-dependent methods get the prompt's text through
:mod:`.prompt_text`. Imported by vLLM lazily, in the engine and worker processes.
"""

from __future__ import annotations

import math

import torch
from transformers import CLIPVisionConfig, SiglipVisionConfig
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
from tokenprune.integrations.vllm.placeholders import check_embedding_request, pruned_prompt_updates
from tokenprune.integrations.vllm.prompt_text import PromptTextModel, PromptTextProcessor, check_cache_type
from tokenprune.integrations.vllm.selection import select_image
from tokenprune.methods import FEATURES, TEXT_EMBEDDINGS, SignalRequest
from tokenprune.patches.clip_signals import OUTPUT_SIGNALS, PROBE_SIGNALS, ClipProbe


def _pruning(hf_config, cls_token: bool = True) -> VllmPruning | None:
    return parse_options(getattr(hf_config, CONFIG_KEY, None), cls_token=cls_token)


def placeholder_text(hf_config, pruning: VllmPruning | None,
                     modalities: tuple[str, ...] = ("image",)) -> tuple[int, tuple[int, ...]] | None:
    """``PromptTextProcessor._tokenprune_text`` of a LLaVA-family config: the image token and the placeholder tokens
    of ``modalities`` (``<modality>_token_id``, or ``<modality>_token_index`` on older configs), or None when the
    method needs no prompt text."""
    if pruning is None or pruning.keeps_all or TEXT_EMBEDDINGS not in pruning.method.needs:
        return None
    ids = tuple(getattr(hf_config, f"{m}_token_id", None) or getattr(hf_config, f"{m}_token_index") for m in modalities)
    return ids[0], ids


class TokenpruneLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        pruning = _pruning(self.get_hf_config())
        return n if pruning is None else pruning.kept(n)


class TokenpruneLlavaMultiModalProcessor(PromptTextProcessor, LlavaMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        """Pixel images get the kept count from ``get_num_image_tokens``; image embeddings are cut here."""
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        pruning = _pruning(self.info.get_hf_config())
        check_embedding_request(pruning, mm_items, cls_token=True)
        return pruned_prompt_updates(updates, pruning, only_embeddings_of=mm_items)

    def _tokenprune_text(self):
        config = self.info.get_hf_config()
        return placeholder_text(config, _pruning(config))


class _FusedPart:
    """``q_proj`` / ``k_proj`` of a vLLM CLIP attention (one fused ``qkv_proj``), all heads on every rank."""

    def __init__(self, attn: torch.nn.Module, part: int) -> None:
        self.attn, self.part = attn, part

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.attn.qkv_proj(hidden)
        out = qkv.chunk(3, dim=-1)[self.part]
        if self.attn.num_heads_per_partition != self.attn.num_heads:  # tensor-parallel tower: gather the heads
            out = tensor_model_parallel_all_gather(out.contiguous(), dim=-1)
        return out


def _signal_only_forward(layer: torch.nn.Module):
    """Forward of a layer past vLLM's truncated tower: its attention runs (the probe's pre-hook reads its input),
    its input passes through unchanged, so the features stay the feature layer's."""
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        layer.self_attn(hidden_states=layer.layer_norm1(hidden_states))
        return hidden_states
    return forward


class ClipPruning(PromptTextModel):
    """What LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision share in vLLM (mixed in before the stock class): the options,
    the CLIP probe (layers, ``q_proj``/``k_proj`` views), the prompt text of prompt-dependent methods
    (:class:`PromptTextModel`), the record of kept tokens. ``tokenprune_cls_token``: whether the tower has a [CLS]
    token (False: LLaVA-OneVision's SigLIP)."""

    tokenprune_cls_token = True

    def _tokenprune_init(self, vllm_config, prefix: str) -> None:
        self.tokenprune = _pruning(self.config, self.tokenprune_cls_token)
        self.tokenprune_kept: list[torch.Tensor] = []  # the kept tokens of each image of the last encoder call
        self._requests: list[SignalRequest] = []   # the method's requests, layers made non-negative
        self._keys: dict[str, str] = {}            # probe key -> the method's key
        self._feature_layer = len(self.vision_tower.vision_model.encoder.layers) - 1
        if self.tokenprune is None:
            return
        if TEXT_EMBEDDINGS in self.tokenprune.method.needs:
            check_cache_type(vllm_config)
        requests = [r for r in self.tokenprune.method.requests(cls_token=self.tokenprune_cls_token)
                    if r.name in PROBE_SIGNALS]
        if requests:
            self._install_probe_layers(requests, vllm_config, prefix)

    def _install_probe_layers(self, requests, vllm_config, prefix: str) -> None:
        """Give the tower's attention modules ``q_proj``/``k_proj`` views and build the layers the probe needs.

        vLLM builds the tower only up to the feature layer. A layer past it (k-center's pivot reads the LAST layer)
        is appended as a signal-only layer (:func:`_signal_only_forward`; its weights are loaded).
        """
        vision = self.config.vision_config
        if not isinstance(vision, (CLIPVisionConfig, SiglipVisionConfig)):
            raise ValueError(
                f"{self.tokenprune.method.name} needs CLIP signals {sorted(r.key for r in requests)}; this model's "
                f"vision tower is {type(vision).__name__}"
            )
        layers = self.vision_tower.vision_model.encoder.layers
        total, built = vision.num_hidden_layers, len(layers)
        for request in requests:
            if request.layer is not None and not -total <= request.layer < total:
                raise ValueError(
                    f"{self.tokenprune.method.name} asks for {request.name} at vision layer {request.layer}; the "
                    f"tower has {total} layers (valid: {-total}..{total - 1})"
                )
            index = built - 1 if request.layer is None else request.layer % total
            if index >= built and request.name in OUTPUT_SIGNALS:
                raise ValueError(
                    f"{self.tokenprune.method.name} asks for {request.name} at vision layer {request.layer}, past the "
                    f"feature layer vLLM builds the tower up to; the plugin reads attention signals there only"
                )
            if index >= built and not isinstance(vision, CLIPVisionConfig):
                raise ValueError(f"{self.tokenprune.method.name} asks for vision layer {request.layer}, past the "
                                 f"feature layer vLLM builds the {type(vision).__name__} tower up to")
            while len(layers) <= index:
                layer = CLIPEncoderLayer(
                    vision, vllm_config.quant_config, attn_cls=MMEncoderAttention,
                    prefix=f"{maybe_prefix(prefix, 'vision_tower')}.vision_model.encoder.layers.{len(layers)}",
                )
                layer.forward = _signal_only_forward(layer)
                layers.append(layer)
            probe_request = SignalRequest(request.name, None if request.layer is None else index)
            self._requests.append(probe_request)
            self._keys[probe_request.key] = request.key
        for layer in layers:
            layer.self_attn.q_proj = _FusedPart(layer.self_attn, 0)
            layer.self_attn.k_proj = _FusedPart(layer.self_attn, 1)

    def _probe(self) -> ClipProbe:
        return ClipProbe(self.vision_tower, self._requests, self._feature_layer)

    def _probed_rows(self, probe: ClipProbe, n_rows: int) -> list[dict[str, torch.Tensor]]:
        """Per row of the vision batch (an image or a crop), its signals under the method's keys."""
        if not self._requests:
            return [{} for _ in range(n_rows)]
        drop_cls = self.config.vision_feature_select_strategy == "default"
        return [{self._keys[key]: value for key, value in row.items()} for row in probe.per_image(drop_cls=drop_cls)]


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneLlavaMultiModalProcessor, info=TokenpruneLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenpruneLlavaForConditionalGeneration(ClipPruning, LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's tokens.

    Images given as ``image_embeds`` (the projector's output) are pruned by the methods that select on the projected
    features; the processor refuses the others for such requests.
    """

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config, prefix)

    def _process_image_input(self, image_input):
        if self.tokenprune is None or self.tokenprune.keeps_all:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":  # image embeddings: projected features only
            return self._pruned_embeddings(super()._process_image_input(image_input))
        with self._probe() as probe:
            embeds = super()._process_image_input(image_input)  # [B, N, D]: pixel inputs share one size
        rows = self._probed_rows(probe, embeds.shape[0])
        n = embeds.shape[1]
        side = math.isqrt(n)
        grid = (side, side) if side * side == n else None
        kept, self.tokenprune_kept = [], []
        for b in range(embeds.shape[0]):
            signals = {**rows[b], FEATURES: embeds[b], **self._text_signals(b, embeds.device, cls_token=True)}
            chosen = select_image(self.tokenprune, embeds[b], signals, grid, cls_token=True,
                                  project=self.multi_modal_projector)
            kept.append(chosen.features)
            self.tokenprune_kept.append(chosen.kept)
        return torch.stack(kept)

    def _pruned_embeddings(self, embeds) -> list[torch.Tensor]:
        """The selection of each image given as embeddings ``[n, D]`` (the processor reserved its kept count)."""
        out, self.tokenprune_kept = [], []
        for b, emb in enumerate(embeds):
            side = math.isqrt(emb.shape[0])
            grid = (side, side) if side * side == emb.shape[0] else None
            signals = {FEATURES: emb, **self._text_signals(b, emb.device, cls_token=True)}
            chosen = select_image(self.tokenprune, emb, signals, grid, cls_token=True,
                                  project=self.multi_modal_projector)
            out.append(chosen.features)
            self.tokenprune_kept.append(chosen.kept)
        return out
