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

from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.llava_next import (
    AnyRes,
    AnyResProcessingInfo,
    AnyResProcessor,
    AnyResPruning,
    Plan,
    counted_placeholders,
    placeholder_count,
    unit_plan,
)
from tokenprune.integrations.vllm.options import VllmPruning
from tokenprune.methods import FEATURES, TEXT_EMBEDDINGS
from tokenprune.patches.llava_onevision import onevision_layout, onevision_unit_signals, onevision_video_layout
from tokenprune.patches.units import select_image as select_units

LLAVA_ONEVISION = AnyRes("LLaVA-OneVision", cls_token=False, layout=onevision_layout,  # SigLIP: no [CLS]
                         placeholders=("image", "video"))


def video_plan(config, pruning: VllmPruning, frames: int) -> Plan:
    """``(layout, units, budgets)`` of one video of ``frames`` frames (pooled frames, one newline at the end)."""
    return unit_plan(onevision_video_layout(config, frames), pruning)


def prunes_videos(pruning: VllmPruning) -> bool:
    """Videos are pruned by the methods that need no prompt text (the text field is attached to images only)."""
    return TEXT_EMBEDDINGS not in pruning.method.needs


class TokenpruneLlavaOnevisionProcessingInfo(AnyResProcessingInfo, LlavaOnevisionProcessingInfo):
    """LLaVA-OneVision's processing info with each image's and each video's kept count of placeholders."""

    tokenprune_anyres = LLAVA_ONEVISION

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        n = super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
        pruning = self.tokenprune_options()
        if pruning is None:
            return n
        plan = video_plan(self.get_hf_config(), pruning, num_frames)
        return counted_placeholders(n, plan, f"LLaVA-OneVision layout of a {num_frames}-frame video")


class TokenpruneLlavaOnevisionMultiModalProcessor(AnyResProcessor, LlavaOnevisionMultiModalProcessor):
    """LLaVA-OneVision's processor: packed image embeddings checked and cut, the prompt text attached (video
    placeholders are not text)."""


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneLlavaOnevisionMultiModalProcessor, info=TokenpruneLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class TokenpruneLlavaOnevisionForConditionalGeneration(AnyResPruning, LlavaOnevisionForConditionalGeneration):
    """``LlavaOnevisionForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's
    packed tokens, and of each video's pooled frames."""

    tokenprune_anyres = LLAVA_ONEVISION

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

    def _tokenprune_pack(self, size, crops):
        return self._merge_image_patch_embeddings(size, crops, image_newline=self.image_newline,
                                                  strategy="spatial_unpad")

    def _tokenprune_unit_signals(self, layout, units, rows):
        return onevision_unit_signals(self.config, layout, units, rows)

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
