"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, model_type ``llava_onevision``): vision-stage pruning
of images and videos.

What is LLaVA-NeXT's, and so inherited from :class:`~tokenprune.patches.llava_next.LlavaNextAdapter`: an image is
packed as ``[base tile] + [unpadded high-resolution grid, one image_newline token after each row]``
(``pack_image_features``); budgets are per crop or per image (``scope=``, the method's paper convention by default);
newline tokens are candidates only for methods whose official code selects over the packed sequence (DivPrune) and
are otherwise dropped as soon as the image is pruned (kept when nothing is pruned: ``keep=1.0`` is bit-identical);
positions are re-indexed contiguously. What differs:

* **SigLIP tower, no [CLS]** (``vision_feature_select_strategy="full"``, ``vision_feature_layer=-1``): methods use
  their no-[CLS] signals, computed by the CLIP probe on SigLIP's attention (same projections): ``attention_received``
  = mean over heads and over every query row of the crop, ``vision_hidden`` = the layer's output, ``attention_map``
  = the crop's head-mean map among its tokens (VFlowOpt, whose shipped configurations were searched on this tower:
  they run unscaled). [CLS]-only methods decline with the error they give on Qwen.
* **AnyRes-max down-scaling**: when the unpadded grid holds more than ``1.1**2 x max_num_patches`` tiles' worth of
  tokens (``vision_aspect_ratio="anyres_max_9"``), transformers resizes it bilinearly. A down-scaled token belongs
  to the crop under its centre (its unit under a per-crop budget); its tower signals are the crops' signals packed
  and resized exactly as the features are (:meth:`LlavaOnevisionAdapter.pack`).
* **Several images in one prompt row** (``batch_num_images > 1``): each is its base tile only, plus one newline.
* **Videos**: every frame is one tile pooled 2x2 (bilinear, ``apply_pooling``); one newline token after the whole
  video. Each frame is one selection unit (``scope="image"``: the whole video); the frame's signals are pooled as
  its features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as nnf
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from tokenprune.methods import ATTENTION_MAP, ATTENTION_RECEIVED, FEATURES, PAIRED_TEXT, TEXT_EMBEDDINGS, VISION_HIDDEN
from tokenprune.patches.base import PrunedCall, VisionStageAdapter
from tokenprune.patches.clip_signals import ClipProbe, encoder_layers, resolve_layer
from tokenprune.patches.llava_next import (
    LlavaNextAdapter,
    PackedLayout,
    packed_layout,
    unit_signals,
    unpadded_grid_coords,
)
from tokenprune.patches.units import Unit
from tokenprune.record import grid_boxes

_VIDEO_KEYS = ("pixel_values_videos", "image_sizes_videos")
_TOWER_SIGNALS = frozenset({ATTENTION_RECEIVED, VISION_HIDDEN})  # one value (or row) per tower token


@dataclass(frozen=True)
class OnevisionLayout(PackedLayout):
    """:class:`PackedLayout` plus what packing a per-tile tower signal like the features needs."""

    image_size: tuple[int, int] = (0, 0)
    resized: tuple[int, int] | None = None  # (h, w) of the down-scaled high-resolution grid, None if not resized
    video: bool = False


class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    cls_token = False
    signals = frozenset({FEATURES, TEXT_EMBEDDINGS, PAIRED_TEXT, ATTENTION_MAP}) | _TOWER_SIGNALS
    encoder_loop = False
    video_units = True

    def visual_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (int(config.image_token_id), int(config.video_token_id))

    def check_method(self) -> None:
        self.method.check_family(cls_token=False)  # [CLS]-only methods say why and what runs instead
        VisionStageAdapter.check_method(self)
        n_layers = len(encoder_layers(self.model.model.vision_tower))
        for request in self.method.requests(cls_token=False):
            if request.layer is not None:  # fail at enable time when a requested vision layer does not exist
                resolve_layer(request.layer, 0, n_layers)

    def _check_strategy(self, kwargs: dict[str, Any]) -> None:
        layer = kwargs.get("vision_feature_layer")
        layer = self.model.config.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int) and self.method.requests(cls_token=False):
            self._feature_layer_index(layer)  # raises: signals of one feature layer only

    # --- layouts -------------------------------------------------------------------------------------------------
    @property
    def side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def layout(self, image_size: tuple[int, int], n_crops: int) -> OnevisionLayout:
        """The packed token layout of one image of ``image_size`` (H, W) with ``n_crops`` tower rows."""
        return onevision_layout(self.model.config, image_size, n_crops)

    def video_layout(self, frames: int) -> OnevisionLayout:
        """A video of ``frames`` frames (:func:`onevision_video_layout`)."""
        return onevision_video_layout(self.model.config, frames)

    def decoder_image_counts(self, kwargs: dict[str, Any]) -> dict[int, list[int]]:
        """Images as LLaVA-NeXT's; videos: each ``frames`` pooled tiles plus one newline."""
        counts = super().decoder_image_counts(kwargs)
        token, videos = int(self.model.config.video_token_id), kwargs.get("pixel_values_videos")
        if token not in counts and videos is not None:
            counts[token] = [self.video_layout(videos.shape[1]).crop.numel()] * videos.shape[0]
        return counts

    def tower_rows(self, kwargs: dict[str, Any], n_images: int) -> list[int]:
        """Tower rows of each image: base tile + crops, or the base tile alone in a row with several images."""
        counts = self._crops_per_image(kwargs["image_sizes"], n_images)
        per_row = kwargs.get("batch_num_images")
        if per_row is None:  # as get_image_features: every image is patched
            return counts
        single = [int(n) == 1 for n in per_row for _ in range(int(n))]
        return [c if s else 1 for c, s in zip(counts, single, strict=True)]

    @staticmethod
    def _segments(layout: PackedLayout) -> torch.Tensor:
        if getattr(layout, "video", False):  # the frame of each token (the newline: the last frame)
            return layout.crop.clamp(min=0).maximum(layout.newline.long() * (layout.n_crops - 1))
        return LlavaNextAdapter._segments(layout)

    # --- signals -------------------------------------------------------------------------------------------------
    def pack(self, layout: OnevisionLayout, values: list[torch.Tensor]) -> torch.Tensor:
        """Per-tile tower values packed as the features (:func:`pack_tile_values`)."""
        return pack_tile_values(self.model.config, layout, values)

    def _unit_signal_list(
        self, layout: PackedLayout, units: list[Unit], crop_signals: list[dict[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        return onevision_unit_signals(self.model.config, layout, units, crop_signals)

    def _encode_modality(self, kind: str, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict]]:
        """Packed features per image (video) ``[n_i, D]`` and the requested tower signals per tower row."""
        config, llava = self.model.config, self.model.model
        layer = kwargs.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        requests = list(self.method.requests(cls_token=False))
        feature_layer = self._feature_layer_index(layer) if requests else 0
        common = dict(vision_feature_layer=layer, vision_feature_select_strategy=strategy, return_dict=True)
        with ClipProbe(llava.vision_tower, requests, feature_layer) as probe:
            if kind == "image":
                out = llava.get_image_features(
                    pixel_values=kwargs["pixel_values"], image_sizes=kwargs["image_sizes"],
                    batch_num_images=kwargs.get("batch_num_images"), **common,
                )
            else:
                out = llava.get_video_features(pixel_values_videos=kwargs["pixel_values_videos"], **common)
        return list(out.pooler_output), probe.per_image(drop_cls=strategy == "default")

    # --- pruning -------------------------------------------------------------------------------------------------
    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        if kwargs.get("mm_encoder_outputs") is not None:
            return None
        present = [kind for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos"))
                   if kwargs.get(key) is not None]
        if not present:
            return None
        input_ids = self.prefill_ids(kwargs)
        if input_ids is None:
            return None
        self._check_strategy(kwargs)
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        seen_in_row = self.images_before(input_ids.shape[0])
        outputs, records, image_features = {}, [], []
        for kind in present:
            token_id = self.model.config.image_token_id if kind == "image" else self.model.config.video_token_id
            is_placeholder = input_ids == token_id
            features, crop_signals = self._encode_modality(kind, kwargs)
            if kind == "image":
                sizes = kwargs["image_sizes"]
                n_crops = self.tower_rows(kwargs, len(features))
                layouts = [self.layout(tuple(int(v) for v in sizes[i]), n_crops[i]) for i in range(len(features))]
            else:
                frames = kwargs["pixel_values_videos"].shape[1]
                layouts = [self.video_layout(frames) for _ in features]
            kept, images = self._select_packed(
                kwargs, is_placeholder, features, layouts, crop_signals, keep, seen_in_row, kind=kind
            )
            records += images
            if kind == "image":
                image_features = kept
            else:  # the model flattens [videos, tokens, D]: one row holding every video's kept tokens
                outputs["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(kept)[None])
        without_videos = {k: v for k, v in kwargs.items() if k not in _VIDEO_KEYS + ("batch_num_images",)}
        call = self._compacted(without_videos, keep, image_features, records)
        if "image" not in present:
            call.kwargs["mm_encoder_outputs"].pop("image")
        call.kwargs["mm_encoder_outputs"].update(outputs)
        return call


# --- layouts and tower signals from the config alone (shared with the vLLM plugin, which counts before the tower) ---
def _side(config: Any) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def onevision_layout(config: Any, image_size: tuple[int, int], n_crops: int) -> OnevisionLayout:
    """The packed token layout of one image of ``image_size`` (H, W) with ``n_crops`` tower rows under a
    LLaVA-OneVision ``config``: LLaVA-NeXT's, with the AnyRes-max down-scaled grid when it applies."""
    base = packed_layout(config, image_size, n_crops)
    if n_crops == 1:
        return OnevisionLayout(base.crop, base.position, base.boxes, base.side, n_crops, image_size)
    side = _side(config)
    coords = unpadded_grid_coords(config, image_size)  # [2, h, w]
    h, w = coords.shape[1:]
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(h * w / (max_tiles * side**2))
    if ratio <= 1.1:  # as pack_image_features: not resized
        return OnevisionLayout(base.crop, base.position, base.boxes, base.side, n_crops, image_size)
    resized = (int(h // ratio), int(w // ratio))
    rows = ((torch.arange(resized[0]) + 0.5) * h / resized[0]).long().clamp(max=h - 1)  # source under the centre
    cols = ((torch.arange(resized[1]) + 0.5) * w / resized[1]).long().clamp(max=w - 1)
    coords = coords[:, rows][:, :, cols]
    coords = torch.cat([coords, torch.full((2, resized[0], 1), -1, dtype=torch.long)], dim=2).reshape(2, -1)
    grid = torch.cat([grid_boxes(resized).reshape(*resized, 4), torch.full((resized[0], 1, 4), float("nan"))], 1)
    n_base = side**2
    return OnevisionLayout(
        torch.cat([base.crop[:n_base], coords[0]]), torch.cat([base.position[:n_base], coords[1]]),
        torch.cat([base.boxes[:n_base], grid.reshape(-1, 4)]), base.side, n_crops, image_size, resized,
    )


def onevision_video_layout(config: Any, frames: int) -> OnevisionLayout:
    """A video of ``frames`` frames: each a ``p x p`` pooled grid (p = ceil(side / 2)), then one newline."""
    p = math.ceil(_side(config) / 2)
    crop = torch.cat([torch.arange(frames).repeat_interleave(p * p), torch.tensor([-1])])
    position = torch.cat([torch.arange(p * p).repeat(frames), torch.tensor([-1])])
    boxes = torch.cat([grid_boxes((p, p)).repeat(frames, 1), torch.full((1, 4), float("nan"))])
    return OnevisionLayout(crop, position, boxes, p, frames, (0, 0), None, video=True)


def pack_tile_values(config: Any, layout: OnevisionLayout, values: list[torch.Tensor]) -> torch.Tensor:
    """``[n, ...]``: per-tile tower values ``[side*side, ...]`` (one per tower row of the image or video) laid out
    as transformers lays out the features -- unpadded and bilinearly resized (images), pooled 2x2 (video
    frames) -- with zeros at the newline tokens."""
    side, rest = _side(config), values[0].shape[1:]
    flat = [v.reshape(side, side, -1).float() for v in values]  # [side, side, C]
    channels = flat[0].shape[-1]
    if layout.video:
        p = math.ceil(side / 2)
        frames = [nnf.interpolate(v.permute(2, 0, 1)[None], size=[p, p], mode="bilinear")[0] for v in flat]
        parts = [f.flatten(1).T for f in frames] + [flat[0].new_zeros(1, channels)]
    else:
        parts = [flat[0].reshape(side * side, channels)]
        if layout.n_crops > 1:
            grid = _crop_grid(config, layout, flat[1:])  # [C, h, w]
            if layout.resized is not None:
                grid = nnf.interpolate(grid[None], list(layout.resized), mode="bilinear")[0]
            grid = torch.cat([grid, grid.new_zeros(channels, grid.shape[1], 1)], dim=2)
            parts.append(grid.flatten(1).T)
        else:
            parts.append(flat[0].new_zeros(1, channels))
    return torch.cat(parts).reshape(-1, *rest)


def _crop_grid(config: Any, layout: OnevisionLayout, crops: list[torch.Tensor]) -> torch.Tensor:
    """``[C, h, w]``: the crops' values on the unpadded high-resolution grid (``pack_image_features``' order)."""
    side = _side(config)
    rows, cols = get_anyres_image_grid_shape(list(layout.image_size), config.image_grid_pinpoints,
                                             config.vision_config.image_size)
    stacked = torch.stack(crops).reshape(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
    return unpad_image(stacked.reshape(-1, rows * side, cols * side), list(layout.image_size))


def onevision_unit_signals(
    config: Any, layout: PackedLayout, units: list[Unit], crop_signals: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """The tower signals of each unit of one image or video (``crop_signals``: its tower rows, in order): per-token
    signals packed as the features, attention maps per crop (a video frame's pooled on both axes)."""
    if not crop_signals or not crop_signals[0]:
        return [{} for _ in units]
    maps = [k for k in crop_signals[0] if k.split("@")[0] == ATTENTION_MAP]
    packed = {key: pack_tile_values(config, layout, [c[key] for c in crop_signals])
              for key in crop_signals[0] if key not in maps}
    out = [{key: value[u.index.to(value.device)] for key, value in packed.items()} for u in units]
    if maps:
        if layout.video:  # each frame's map pooled on both axes as its tokens: P A P^T
            pooling = _pooling_matrix(_side(config))
            crop_signals = [{k: pooling @ c[k].float() @ pooling.T for k in maps} for c in crop_signals]
        else:  # the crops' own maps; a down-scaled token takes the row/column of the source under its centre
            crop_signals = [{k: c[k] for k in maps} for c in crop_signals]
        for signals, unit in zip(out, units, strict=True):
            signals.update(unit_signals(layout, unit, crop_signals))
    return out


def _pooling_matrix(side: int) -> torch.Tensor:
    """``[p*p, side*side]``: ``apply_pooling``'s bilinear 2x2 pooling of one frame as a matrix."""
    p = math.ceil(side / 2)
    basis = torch.eye(side * side).reshape(side * side, 1, side, side)
    return nnf.interpolate(basis, size=[p, p], mode="bilinear").reshape(side * side, p * p).T
