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
gives them on pixels; the other methods refuse such a request when it is processed.

The processing info, processor and model mixins (``AnyRes*``) serve LLaVA-OneVision too (``onevision.py``: its
layout, its tower signals and its videos). Imported by vLLM lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.model_executor.models.llava_next import (
    LlavaDummyInputsBuilder,
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenprune.integrations.vllm.llava import ClipPruning, _pruning, placeholder_text
from tokenprune.integrations.vllm.options import VllmPruning, check_embeddings, embedding_methods
from tokenprune.integrations.vllm.placeholders import image_embeddings, pruned_prompt_updates
from tokenprune.integrations.vllm.prompt_text import PromptTextProcessor
from tokenprune.methods import FEATURES, make_method
from tokenprune.patches.llava_next import PackedLayout, packed_layout, selection_units, unit_signals
from tokenprune.patches.units import ImageSelection, Unit
from tokenprune.patches.units import select_image as select_units

Plan = tuple[PackedLayout, list[Unit], list[int]]  # (layout, units, budgets) of one image or video


@dataclass(frozen=True)
class AnyRes:
    """What the plugin's classes need to know of an AnyRes family (LLaVA-NeXT here, LLaVA-OneVision in
    ``onevision.py``): its name (in error messages), whether its tower has a [CLS] token, its packed layout
    (``(config, (height, width), n_crops) -> PackedLayout``) and the modalities whose placeholders are not text to
    prompt-dependent methods."""

    name: str
    cls_token: bool
    layout: Callable[[Any, tuple[int, int], int], PackedLayout]
    placeholders: tuple[str, ...] = ("image",)


LLAVA_NEXT = AnyRes("LLaVA-NeXT", cls_token=True, layout=packed_layout)


def image_plan(config, pruning: VllmPruning, height: int, width: int, family: AnyRes = LLAVA_NEXT) -> Plan:
    """``(layout, units, budgets)`` of one ``height x width`` image: what the processor counts and the model keeps."""
    n_crops = image_size_to_num_patches(
        image_size=(height, width), grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    )
    return unit_plan(family.layout(config, (height, width), n_crops), pruning)


def unit_plan(layout: PackedLayout, pruning: VllmPruning) -> Plan:
    """``(layout, units, budgets)``: the selection units of ``layout`` (``scope``, else the method's convention)
    and each unit's kept count."""
    units, _ = selection_units(layout, pruning.method, pruning.scope)
    return layout, units, [pruning.kept(u.index.numel()) for u in units]


def placeholder_count(layout: PackedLayout, units: list[Unit], budgets: list[int]) -> int:
    """The image's placeholders: the units' budgets when any unit is pruned, else every packed token (newlines
    included, so an all-keeping budget is the stock count)."""
    prunes = any(k < u.index.numel() for u, k in zip(units, budgets, strict=True))
    return sum(budgets) if prunes else layout.crop.numel()


def counted_placeholders(n: int, plan: Plan, what: str) -> int:
    """:func:`placeholder_count` of ``plan``, once its layout is checked to hold the ``n`` tokens vLLM counts for
    ``what`` (an error, not a wrong count, if the layouts ever disagree)."""
    layout, units, budgets = plan
    if layout.crop.numel() != n:
        raise RuntimeError(f"{what} has {layout.crop.numel()} tokens, vLLM counts {n}")
    return placeholder_count(layout, units, budgets)


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


class AnyResProcessingInfo:
    """Mixed in before an AnyRes family's processing info: each image's placeholders counted from its size with the
    family's packed layout and units (``tokenprune_anyres``)."""

    tokenprune_anyres: AnyRes = LLAVA_NEXT

    def tokenprune_options(self) -> VllmPruning | None:
        """The options when they prune (None: the stock counts hold)."""
        pruning = _pruning(self.get_hf_config(), self.tokenprune_anyres.cls_token)
        return None if pruning is None or pruning.keeps_all else pruning

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        pruning = self.tokenprune_options()
        if pruning is None:
            return n
        family = self.tokenprune_anyres
        plan = image_plan(self.get_hf_config(), pruning, image_height, image_width, family)
        return counted_placeholders(n, plan, f"{family.name} layout of a {image_height}x{image_width} image")


class AnyResProcessor(PromptTextProcessor):
    """Mixed in before an AnyRes family's multimodal processor (whose info is an :class:`AnyResProcessingInfo`):
    pixel images get the kept count from ``get_num_image_tokens``; packed image embeddings are checked and cut here;
    prompt-dependent methods get the text after each image."""

    def _tokenprune_options(self) -> tuple[AnyRes, VllmPruning | None]:
        family = self.info.tokenprune_anyres
        return family, _pruning(self.info.get_hf_config(), family.cls_token)

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        family, pruning = self._tokenprune_options()
        check_packed_embeddings(pruning, mm_items, cls_token=family.cls_token, family=family.name)
        return pruned_prompt_updates(updates, pruning, only_embeddings_of=mm_items)

    def _tokenprune_text(self):
        family, pruning = self._tokenprune_options()
        return placeholder_text(self.info.get_hf_config(), pruning, family.placeholders)


class AnyResPruning(ClipPruning):
    """What the AnyRes families share in vLLM (mixed in before the stock model): each image's packed tokens (base
    tile, unpadded grid, newlines) selected per unit of ``tokenprune_anyres``'s layout, as ``enable_pruning``
    selects them; packed image embeddings as one unit (:func:`select_packed`). A family says how its crops are packed
    (:meth:`_tokenprune_pack`) and its units' tower signals (:meth:`_tokenprune_unit_signals`)."""

    tokenprune_anyres: AnyRes = LLAVA_NEXT

    @property
    def tokenprune_cls_token(self) -> bool:
        return self.tokenprune_anyres.cls_token

    def _tokenprune_pack(self, size: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """One image's packed features ``[n, D]`` from its crops ``[crops, side * side, D]``."""
        return self._merge_image_patch_embeddings(size, crops, strategy="spatial_unpad")

    def _tokenprune_unit_signals(self, layout: PackedLayout, units: list[Unit],
                                 rows: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Each unit's tower signals from the image's tower rows (its crops, in order)."""
        return [unit_signals(layout, u, rows) for u in units]

    def _process_image_input(self, image_input):
        if self.tokenprune is None or self.tokenprune.keeps_all:
            return super()._process_image_input(image_input)
        cls_token = self.tokenprune_cls_token
        if image_input["type"] != "pixel_values":  # packed embeddings: the processor admitted whole-image methods only
            chosen = [select_packed(self.tokenprune, emb, self._text_signals(b, emb.device, cls_token),
                                    cls_token=cls_token, project=self.multi_modal_projector)
                      for b, emb in enumerate(image_input["data"])]
            self.tokenprune_kept = [c.kept for c in chosen]
            return [c.features for c in chosen]
        with self._probe() as probe:
            patches = self._process_image_pixels(image_input)  # per image: [crops, side * side, D]
        rows = self._probed_rows(probe, sum(p.shape[0] for p in patches))
        out, start, self.tokenprune_kept = [], 0, []
        for i, crops in enumerate(patches):
            size = image_input["image_sizes"][i]
            feats = self._tokenprune_pack(size, crops)
            layout, units, budgets = image_plan(self.config, self.tokenprune, *map(int, size.tolist()),
                                                self.tokenprune_anyres)
            mine, start = rows[start:start + layout.n_crops], start + crops.shape[0]
            if placeholder_count(layout, units, budgets) == feats.shape[0]:  # nothing pruned: newlines stay too
                out.append(feats)
                self.tokenprune_kept.append(torch.arange(feats.shape[0]))
                continue
            text = self._text_signals(i, feats.device, cls_token)
            tower = self._tokenprune_unit_signals(layout, units, mine)
            signals = [{FEATURES: feats[u.index.to(feats.device)], **text, **t} for u, t in zip(units, tower,
                                                                                              strict=True)]
            chosen = select_units(
                self.tokenprune.method, feats, units, budgets, signals, image_index=0, row=0, index_in_row=0,
                cls_token=cls_token, project=self.multi_modal_projector, placement="span",
            )
            out.append(chosen.features)
            self.tokenprune_kept.append(chosen.kept)
        return out


class TokenpruneLlavaNextProcessingInfo(AnyResProcessingInfo, LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info with each image's kept count of placeholders."""


class TokenpruneLlavaNextMultiModalProcessor(AnyResProcessor, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT's processor: packed image embeddings checked and cut, the prompt text attached."""


@MULTIMODAL_REGISTRY.register_processor(
    TokenpruneLlavaNextMultiModalProcessor, info=TokenpruneLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class TokenpruneLlavaNextForConditionalGeneration(AnyResPruning, LlavaNextForConditionalGeneration):
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
