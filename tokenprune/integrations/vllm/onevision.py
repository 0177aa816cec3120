"""LLaVA-OneVision in vLLM with visual-token pruning after the projector, as ``enable_pruning`` prunes it (images).

The LLaVA-NeXT plugin's code with what OneVision changes, taken from the HF adapter
(:mod:`tokenprune.patches.llava_onevision`): the AnyRes-max layout (base tile, unpadded grid bilinearly down-scaled
when it holds more than ``1.1**2 x 9`` tiles' worth of tokens, one ``image_newline`` per row), the SigLIP tower
without [CLS] (methods use their no-[CLS] signals: attention received and hidden states recomputed per tile by the
CLIP probe on vLLM's fused ``qkv_proj``, packed and resized exactly as the features), per-crop or per-image units
and the newline rule. The processor counts each image's placeholders from its size with the same functions.

vLLM gives every image its full AnyRes layout, also in a prompt with several images (transformers then keeps only
each image's base tile); the plugin prunes the layout vLLM builds. Videos (frames pooled 2x2, one newline after the
video) are pruned as the HF adapter prunes them, except by prompt-dependent methods (the prompt text is carried for
images only): with those the engine refuses to start while videos are allowed, so a video is never served unpruned.
Image embeddings (``image_embeds``) arrive packed without their size: pruned, as on LLaVA-NeXT, by the methods whose
unit is the whole packed image (DivPrune), refused by the others. Imported by vLLM lazily.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.llava import ClipPruning, _pruning
from tokenprune.integrations.vllm.llava_next import check_packed_embeddings, placeholder_count, select_packed
from tokenprune.integrations.vllm.options import VllmPruning
from tokenprune.integrations.vllm.placeholders import pruned_prompt_updates
from tokenprune.integrations.vllm.prompt_text import PromptTextProcessor
from tokenprune.methods import FEATURES, TEXT_EMBEDDINGS
from tokenprune.patches.llava_next import selection_units
from tokenprune.patches.llava_onevision import (
    OnevisionLayout,
    onevision_layout,
    onevision_unit_signals,
    onevision_video_layout,
)
from tokenprune.patches.units import Unit
from tokenprune.patches.units import select_image as select_units


def _options(config) -> VllmPruning | None:
    return _pruning(config, cls_token=False)


def image_plan(config, pruning: VllmPruning, height: int, width: int) -> tuple[OnevisionLayout, list[Unit], list[int]]:
    """``(layout, units, budgets)`` of one ``height x width`` image: what the processor counts and the model keeps."""
    n_crops = image_size_to_num_patches(
        image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    )
    layout = onevision_layout(config, (height, width), n_crops)
    units, _ = selection_units(layout, pruning.method, pruning.scope)
    return layout, units, [pruning.kept(u.index.numel()) for u in units]


def video_plan(config, pruning: VllmPruning, frames: int) -> tuple[OnevisionLayout, list[Unit], list[int]]:
    """``(layout, units, budgets)`` of one video of ``frames`` frames (pooled frames, one newline at the end)."""
    layout = onevision_video_layout(config, frames)
    units, _ = selection_units(layout, pruning.method, pruning.scope)
    return layout, units, [pruning.kept(u.index.numel()) for u in units]


def prunes_videos(pruning: VllmPruning) -> bool:
    """Videos are pruned by the methods that need no prompt text (the text field is attached to images only)."""
    return TEXT_EMBEDDINGS not in pruning.method.needs


class TokenpruneLlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        n = super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
        config = self.get_hf_config()
        pruning = _options(config)
        if pruning is None or pruning.keeps_all:
            return n
        layout, units, budgets = video_plan(config, pruning, num_frames)
        if layout.crop.numel() != n:
            raise RuntimeError(f"LLaVA-OneVision layout of a {num_frames}-frame video has {layout.crop.numel()} "
                               f"tokens, vLLM counts {n}")
        return placeholder_count(layout, units, budgets)

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = self.get_hf_config()
        pruning = _options(config)
        if pruning is None or pruning.keeps_all:
            return n
        layout, units, budgets = image_plan(config, pruning, image_height, image_width)
        if layout.crop.numel() != n:
            raise RuntimeError(f"LLaVA-OneVision layout of a {image_height}x{image_width} image has "
                               f"{layout.crop.numel()} tokens, vLLM counts {n}")
        return placeholder_count(layout, units, budgets)


class TokenpruneLlavaOnevisionMultiModalProcessor(PromptTextProcessor, LlavaOnevisionMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        """Pixel images get the kept count from ``get_num_image_tokens``; packed image embeddings are cut here."""
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        pruning = _options(self.info.get_hf_config())
        check_packed_embeddings(pruning, mm_items, cls_token=False, family="LLaVA-OneVision")
        return pruned_prompt_updates(updates, pruning, only_embeddings_of=mm_items)

    def _tokenprune_text(self):
        config = self.info.get_hf_config()
        pruning = _options(config)
        if pruning is None or pruning.keeps_all or TEXT_EMBEDDINGS not in pruning.method.needs:
            return None
        image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
        video_token_id = getattr(config, "video_token_id", None) or config.video_token_index
        return image_token_id, (image_token_id, video_token_id)


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneLlavaOnevisionMultiModalProcessor, info=TokenpruneLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class TokenpruneLlavaOnevisionForConditionalGeneration(ClipPruning, LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's
    packed tokens, and of each video's pooled frames."""

    tokenprune_cls_token = False  # SigLIP

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config, prefix)
        if self.tokenprune is None or self.tokenprune.keeps_all:
            return
        strategy, layer = self.config.vision_feature_select_strategy, self.config.vision_feature_layer
        if strategy != "full" or not isinstance(layer, int):
            raise ValueError(
                f"tokenprune supports LLaVA-OneVision with vision_feature_select_strategy='full' and one feature "
                f"layer (all released checkpoints); got {strategy!r}, {layer!r}"
            )
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.get_limit_per_prompt("video") > 0 and not prunes_videos(self.tokenprune):
            raise ValueError(
                f"tokenprune on LLaVA-OneVision in vLLM prunes videos with the methods that need no prompt text; "
                f"{self.tokenprune.method.name!r} reads the text after each image, which the plugin carries for images "
                f"only, so videos are not served with it. Start the engine with limit_mm_per_prompt={{'image': N, "
                f"'video': 0}} (CLI: --limit-mm-per-prompt '{{\"image\": N, \"video\": 0}}'), or serve videos with "
                f"'divprune' / 'hiprune'"
            )

    def _process_image_input(self, image_input):
        if self.tokenprune is None or self.tokenprune.keeps_all:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":  # packed embeddings: the processor admitted whole-image methods only
            chosen = [select_packed(self.tokenprune, emb, self._text_signals(b, emb.device), cls_token=False,
                                    project=self.multi_modal_projector) for b, emb in enumerate(image_input["data"])]
            self.tokenprune_kept = [c.kept for c in chosen]
            return [c.features for c in chosen]
        with self._probe() as probe:
            patches = self._process_image_pixels(image_input)  # per image: [crops, side * side, D]
        rows = self._probed_rows(probe, sum(p.shape[0] for p in patches))
        out, start, self.tokenprune_kept = [], 0, []
        for i, crops in enumerate(patches):
            size = image_input["image_sizes"][i]
            feats = self._merge_image_patch_embeddings(size, crops, image_newline=self.image_newline,
                                                       strategy="spatial_unpad")
            layout, units, budgets = image_plan(self.config, self.tokenprune, *map(int, size.tolist()))
            mine, start = rows[start:start + layout.n_crops], start + crops.shape[0]
            if placeholder_count(layout, units, budgets) == feats.shape[0]:  # nothing pruned: newlines stay too
                out.append(feats)
                self.tokenprune_kept.append(torch.arange(feats.shape[0]))
                continue
            text = self._text_signals(i, feats.device)
            tower = onevision_unit_signals(self.config, layout, units, mine)
            signals = [{FEATURES: feats[u.index.to(feats.device)], **text, **t} for u, t in zip(units, tower,
                                                                                              strict=True)]
            chosen = select_units(
                self.tokenprune.method, feats, units, budgets, signals, image_index=0, row=0, index_in_row=0,
                cls_token=False, project=self.multi_modal_projector, placement="span",
            )
            out.append(chosen.features)
            self.tokenprune_kept.append(chosen.kept)
        return out

    def _process_video_pixels(self, inputs):
        if self.tokenprune is None or self.tokenprune.keeps_all:
            return super()._process_video_pixels(inputs)
        with self._probe() as probe:
            videos = super()._process_video_pixels(inputs)  # per video: [1, frames * p * p + 1, D] (packed)
        pixels = inputs["pixel_values_videos"]
        frames = [int(v.shape[0]) for v in pixels]
        rows = self._probed_rows(probe, sum(frames))  # one tower row per frame, videos in order
        out, start = [], 0
        for video, n_frames in zip(videos, frames, strict=True):
            feats = video.reshape(-1, video.shape[-1])
            layout, units, budgets = video_plan(self.config, self.tokenprune, n_frames)
            mine, start = rows[start:start + n_frames], start + n_frames
            if placeholder_count(layout, units, budgets) == feats.shape[0]:  # nothing pruned: the newline stays too
                out.append(feats)
                continue
            tower = onevision_unit_signals(self.config, layout, units, mine)
            signals = [{FEATURES: feats[u.index.to(feats.device)], **t} for u, t in zip(units, tower, strict=True)]
            chosen = select_units(
                self.tokenprune.method, feats, units, budgets, signals, image_index=0, row=0, index_in_row=0,
                cls_token=False, project=self.multi_modal_projector, placement="span",
            )
            out.append(chosen.features)
        return out
