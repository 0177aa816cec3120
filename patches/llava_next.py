"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, model_type ``llava_next``): vision-stage pruning with AnyRes.

transformers packs each image as ``[base tile (side x side)] + [unpadded high-resolution grid, one image_newline
token after each row]`` (``pack_image_features``). The adapter reproduces that layout on token coordinates (with
transformers' own ``get_anyres_image_grid_shape`` and ``unpad_image``), so it knows for every packed token its
crop, its place inside the crop and its box in the image, and then:

* **Budget** (``scope``): per crop -- the base tile and every high-resolution tile keep ``keep`` of their tokens
  (FasterVLM, HiPrune, CDPruner, VisionZip, MMTok) -- or per image, one pool over the packed image (DivPrune,
  HoloV); each method's paper convention is its default (``PruningMethod.crop_scope``), ``scope=`` overrides it.
* **Newline tokens**, one documented rule: they are selection candidates only for methods whose official code
  selects over the packed sequence (``newline_candidates``: DivPrune); for every other method they are dropped as
  soon as the image is pruned at all (the official per-crop implementations have no newline tokens), and kept when
  every unit keeps all its tokens (so ``keep=1.0`` is exactly the unpruned model).
* **Signals** of the CLIP tower are computed per crop (``ClipProbe``) and gathered into each unit's token order;
  in a per-image pool they are concatenated over crops (an attention map becomes block-diagonal).

Positions are re-indexed contiguously, as in LLaVA-1.5.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from tokenprune.compute_dtype import compute_dtype_device
from tokenprune.methods import (
    ATTENTION_MAP,
    CLS_ATTENTION,
    CLS_HIDDEN,
    FEATURES,
    PAIRED_TEXT,
    TEXT_EMBEDDINGS,
    VISION_KEYS,
)
from tokenprune.patches.base import PrunedCall, placeholder_positions, text_embeddings
from tokenprune.patches.llava import LlavaAdapter
from tokenprune.patches.paired_text import paired_text_embeddings
from tokenprune.patches.units import ImageSelection, Unit, select_image
from tokenprune.record import ImageRecord, grid_boxes

# Where the image-token axes of each per-crop signal are (all others: axis 0 only; CLS_HIDDEN has none).
_TOKEN_AXES = {CLS_ATTENTION: (1,), VISION_KEYS: (1,), ATTENTION_MAP: (0, 1), CLS_HIDDEN: ()}


@dataclass(frozen=True)
class PackedLayout:
    """Per packed token of one image: its crop (0 = base tile, -1 = newline), its index inside the crop's
    ``side x side`` raster, and its box in the image (NaN for newlines)."""

    crop: torch.Tensor      # [n] long
    position: torch.Tensor  # [n] long
    boxes: torch.Tensor     # [n, 4] float
    side: int
    n_crops: int            # tower rows of this image (base + high-resolution tiles)

    @property
    def newline(self) -> torch.Tensor:
        return self.crop < 0


class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    encoder_loop = False  # FlowCut's AnyRes variant (per-crop ViT stage + LLM-layer-1 stage) is not implemented

    def layout(self, image_size: tuple[int, int], n_crops: int) -> PackedLayout:
        """The packed token layout of one image of ``image_size`` (H, W) with ``n_crops`` tower rows."""
        return packed_layout(self.model.config, image_size, n_crops)

    def unpadded_coords(self, image_size: tuple[int, int]) -> torch.Tensor:
        """``[2, h, w]`` long: (crop, index inside the crop's raster) of every token of the unpadded
        high-resolution grid of an image of ``image_size`` (H, W), as ``pack_image_features`` lays it out."""
        return unpadded_grid_coords(self.model.config, image_size)

    def _units(self, layout: PackedLayout) -> tuple[list[Unit], list[int]]:
        """Selection units over the candidate tokens, and the crop of each unit (-1: a per-image pool)."""
        return selection_units(layout, self.method, self.scope)

    def _unit_signals(
        self, layout: PackedLayout, unit: Unit, crop_signals: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The CLIP signals of one unit's tokens, in the unit's order (newline tokens get zeros)."""
        return unit_signals(layout, unit, crop_signals)

    # --- pruning ---------------------------------------------------------------------------------------------
    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        is_image = self._placeholders(kwargs)
        if is_image is None:
            return None
        self._check_strategy(kwargs)
        features, crop_signals = self._encode(kwargs)
        sizes = kwargs["image_sizes"]
        n_crops = self._crops_per_image(sizes, len(features))
        layouts = [self.layout(tuple(int(v) for v in sizes[i]), n_crops[i]) for i in range(len(features))]
        keep = torch.ones_like(kwargs["input_ids"], dtype=torch.bool)
        kept_features, images = self._select_packed(
            kwargs, is_image, features, layouts, crop_signals, keep, self.images_before(keep.shape[0])
        )
        return self._compacted(kwargs, keep, kept_features, images)

    def _check_strategy(self, kwargs: dict[str, Any]) -> None:
        strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"tokenprune supports LLaVA-NeXT with vision_feature_select_strategy='default' (all released "
                f"checkpoints); got {strategy!r}"
            )

    def _unit_signal_list(
        self, layout: PackedLayout, units: list[Unit], crop_signals: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """The tower signals of each unit of one image (``crop_signals``: the image's tower rows, in order)."""
        return [self._unit_signals(layout, u, crop_signals) for u in units]

    def _select_packed(
        self, kwargs: dict[str, Any], is_placeholder: torch.Tensor, features: list[torch.Tensor],
        layouts: list[PackedLayout], crop_signals: list[dict[str, torch.Tensor]], keep: torch.Tensor,
        seen_in_row: list[int], kind: str = "image",
    ) -> tuple[list[torch.Tensor], list[ImageRecord]]:
        """Select in every packed image (or video) of one modality; clears its dropped placeholders in ``keep``
        and returns the kept features per image and the records."""
        length = kwargs["input_ids"].shape[1]
        flat_positions = placeholder_positions(is_placeholder, features, kind)
        for layout, feats in zip(layouts, features, strict=True):
            if layout.crop.numel() != feats.shape[0]:
                raise RuntimeError(f"packed {kind} layout has {layout.crop.numel()} tokens, features {feats.shape[0]}")
        all_units = [self._units(layout)[0] for layout in layouts]
        sizes_per_unit = [u.index.numel() for units in all_units for u in units]
        budgets = self.kept_counts(sizes_per_unit, kwargs)
        prunes = any(k < n for k, n in zip(budgets, sizes_per_unit, strict=True))

        kept_features, images, start, first_crop = [], [], 0, 0
        for i, (feats, layout, units) in enumerate(zip(features, layouts, all_units, strict=True)):
            n = feats.shape[0]
            positions = flat_positions[start:start + n]
            start += n
            row = int(positions[0]) // length
            mine = crop_signals[first_crop:first_crop + layout.n_crops] if crop_signals else []
            first_crop += layout.n_crops
            unit_budgets, budgets = budgets[: len(units)], budgets[len(units):]
            chosen = self._select_units(
                kwargs, feats, layout, units, unit_budgets, mine, row, int(positions[-1]) % length, i, seen_in_row[row],
            )
            slots, span = chosen.slots, chosen.features
            kept, merged, n_merged = chosen.kept, chosen.assign, chosen.n_merged
            if not prunes:  # nothing pruned anywhere: keep the newline tokens too (bit-identical to unpruned)
                slots, span = torch.arange(n), feats
                kept, merged, n_merged = slots, None, 0  # and the record says so
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[slots] = False
            keep.view(-1)[positions[dropped.to(positions.device)]] = False
            kept_features.append(span)
            images.append(ImageRecord(
                row, seen_in_row[row], n, kept, None, boxes=layout.boxes, view="image",
                segments=self._segments(layout), merged=merged, n_merged=n_merged, kind=kind,
            ))
            seen_in_row[row] += 1
        return kept_features, images

    @staticmethod
    def _segments(layout: PackedLayout) -> torch.Tensor:
        """0 = the base tile, 1 = the high-resolution crops and the newline tokens."""
        return (layout.crop > 0).long() | layout.newline.long()

    def _select_units(
        self, kwargs: dict[str, Any], feats: torch.Tensor, layout: PackedLayout, units: list[Unit], budgets: list[int],
        crop_signals: list[dict[str, torch.Tensor]], row: int, end: int, image_index: int, index_in_row: int,
    ) -> ImageSelection:
        """Select in every unit of one packed image (``feats`` ``[n, D]``, its last placeholder at ``end`` of
        ``row``): each unit gets its features, its crops' signals and the text after the image; span placement."""
        shared = {}
        if TEXT_EMBEDDINGS in self.method.signals_needed(self.cls_token):
            shared[TEXT_EMBEDDINGS] = text_embeddings(
                self.model, kwargs["input_ids"], kwargs.get("attention_mask"), row, end, self.visual_token_ids(),
            )
        if PAIRED_TEXT in self.method.signals_needed(self.cls_token):
            shared[PAIRED_TEXT] = paired_text_embeddings(
                self.model, kwargs["input_ids"], kwargs.get("attention_mask"), row, end, self.visual_token_ids(),
            )
        signals = [
            {FEATURES: feats[u.index.to(feats.device)].detach(), **shared, **tower}
            for u, tower in zip(units, self._unit_signal_list(layout, units, crop_signals), strict=True)
        ]
        return select_image(
            self.method, feats, units, budgets, signals, image_index=image_index, row=row, index_in_row=index_in_row,
            cls_token=self.cls_token, project=functools.partial(self._project, like=feats), placement="span",
        )

    def _project(self, hidden: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """Vision-space rows through the projector, in the dtype it computes in (that of its output ``like``)."""
        projector = self.model.model.multi_modal_projector
        dtype, device = compute_dtype_device(projector, like)
        with torch.no_grad():
            return projector(hidden.to(device=device, dtype=dtype))

    def placeholder_counts(self, kwargs: dict[str, Any]) -> list[int]:
        """Placeholders of each image of the call: its packed layout (base tile, unpadded grid, newline tokens)."""
        sizes = kwargs["image_sizes"]
        rows = self.tower_rows(kwargs, len(sizes))
        return [self.layout(tuple(int(v) for v in size), n).crop.numel() for size, n in zip(sizes, rows, strict=True)]

    def tower_rows(self, kwargs: dict[str, Any], n_images: int) -> list[int]:
        """Tower rows of each image (base tile + high-resolution crops)."""
        return self._crops_per_image(kwargs["image_sizes"], n_images)

    def _crops_per_image(self, sizes: torch.Tensor, n_images: int) -> list[int]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        return [
            image_size_to_num_patches(
                image_size=tuple(int(v) for v in size), grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for size in sizes[:n_images]
        ]


def packed_layout(config: Any, image_size: tuple[int, int], n_crops: int) -> PackedLayout:
    """The packed token layout of one image of ``image_size`` (H, W) with ``n_crops`` tower rows (base tile
    included) under a LLaVA-NeXT ``config``; shared with the vLLM plugin, which needs it before the tower runs."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    crop = [torch.zeros(side * side, dtype=torch.long)]
    position = [torch.arange(side * side)]
    boxes = [grid_boxes((side, side))]
    if n_crops > 1:
        coords = unpadded_grid_coords(config, image_size)  # [2, h, w]: the crops transformers keeps
        h, w = coords.shape[1:]
        newline = torch.full((2, h, 1), -1, dtype=torch.long)
        coords = torch.cat([coords, newline], dim=2).reshape(2, -1)
        grid = grid_boxes((h, w)).reshape(h, w, 4)
        nan = torch.full((h, 1, 4), float("nan"))
        crop.append(coords[0])
        position.append(coords[1])
        boxes.append(torch.cat([grid, nan], dim=1).reshape(-1, 4))
    else:  # a single tile: transformers appends one newline token after it
        crop.append(torch.tensor([-1]))
        position.append(torch.tensor([-1]))
        boxes.append(torch.full((1, 4), float("nan")))
    return PackedLayout(torch.cat(crop), torch.cat(position), torch.cat(boxes), side, n_crops)


def unpadded_grid_coords(config: Any, image_size: tuple[int, int]) -> torch.Tensor:
    """``[2, h, w]`` long: (crop, index inside the crop's raster) of every token of the unpadded high-resolution
    grid of an image of ``image_size`` (H, W) under a LLaVA-NeXT-style ``config``."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(
        list(image_size), config.image_grid_pinpoints, config.vision_config.image_size
    )
    r = torch.arange(rows * side)[:, None].expand(rows * side, cols * side)
    c = torch.arange(cols * side)[None, :].expand(rows * side, cols * side)
    coords = torch.stack([(r // side) * cols + c // side + 1, (r % side) * side + c % side])
    return unpad_image(coords, list(image_size))


def selection_units(layout: PackedLayout, method: Any, scope: str | None) -> tuple[list[Unit], list[int]]:
    """Selection units over the candidate tokens, and the crop of each unit (-1: a per-image pool): per crop or
    per image (``scope``, else the method's ``crop_scope``), newline tokens candidates only where the method's
    official code selects over them (``newline_candidates``)."""
    candidate = torch.ones_like(layout.crop, dtype=torch.bool)
    if not method.newline_candidates:
        candidate &= ~layout.newline
    scope = scope or method.crop_scope
    if scope == "image":
        video = None
        if getattr(layout, "video", False) and method.video_unit == "video":  # LLaVA-OneVision: frames of side^2
            video = (layout.n_crops, layout.side, layout.side)
        return [Unit(candidate.nonzero().squeeze(1), None, video)], [-1]
    units, crops = [], []
    for crop in range(layout.n_crops):
        index = (layout.crop == crop).nonzero().squeeze(1)
        if index.numel():
            units.append(Unit(index, _rect(layout, index)))
            crops.append(crop)
    if method.newline_candidates and bool(layout.newline.any()):
        units.append(Unit(layout.newline.nonzero().squeeze(1), None))
        crops.append(-1)
    return units, crops


def unit_signals(
    layout: PackedLayout, unit: Unit, crop_signals: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The CLIP signals of one unit's tokens, in the unit's order (newline tokens get zeros)."""
    if not crop_signals or not crop_signals[0]:
        return {}
    crops, positions = layout.crop[unit.index], layout.position[unit.index]
    present = [c for c in crops.unique().tolist() if c >= 0]
    out = {}
    for key, first in crop_signals[0].items():
        axes = _TOKEN_AXES.get(key.split("@")[0], (0,))
        if not axes:  # one value per crop ([CLS] hidden state): the unit's first crop
            out[key] = crop_signals[present[0] if present else 0][key]
            continue
        shape = list(first.shape)
        for axis in axes:
            shape[axis] = unit.index.numel()
        value = first.new_zeros(shape)
        for c in present:
            where = (crops == c).nonzero().squeeze(1)
            source = crop_signals[c][key]
            for axis in axes:
                source = source.index_select(axis, positions[where].to(source.device))
            if len(axes) == 1:
                value.index_copy_(axes[0], where.to(value.device), source)
            else:  # [N, N] attention among image tokens: within a crop; zero across crops (block-diagonal)
                value[where[:, None], where[None, :]] = source
        out[key] = value
    return out


def _rect(layout: PackedLayout, index: torch.Tensor) -> tuple[int, int] | None:
    """``(h, w)`` of a crop's kept rectangle (its tokens in packed order are that rectangle's raster order)."""
    positions = layout.position[index]
    side = layout.side
    rows = (positions // side).unique().numel()
    cols = (positions % side).unique().numel()
    return (rows, cols) if rows * cols == index.numel() else None
