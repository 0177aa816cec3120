"""InternVL3 (``InternVLForConditionalGeneration``, model_type ``internvl``): vision-stage pruning of tiled images.

transformers' InternVL cuts each image into square tiles (a grid chosen by its aspect ratio, then a thumbnail of the
whole image when there is more than one tile; the processor writes ``<img>`` + 256 ``<IMG_CONTEXT>`` per tile +
``</img>``), runs InternViT on every tile, drops the [CLS] token, PIXEL-SHUFFLES each 2x2 group of patches into one
token (their four feature vectors concatenated) and projects it (``get_image_features``). The model gets no tile
counts: the adapter reads them from the placeholder runs (one run per image, ``tokens_per_tile`` per tile).

* **Budget** (``scope``): per tile -- every grid tile and the thumbnail keep ``keep`` of their tokens, as LLaVA-NeXT's
  crops (the thumbnail plays NeXT's base image) -- or per image, one pool over all its tiles; each method's paper
  convention on NeXT is its default (``PruningMethod.crop_scope``), ``scope=`` overrides it.
* **Signals** of InternViT are recomputed per tile from the layers' own ``q_proj``/``k_proj`` (and QK-norm) by the
  CLIP probe (``patches/clip_signals.py``: eager, sdpa and flash-attention alike) over the tile's 1 + P patches
  (softmax over all keys, [CLS] included), then carried to the shuffled tokens through the model's own
  ``pixel_shuffle`` applied to patch indices (:func:`shuffle_groups`). Aggregation over the 4 patches of a token:
  attention a token RECEIVES (the [CLS] row, attention received, the full-width [CLS] row) is SUMMED -- the token
  holds all four patches, so it receives their total attention and the [CLS] row stays a distribution over the
  tokens; an attention map sums over the key patches and averages over the query patches (each row the mean
  distribution of the token's four queries); hidden states and keys are concatenated in pixel-shuffle order (the
  hidden states are then exactly what the projector reads at the feature layer; key dot products add up the four
  patches'). Every token has exactly four patches, so a sum ranks as a mean would.
* **[CLS] as a token** (VisionZip/VisionDrop's dominant [CLS], ``keep_cls=True``, their default): declined --
  InternVL drops [CLS] before the shuffle and its projector reads four patches at once; a [CLS] vector has no place
  in the LLM's input. With ``keep_cls=False`` they run: dominant patches by [CLS] attention, contextual tokens merged
  in the shuffled pre-projector space and projected.

Positions are re-indexed contiguously (1-D RoPE, as LLaVA): the pruned prompt is numbered 0..L'-1.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.methods import (
    ATTENTION_MAP,
    ATTENTION_RECEIVED,
    CLS_ATTENTION,
    CLS_ATTENTION_WIDE,
    CLS_HIDDEN,
    FEATURES,
    PAIRED_TEXT,
    TEXT_EMBEDDINGS,
    VISION_HIDDEN,
    VISION_KEYS,
    PruningMethod,
)
from tokenprune.patches import entering_images
from tokenprune.patches.base import PrunedCall, VisionStageAdapter
from tokenprune.patches.clip_signals import PROBE_SIGNALS, ClipProbe, encoder_layers, resolve_layer
from tokenprune.patches.llava_next import LlavaNextAdapter, PackedLayout
from tokenprune.record import ImageRecord, grid_boxes

CLS_TOKEN_REASON = (
    "keeps the [CLS] token itself as an LLM token, but InternVL drops [CLS] before the pixel shuffle and its "
    "projector reads 2x2 patch groups: a [CLS] vector has no place in the LLM's input"
)


def shuffle_groups(model: torch.nn.Module, side: int) -> torch.Tensor:
    """``[t, 4]`` long: the patch indices (raster order of the ``side x side`` tile) that the model's own
    ``pixel_shuffle`` concatenates into each of its ``t`` output tokens, in channel order."""
    return shuffled_patch_groups(model.model.pixel_shuffle, model.config.downsample_ratio, side)


def shuffled_patch_groups(pixel_shuffle: Any, ratio: float, side: int) -> torch.Tensor:
    """:func:`shuffle_groups` for any model's ``pixel_shuffle(x, scale_factor=)`` (HF's, vLLM's)."""
    index = torch.arange(side * side).reshape(1, side, side, 1)
    shuffled = pixel_shuffle(index, scale_factor=ratio)  # [1, s', s', 1/ratio^2]
    return shuffled.reshape(-1, shuffled.shape[-1])


def tile_layout(n_tiles: int, tokens_per_tile: int) -> PackedLayout:
    """Per token of an image of ``n_tiles`` tiles: its tile (the thumbnail last), its place in the tile, its box
    in the tile (fractions of the tile; of the image when there is a single tile)."""
    side = int(round(tokens_per_tile ** 0.5))
    return PackedLayout(
        torch.arange(n_tiles).repeat_interleave(tokens_per_tile), torch.arange(tokens_per_tile).repeat(n_tiles),
        grid_boxes((side, side)).repeat(n_tiles, 1), side, n_tiles,
    )


def shuffled_signal(name: str, value: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """One tile's patch-level signal (``[CLS]`` dropped) carried to its shuffled tokens (see the module docstring)."""
    groups = groups.to(value.device)
    t, g = groups.shape
    if name == CLS_ATTENTION:  # [H, P] -> [H, t]
        return value[:, groups].sum(dim=-1)
    if name == VISION_KEYS:  # [H, P, d] -> [H, t, g*d]
        return value[:, groups].reshape(value.shape[0], t, -1)
    if name == ATTENTION_MAP:  # [P, P] -> [t, t]: mean over the query patches, sum over the key patches
        return value[groups][:, :, groups].mean(dim=1).sum(dim=-1)
    if name in (ATTENTION_RECEIVED, CLS_ATTENTION_WIDE):  # [P] -> [t]
        return value[groups].sum(dim=-1)
    if name == VISION_HIDDEN:  # [P, Dv] -> [t, g*Dv], as pixel_shuffle concatenates them
        return value[groups].reshape(t, -1)
    if name == CLS_HIDDEN:  # [Dv]: one per tile, no token axis
        return value
    raise ValueError(f"no InternVL aggregation for signal {name!r}")


class InternVLAdapter(LlavaNextAdapter):
    model_types = ("internvl",)
    signals = frozenset({FEATURES, TEXT_EMBEDDINGS, PAIRED_TEXT}) | PROBE_SIGNALS
    encoder_loop = False

    def decoder_image_counts(self, kwargs: dict[str, Any]) -> dict[int, list[int]]:
        """Every image sits between its own start and end tokens, so each run of placeholders is one image (the base
        rule), not LLaVA-NeXT's packed counts."""
        return VisionStageAdapter.decoder_image_counts(self, kwargs)

    @classmethod
    def method_reason(cls, method: PruningMethod) -> str | None:
        if getattr(method, "keep_cls", False):  # VisionZip / VisionDrop with their official [CLS] dominant token
            return (
                f"method {method.name!r} {CLS_TOKEN_REASON}; run it with keep_cls=False (dominant patches and "
                f"contextual tokens, no [CLS] token) or use 'fastervlm', 'hiprune' or 'divprune'"
            )
        return None

    def check_method(self) -> None:
        self.method.check_family(cls_token=True)
        reason = self.method_reason(self.method)
        if reason:
            raise ValueError(reason)
        if self.method.stage == "vision-encoder":
            raise ValueError(
                f"method {self.method.name!r} prunes inside the vision encoder, layer by layer; the 'internvl' adapter "
                f"does not run InternViT's layer loop (the pixel shuffle after it needs every 2x2 patch group of the "
                f"tile, so single patches cannot be dropped inside the tower). Use 'fastervlm' ([CLS] attention after "
                f"the encoder) instead"
            )
        VisionStageAdapter.check_method(self)
        n_layers = len(encoder_layers(self.model.model.vision_tower))
        for request in self.method.requests(cls_token=True):
            if request.layer is not None:
                resolve_layer(request.layer, 0, n_layers)

    # --- signals -----------------------------------------------------------------------------------------------
    def _encode(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Projected tokens per tile ``[T, t, D]`` and the requested InternViT signals per tile, shuffled to tokens."""
        cfg, internvl = self.model.config, self.model.model
        layer = kwargs.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"tokenprune supports InternVL with vision_feature_select_strategy='default' (the [CLS] token dropped "
                f"before the pixel shuffle, as in every released checkpoint); got {strategy!r}"
            )
        requests = [r for r in self.method.requests() if r.name in PROBE_SIGNALS]
        feature_layer = self._feature_layer_index(layer) if requests else 0
        with ClipProbe(internvl.vision_tower, requests, feature_layer) as probe:
            out = internvl.get_image_features(
                pixel_values=kwargs["pixel_values"], vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True,
            )
        tiles = out.pooler_output  # [T, t, D]
        per_tile = probe.per_image(drop_cls=True)
        if not per_tile:
            return tiles, []
        groups = shuffle_groups(self.model, self._patch_side())
        norm = internvl.vision_tower.layernorm if layer == -1 else torch.nn.Identity()  # what -1 reads (Identity
        with torch.no_grad():  # with mean pooling, as InternVL3): the feature layer's VISION_HIDDEN goes through it
            per_tile = [{k: norm(v) if k == VISION_HIDDEN else v for k, v in s.items()} for s in per_tile]
        return tiles, [{key: shuffled_signal(key.split("@")[0], v, groups) for key, v in s.items()} for s in per_tile]

    def _patch_side(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size[0] // vc.patch_size[0]

    def tile_layout(self, n_tiles: int, tokens_per_tile: int) -> PackedLayout:
        return tile_layout(n_tiles, tokens_per_tile)

    # --- pruning -----------------------------------------------------------------------------------------------
    def _images(self, is_image: torch.Tensor, tokens_per_tile: int, n_tiles: int) -> list[tuple[int, int, int]]:
        """``(row, first placeholder, tile count)`` of every image, in prompt order (one placeholder run each)."""
        images = []
        for row in range(is_image.shape[0]):
            flags = is_image[row].long()
            starts = ((flags[1:] - flags[:-1]) == 1).nonzero().squeeze(1) + 1
            ends = ((flags[1:] - flags[:-1]) == -1).nonzero().squeeze(1) + 1
            starts = torch.cat([torch.zeros(1, dtype=torch.long), starts]) if bool(flags[0]) else starts
            ends = torch.cat([ends, torch.tensor([flags.numel()])]) if bool(flags[-1]) else ends
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                if (b - a) % tokens_per_tile:
                    raise ValueError(
                        f"an image placeholder run of {b - a} tokens is not a whole number of tiles of "
                        f"{tokens_per_tile} tokens; build the inputs with the model's processor"
                    )
                images.append((row, a, (b - a) // tokens_per_tile))
        if sum(n for *_, n in images) != n_tiles:
            raise ValueError(
                f"the prompt's image placeholders hold {sum(n for *_, n in images)} tiles but pixel_values has "
                f"{n_tiles}; build the inputs with the model's processor"
            )
        return images

    def new_image_pixels(self, segment: dict[str, Any], ids: torch.Tensor, start: int) -> dict[str, Any]:
        """The tiles of the new images only (``pixel_values`` holds tiles, row-major; tiles per image from its
        placeholders)."""
        pixels = segment.get("pixel_values")
        if pixels is None:
            return segment
        per_tile = round((self._patch_side() * self.model.config.downsample_ratio) ** 2)
        token = int(self.model.config.image_token_id)
        cached, new = ((part == token).sum(-1) // per_tile for part in (ids[:, :start], ids[:, start:]))
        index = entering_images.new_items(cached.tolist(), new.tolist(), pixels.shape[0], "image tile")
        return segment if index is None else {**segment, "pixel_values": pixels[index]}

    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        is_image = self._placeholders(kwargs)
        if is_image is None:
            return None
        input_ids = kwargs["input_ids"]
        tokens_per_tile = round((self._patch_side() * self.model.config.downsample_ratio) ** 2)
        found = self._images(is_image, tokens_per_tile, kwargs["pixel_values"].shape[0])  # checked before encoding
        tiles, tile_signals = self._encode(kwargs)
        layouts = [self.tile_layout(t, tokens_per_tile) for _, _, t in found]
        all_units = [self._units(layout)[0] for layout in layouts]
        sizes = [u.index.numel() for units in all_units for u in units]
        budgets = self.kept_counts(sizes, kwargs)

        keep = torch.ones_like(input_ids, dtype=torch.bool)
        kept_features, images, seen_in_row, first = [], [], self.images_before(input_ids.shape[0]), 0
        for i, ((row, start, n_img_tiles), layout, units) in enumerate(zip(found, layouts, all_units, strict=True)):
            feats = tiles[first:first + n_img_tiles].reshape(-1, tiles.shape[-1])  # [T_i * t, D]
            mine = tile_signals[first:first + n_img_tiles] if tile_signals else []
            first += n_img_tiles
            n = feats.shape[0]
            unit_budgets, budgets = budgets[: len(units)], budgets[len(units):]
            chosen = self._select_units(
                kwargs, feats, layout, units, unit_budgets, mine, row, start + n - 1, i, seen_in_row[row],
            )
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[chosen.slots] = False
            keep[row, start:start + n] = ~dropped.to(keep.device)
            kept_features.append(chosen.features)
            single = n_img_tiles == 1  # one tile: the whole image; more: boxes within each tile, thumbnail last
            images.append(ImageRecord(
                row, seen_in_row[row], n, chosen.kept, (layout.side, layout.side) if single else None,
                boxes=layout.boxes, view="image" if single else "tiles",
                segments=None if single else layout.crop, merged=chosen.assign, n_merged=chosen.n_merged,
            ))
            seen_in_row[row] += 1
        return self._compacted(kwargs, keep, kept_features, images)

    def _compacted(
        self, kwargs: dict[str, Any], keep: torch.Tensor, kept_features: list[torch.Tensor], images: list[ImageRecord]
    ) -> PrunedCall:
        """As LLaVA's, with the kept features as ONE tensor (InternVL's ``mm_encoder_outputs`` holds ``[1, K, D]``)."""
        call = super()._compacted(kwargs, keep, kept_features, images)
        call.kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
            pooler_output=torch.cat(kept_features)[None])}
        return call
