"""Qwen2-VL and Qwen2.5-VL in vLLM with visual-token pruning after the patch merger, original M-RoPE positions kept.

Processor: each image's placeholder run is cut to the kept count. Model: selects the kept merged tokens of each
image and appends their original (t, h, w) positions plus the image's extent as 4 extra channels (videos: all
tokens, unpruned); vLLM's runner strips them in ``recompute_mrope_positions`` and rewrites the prompt's positions
(:mod:`tokenprune.integrations.vllm.mrope`; ``runner.py`` turns that step on). Imported by vLLM lazily.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.mrope import MediaSpan, media_coords, placeholder_positions
from tokenprune.integrations.vllm.options import CONFIG_KEY, VllmPruning, parse_options
from tokenprune.integrations.vllm.placeholders import check_embedding_request, pruned_prompt_updates
from tokenprune.integrations.vllm.prompt_text import TEXT_FIELD, PromptTextProcessor, check_cache_type
from tokenprune.integrations.vllm.qwen_probe import QWEN_VLLM_SIGNALS, VllmQwenProbe
from tokenprune.integrations.vllm.selection import select_image
from tokenprune.methods import FEATURES, TEXT_EMBEDDINGS


def _pruning(hf_config) -> VllmPruning | None:
    pruning = parse_options(getattr(hf_config, CONFIG_KEY, None), cls_token=False)
    return None if pruning is None or pruning.keeps_all else pruning


class _QwenProcessor(PromptTextProcessor):
    """Shared by the Qwen families' processors (mixed in before the stock class): each image's placeholder run cut
    to its kept count (image embeddings checked first), the prompt text attached for prompt-dependent methods."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        pruning = _pruning(self.info.get_hf_config())
        check_embedding_request(pruning, mm_items, cls_token=False)
        return pruned_prompt_updates(updates, pruning)

    def _tokenprune_text(self):
        pruning = _pruning(self.info.get_hf_config())
        if pruning is None or TEXT_EMBEDDINGS not in pruning.method.signals_needed(cls_token=False):
            return None
        config = self.info.get_hf_config()
        return config.image_token_id, (config.image_token_id, config.video_token_id)


class TokenpruneQwen2VLProcessor(_QwenProcessor, Qwen2VLMultiModalProcessor):
    """Qwen2-VL's processor with pruned placeholder runs."""


class TokenpruneQwen2_5_VLProcessor(_QwenProcessor, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor with pruned placeholder runs."""


class _QwenPruning:
    """Shared by the Qwen families (mixed in before the stock class)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config)

    def _tokenprune_init(self, vllm_config) -> None:
        self.tokenprune = _pruning(self.config)
        self.tokenprune_kept: list[torch.Tensor] = []  # the kept tokens of each image of the last encoder call
        if self.tokenprune is None:
            return
        if vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled():
            raise ValueError(
                "tokenprune image pruning and vLLM's video pruning (video_pruning_rate > 0, EVS) cannot be combined "
                "on Qwen in this version; unset video_pruning_rate"
            )
        if vllm_config.use_v2_model_runner:
            raise ValueError(
                "tokenprune on Qwen2-VL/Qwen2.5-VL needs vLLM's V1 model runner (it rewrites M-RoPE positions after "
                "the encoder through the V1 runner's EVS hook); set VLLM_USE_V2_MODEL_RUNNER=0"
            )
        needs = self.tokenprune.method.signals_needed(cls_token=False)
        self._requests = [r for r in self.tokenprune.method.requests(cls_token=False) if r.name in QWEN_VLLM_SIGNALS]
        if self._requests and self.use_data_parallel:
            raise ValueError(
                f"{self.tokenprune.method.name} reads signals inside the ViT, which runs sharded by image with "
                f"mm_encoder_tp_mode='data'; serve it with the default mm_encoder_tp_mode='weights'"
            )
        for request in self._requests:
            VllmQwenProbe(self.visual, [], []).block_index(request.layer)  # a bad layer fails here, not mid-request
        if self._requests and vllm_config.compilation_config.compile_mm_encoder:
            raise ValueError(
                f"{self.tokenprune.method.name} reads signals inside the ViT, which a compiled encoder hides; serve it "
                f"without compile_mm_encoder (the default)"
            )
        if TEXT_EMBEDDINGS in needs:
            check_cache_type(vllm_config)

    @property
    def tokenprune_recomputes_mrope(self) -> bool:
        """Read by the patched runner (runner.py): positions must be rewritten after the encoder."""
        return self.tokenprune is not None

    def recompute_mrope_positions(self, *args, **kwargs):
        return Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions(self, *args, **kwargs)

    def get_encoder_cudagraph_config(self):
        # Encoder CUDA graphs bypass embed_multimodal (no pruning, no position channels): off while pruning, as
        # vLLM does for EVS.
        config = super().get_encoder_cudagraph_config()
        return config if self.tokenprune is None else dataclasses.replace(config, modalities=[])

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.tokenprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        by_offset = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        spans = [
            MediaSpan(offset, by_offset[offset], t, h, w, t_factor)
            for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features)
        ]
        return placeholder_positions(len(input_tokens), spans)

    def embed_multimodal(self, **kwargs):
        if self.tokenprune is None:
            return super().embed_multimodal(**kwargs)
        text = kwargs.pop(TEXT_FIELD, None)
        out: list[torch.Tensor] = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality.startswith("image"):
                out += self._pruned_images(inputs, None if text is None else list(text))
            else:
                out += self._positioned_videos(self._process_video_input(inputs), inputs)
        return tuple(out)

    def _pruned_images(self, inputs, text_ids: list[torch.Tensor] | None) -> list[torch.Tensor]:
        grid_thw = inputs["image_grid_thw"]
        probed = inputs["type"] == "pixel_values" and self._requests
        with VllmQwenProbe(self.visual, self._requests if probed else [], grid_thw.tolist()) as probe:
            embeds = self._process_image_input(inputs)
        per_item = probe.per_item()
        merge = self.config.vision_config.spatial_merge_size
        needs_text = TEXT_EMBEDDINGS in self.tokenprune.method.signals_needed(cls_token=False)
        out, self.tokenprune_kept = [], []
        for i, (item, (t, h, w)) in enumerate(zip(embeds, grid_thw.tolist(), strict=True)):
            h, w = h // merge, w // merge
            emb, extra = self._tokenprune_split(item)
            signals = {FEATURES: emb, **per_item[i]}
            if needs_text:
                if text_ids is None:
                    raise RuntimeError(f"{self.tokenprune.method.name} needs the prompt text; the processor did not "
                                       f"attach it ({TEXT_FIELD})")
                ids = text_ids[i].reshape(-1).to(emb.device)
                signals[TEXT_EMBEDDINGS] = self.get_language_model().embed_input_ids(ids)
            chosen = select_image(self.tokenprune, emb, signals, (h, w), cls_token=False)
            coords = media_coords(t, h, w)[chosen.slots].to(emb.device, emb.dtype)
            out.append(torch.cat([self._tokenprune_join(chosen, emb, extra), coords], dim=1))
            self.tokenprune_kept.append(chosen.kept)
        return out

    def _tokenprune_split(self, item: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One image's encoder output -> (the features the method selects on, columns carried along or None)."""
        return item, None

    def _tokenprune_join(self, chosen, features: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """The rows the LLM gets for one image: the selection's features (and what :meth:`_tokenprune_split` set
        aside, reduced the same way)."""
        return chosen.features

    def _positioned_videos(self, embeds, inputs) -> list[torch.Tensor]:
        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = inputs.get("second_per_grid_ts")
        out = []
        for i, (emb, (t, h, w)) in enumerate(zip(embeds, inputs["video_grid_thw"].tolist(), strict=True)):
            factor = (1.0 if seconds is None else float(seconds[i])) * tokens_per_second
            coords = media_coords(t, h // merge, w // merge, factor).to(emb.device, emb.dtype)
            out.append(torch.cat([emb, coords], dim=1))
        return out


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneQwen2VLProcessor, info=Qwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class TokenpruneQwen2VLForConditionalGeneration(_QwenPruning, Qwen2VLForConditionalGeneration):
    """``Qwen2VLForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's tokens."""


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class TokenpruneQwen2_5_VLForConditionalGeneration(_QwenPruning, Qwen2_5_VLForConditionalGeneration):
    """``Qwen2_5_VLForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's
    tokens."""
