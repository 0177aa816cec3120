"""LLaVA-NeXT (AnyRes) in vLLM with visual-token pruning after the projector, as ``enable_pruning`` prunes it.

Per image the packed layout (base tile, unpadded high-resolution grid, one ``image_newline`` per row), the selection
units (per crop or per image: ``scope``, else the method's paper convention) and the newline rule (newlines are
candidates only for methods whose official code selects over the packed sequence; otherwise dropped as soon as
anything is pruned, all kept when nothing is) are :mod:`tokenprune.patches.llava_next`'s own functions, so the
processor can count each image's placeholders from its size before the tower runs, and the model keeps the same
tokens as the Hugging Face path. Positions are re-indexed, as in LLaVA-1.5.

Precomputed image embeddings (``image_embeds``) reach the model packed -- ``[n, D]`` per image, the base tile, the
unpadded crops and the newline tokens already merged -- and without the image size, so neither the crops nor the
newline tokens can be located: they are pruned by the methods whose unit is the whole packed image, newlines
included (DivPrune, as its official code selects over the packed sequence), which see exactly what ``enable_pruning``
gives them on pixels; the other methods refuse such a request when it is processed. Imported by vLLM lazily.
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.model_executor.models.llava_next import (
    LlavaDummyInputsBuilder,
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.llava import ClipPruning, _pruning
from tokenprune.integrations.vllm.options import VllmPruning, check_embeddings, embedding_methods
from tokenprune.integrations.vllm.placeholders import image_embeddings, pruned_prompt_updates
from tokenprune.integrations.vllm.prompt_text import PromptTextProcessor
from tokenprune.methods import FEATURES, TEXT_EMBEDDINGS, make_method
from tokenprune.patches.llava_next import PackedLayout, packed_layout, selection_units, unit_signals
from tokenprune.patches.units import ImageSelection, Unit
from tokenprune.patches.units import select_image as select_units


def image_plan(config, pruning: VllmPruning, height: int, width: int) -> tuple[PackedLayout, list[Unit], list[int]]:
    """``(layout, units, budgets)`` of one ``height x width`` image: what the processor counts and the model keeps."""
    n_crops = image_size_to_num_patches(
        image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    )
    layout = packed_layout(config, (height, width), n_crops)
    units, _ = selection_units(layout, pruning.method, pruning.scope)
    return layout, units, [pruning.kept(u.index.numel()) for u in units]


def placeholder_count(layout: PackedLayout, units: list[Unit], budgets: list[int]) -> int:
    """The image's placeholders: the units' budgets when any unit is pruned, else every packed token (newlines
    included, so an all-keeping budget is the stock count)."""
    prunes = any(k < u.index.numel() for u, k in zip(units, budgets, strict=True))
    return sum(budgets) if prunes else layout.crop.numel()


def whole_packed_image(pruning: VllmPruning) -> bool:
    """Whether the method's unit is the whole packed image with its newline tokens (scope ``"image"`` and newline
    candidates: DivPrune), the only unit a packed embedding without its image size still gives."""
    return (pruning.scope or pruning.method.crop_scope) == "image" and pruning.method.newline_candidates


def packed_embedding_methods(cls_token: bool) -> list[str]:
    """The methods that prune packed image embeddings (AnyRes families): projected features, whole packed image."""
    return [name for name in embedding_methods(cls_token) if whole_packed_image(VllmPruning(make_method(name), 1.0))]


def check_packed_embeddings(pruning: VllmPruning | None, mm_items, cls_token: bool, family: str) -> None:
    """Refuse (when the request is processed) packed image embeddings for a method that reads the tower or whose
    units need the image's layout (per-crop budgets, newline tokens left out)."""
    if pruning is None or pruning.keeps_all or not image_embeddings(mm_items):
        return
    check_embeddings(pruning, cls_token)
    if not whole_packed_image(pruning):
        scope = pruning.scope or pruning.method.crop_scope
        raise ValueError(
            f"this request passes image embeddings (image_embeds) instead of pixels; on {family} they arrive packed "
            f"([n, D]: base tile, unpadded crops and newline tokens already merged) without the image size, so "
            f"{pruning.method.name!r}'s units (scope={scope!r}, newline tokens left out) cannot be rebuilt. Send the "
            f"image's pixels, or serve a method that selects over the whole packed image: "
            f"{packed_embedding_methods(cls_token)}"
        )


def select_packed(pruning: VllmPruning, embeds: torch.Tensor, signals: dict, cls_token: bool,
                  project) -> ImageSelection:
    """The selection of one packed image given as embeddings ``[n, D]``: one unit over every token (newlines
    included, no grid), as ``enable_pruning`` selects for a method with :func:`whole_packed_image` units."""
    n = embeds.shape[0]
    k = pruning.kept(n)
    if k >= n:
        every = torch.arange(n)
        return ImageSelection(every, embeds, every)
    return select_units(pruning.method, embeds, [Unit(torch.arange(n))], [k], [{FEATURES: embeds, **signals}],
                        image_index=0, row=0, index_in_row=0, cls_token=cls_token, project=project, placement="span")


class TokenpruneLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = self.get_hf_config()
        pruning = _pruning(config)
        if pruning is None or pruning.keeps_all:
            return n
        layout, units, budgets = image_plan(config, pruning, image_height, image_width)
        if layout.crop.numel() != n:
            raise RuntimeError(f"LLaVA-NeXT layout of a {image_height}x{image_width} image has {layout.crop.numel()} "
                               f"tokens, vLLM counts {n}")
        return placeholder_count(layout, units, budgets)


class TokenpruneLlavaNextMultiModalProcessor(PromptTextProcessor, LlavaNextMultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        """Pixel images get the kept count from ``get_num_image_tokens``; packed image embeddings are cut here."""
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        pruning = _pruning(self.info.get_hf_config())
        check_packed_embeddings(pruning, mm_items, cls_token=True, family="LLaVA-NeXT")
        return pruned_prompt_updates(updates, pruning, only_embeddings_of=mm_items)

    def _tokenprune_text(self):
        config = self.info.get_hf_config()
        pruning = _pruning(config)
        if pruning is None or pruning.keeps_all or TEXT_EMBEDDINGS not in pruning.method.needs:
            return None
        image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
        return image_token_id, (image_token_id,)


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneLlavaNextMultiModalProcessor, info=TokenpruneLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TokenpruneLlavaNextForConditionalGeneration(ClipPruning, LlavaNextForConditionalGeneration):
    """``LlavaNextForConditionalGeneration`` that keeps ``hf_config.tokenprune``'s selection of each image's packed
    tokens. Images given as ``image_embeds`` (packed) are pruned by the methods whose unit is the whole packed image."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenprune_init(vllm_config, prefix)
        if self.tokenprune is not None and self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"tokenprune supports LLaVA-NeXT with vision_feature_select_strategy='default' (all released "
                f"checkpoints); got {self.config.vision_feature_select_strategy!r}"
            )

    def _process_image_input(self, image_input):
        if self.tokenprune is None or self.tokenprune.keeps_all:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":  # packed embeddings: the processor admitted whole-image methods only
            chosen = [select_packed(self.tokenprune, emb, self._text_signals(b, emb.device), cls_token=True,
                                    project=self.multi_modal_projector) for b, emb in enumerate(image_input["data"])]
            self.tokenprune_kept = [c.kept for c in chosen]
            return [c.features for c in chosen]
        with self._probe() as probe:
            patches = self._process_image_pixels(image_input)  # per image: [crops, side * side, D]
        rows = self._probed_rows(probe, sum(p.shape[0] for p in patches))
        out, start, self.tokenprune_kept = [], 0, []
        for i, crops in enumerate(patches):
            size = image_input["image_sizes"][i]
            feats = self._merge_image_patch_embeddings(size, crops, strategy="spatial_unpad")
            layout, units, budgets = image_plan(self.config, self.tokenprune, *map(int, size.tolist()))
            mine, start = rows[start:start + layout.n_crops], start + crops.shape[0]
            text = self._text_signals(i, feats.device)
            signals = [{FEATURES: feats[u.index.to(feats.device)], **text, **unit_signals(layout, u, mine)}
                       for u in units]
            if placeholder_count(layout, units, budgets) == feats.shape[0]:  # nothing pruned: newlines stay too
                out.append(feats)
                self.tokenprune_kept.append(torch.arange(feats.shape[0]))
                continue
            chosen = select_units(
                self.tokenprune.method, feats, units, budgets, signals, image_index=0, row=0, index_in_row=0,
                project=self.multi_modal_projector, placement="span",
            )
            out.append(chosen.features)
            self.tokenprune_kept.append(chosen.kept)
        return out
