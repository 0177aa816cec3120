"""Qwen2-VL and Qwen2.5-VL (model_types ``qwen2_vl``, ``qwen2_5_vl``): vision-stage pruning of images and videos.

Per prefill: compute the M-RoPE position ids of the UNPRUNED prompt (``get_rope_index``), run the vision tower once
(``get_image_features`` / ``get_video_features``: merged 2x2 tokens, in raster order -- Qwen2.5-VL's merger output
is already un-permuted from window order), select per image (per frame for videos by default), drop the unselected
``<|image_pad|>``/``<|video_pad|>`` placeholders together with their ``mm_token_type_ids``, and gather the kept
tokens' ORIGINAL (t, h, w) positions. Row 0 of the 4-row position ids (text positions, the only row the mask code
reads) is re-numbered contiguously, which keeps HF's packed-sequence detection off. The text after an image keeps
its original (larger) positions, exactly as in the unpruned prompt.

``model.model.rope_deltas`` (HF's per-model decode offset) is reset before each pruned prefill and then set so that
a later decode step without explicit position ids (a manual loop on the pruned KV cache) continues at the
unpruned prompt's next position: ``max_position + 1 - pruned_length`` per row. The offset is also kept on the cache
(``patches/pruned_cache.py``) and restored before every later call on that cache or a copy of it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.compaction import compact, padding_side
from tokenprune.methods import FEATURES, PAIRED_TEXT, TEXT_EMBEDDINGS
from tokenprune.patches import entering_images, pruned_cache
from tokenprune.patches.base import PrunedCall, VisionStageAdapter, pad_id, placeholder_positions, text_embeddings
from tokenprune.patches.paired_text import paired_text_embeddings
from tokenprune.patches.qwen_signals import QWEN_SIGNALS, QwenProbe
from tokenprune.patches.units import ImageSelection, Unit, select_image
from tokenprune.record import ImageRecord, PruneRecord, grid_boxes

_MODALITIES = (  # (kind, token id attribute, pixel kwarg, grid kwarg, features getter, mm_token_type id)
    ("image", "image_token_id", "pixel_values", "image_grid_thw", "get_image_features", 1),
    ("video", "video_token_id", "pixel_values_videos", "video_grid_thw", "get_video_features", 2),
)


class QwenVLAdapter(VisionStageAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    signals = frozenset({FEATURES, TEXT_EMBEDDINGS, PAIRED_TEXT}) | QWEN_SIGNALS
    cls_token = False
    decoder_keep_positions = True  # M-RoPE (t, h, w) ids: only KEEP is defined (docs/composition.md)
    video_units = True

    def visual_token_ids(self) -> tuple[int, ...]:
        config = self.model.config
        return (int(config.image_token_id), int(config.video_token_id))

    def check_method(self) -> None:
        try:
            super().check_method()
        except ValueError as err:
            raise ValueError(
                f"{err}. This Qwen ViT (model_type {self.model.config.model_type!r}) has no [CLS] token; use a "
                f"method without [CLS], e.g. 'divprune', or one with a Qwen substitute signal (see the method table)"
            ) from None
        n_blocks = len(self.model.model.visual.blocks)
        for request in self.method.requests(cls_token=False):
            if request.layer is not None and not -n_blocks <= request.layer < n_blocks:
                raise ValueError(
                    f"method {self.method.name!r} asks for vision layer {request.layer}, but this Qwen ViT has "
                    f"{n_blocks} blocks (valid: {-n_blocks}..{n_blocks - 1}); set the method's layer option"
                )

    def uninstall(self) -> None:
        super().uninstall()
        self.model.model.rope_deltas = None  # drop the pruned-cache offset; HF recomputes it on the next prefill

    # --- pruning ---------------------------------------------------------------------------------------------
    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        present = [m for m in _MODALITIES if kwargs.get(m[2]) is not None]
        if not present or kwargs.get("mm_encoder_outputs") is not None:
            return None
        input_ids = self.prefill_ids(kwargs)
        if input_ids is None:
            return None
        mm_types = kwargs.get("mm_token_type_ids")
        if mm_types is None:
            raise ValueError(
                "Qwen2-VL needs mm_token_type_ids (0 text, 1 image, 2 video) to place M-RoPE positions; the processor "
                "returns it with input_ids -- pass it through"
            )
        batch, length = input_ids.shape
        mask = kwargs.get("attention_mask")
        positions = self._original_positions(kwargs)  # [3, B, L] M-RoPE ids of the unpruned prompt

        keep = torch.ones_like(input_ids, dtype=torch.bool)
        encoder_outputs, images = {}, []
        seen_in_row = self.images_before(batch)
        for kind, token_attr, pixel_key, grid_key, getter, _ in present:
            features, probed, vision_out = self._encode(getter, kwargs[pixel_key], kwargs[grid_key])
            kept_features, chosen = self._select(
                kind, features, probed, kwargs[grid_key], input_ids == getattr(self.model.config, token_attr),
                keep, images, seen_in_row, kwargs,
            )
            encoder_outputs[kind] = self._encoder_output(vision_out, features, kept_features, chosen)

        new_kwargs = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "pixel_values_videos")}
        full_mask = mask if mask is not None else torch.ones_like(input_ids)
        per_token: dict[str, tuple[torch.Tensor, int]] = {
            "input_ids": (input_ids, _pad(self.model.config)),
            "attention_mask": (full_mask, 0),
            "mm_token_type_ids": (mm_types, 0),
            "position_ids": (positions, 0),
        }
        if kwargs.get("labels") is not None:
            per_token["labels"] = (kwargs["labels"], -100)
        new_kwargs.update(compact(keep, per_token, side=padding_side(mask)))
        new_mask = new_kwargs["attention_mask"]
        if mask is None and bool((new_mask == 1).all()):
            new_kwargs["attention_mask"] = None
        text_row = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        new_kwargs["position_ids"] = torch.cat([text_row[None], new_kwargs["position_ids"]], dim=0)  # [4, B, L']
        new_kwargs["mm_encoder_outputs"] = encoder_outputs
        deltas = self._set_rope_deltas(positions, full_mask, new_mask)
        record = PruneRecord(self.method.name, tuple(images), length, new_kwargs["input_ids"].shape[1])
        return PrunedCall(new_kwargs, record, rope_deltas=deltas)

    def _original_positions(self, kwargs: dict[str, Any]) -> torch.Tensor:
        given = kwargs.get("position_ids")
        if given is not None:
            if given.ndim == 3 and given.shape[0] in (3, 4):
                return given[-3:]
            raise ValueError(
                f"Qwen position_ids must be [3, B, L] or [4, B, L] M-RoPE ids; got shape {tuple(given.shape)}"
            )
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        positions, _ = self.model.model.get_rope_index(
            kwargs["input_ids"], mm_token_type_ids=kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs.get("image_grid_thw"), video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=kwargs.get("attention_mask"), **extra,
        )
        return positions

    def _set_rope_deltas(self, positions: torch.Tensor, mask: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Decode offset on the pruned cache: next position = max original position + 1, per row."""
        valid = mask.bool()
        top = positions.masked_fill(~valid[None], -1).amax(dim=(0, 2))  # [B]
        self.model.model.rope_deltas = (top + 1 - new_mask.long().sum(-1))[:, None]
        return self.model.model.rope_deltas

    def continue_positions(self, state: Any, batch: int) -> None:
        """A call on a pruned cache: HF's per-model ``rope_deltas`` (stale module state) set to THIS cache's offset,
        so the new tokens get their original M-RoPE positions whichever cache (or copy) was used last."""
        if state.rope_deltas is not None:
            self.model.model.rope_deltas = pruned_cache.rows(state.rope_deltas, batch, "input_ids")

    def continuation_positions(self, state: Any, text: torch.Tensor) -> torch.Tensor | None:
        """``[4, B, q]``: the text row, then the (t, h, w) rows at the ORIGINAL positions (text + rope_deltas)."""
        if state.rope_deltas is None:
            return None  # HF derives them (module rope_deltas)
        deltas = pruned_cache.rows(state.rope_deltas, text.shape[0], "input_ids")
        mrope = (text + deltas.to(text.device))[None].expand(3, -1, -1)
        return torch.cat([text[None], mrope], dim=0)

    def prune_entering(self, state: Any, segment: dict[str, Any], cached_valid: torch.Tensor) -> PrunedCall:
        """A new image after the pruned cache: the segment's M-RoPE positions as the unpruned model places them in
        the whole conversation (``get_rope_index`` on the segment, shifted to the cache's next original position:
        translation-equivariant), pruned as a fresh prompt; text row and ``rope_deltas`` over the whole sequence."""
        seg = dict(segment)
        ids = seg["input_ids"]
        if seg.get("mm_token_type_ids") is None or seg["mm_token_type_ids"].shape != ids.shape:
            config = self.model.config
            seg["mm_token_type_ids"] = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
        deltas = torch.zeros_like(cached_valid)[:, None] if state.rope_deltas is None else pruned_cache.rows(
            state.rope_deltas, ids.shape[0], "input_ids").to(cached_valid.device)
        offset = (cached_valid[:, None] + deltas).to(ids.device)  # [B, 1] the next token's original position
        seg["position_ids"] = self._original_positions(seg) + offset[None]
        call = super().prune_entering(state, seg, cached_valid)
        positions = call.kwargs["position_ids"]
        mask = call.kwargs.get("attention_mask")
        mask = torch.ones_like(call.kwargs["input_ids"]) if mask is None else mask
        valid = mask.bool()
        positions[0] = (positions[0] + cached_valid[:, None].to(positions)).masked_fill(~valid, 0)
        top = positions[1:].masked_fill(~valid[None], -1).amax(dim=(0, 2))
        call.rope_deltas = (top + 1 - cached_valid.to(top) - valid.long().sum(-1))[:, None]
        self.model.model.rope_deltas = call.rope_deltas
        return call

    def new_image_pixels(self, segment: dict[str, Any], ids: torch.Tensor, start: int) -> dict[str, Any]:
        """Per modality: patch rows of the new images/videos only (rows per item: the product of its grid)."""
        out = dict(segment)
        for kind, token_attr, pixel_key, grid_key, *_ in _MODALITIES:
            grid = out.get(grid_key)
            if out.get(pixel_key) is None or grid is None:
                continue
            token = int(getattr(self.model.config, token_attr))
            index = entering_images.new_items(
                entering_images.spans_per_row(ids[:, :start], token),
                entering_images.spans_per_row(ids[:, start:], token), grid.shape[0], kind)
            if index is None:
                continue
            rows = torch.split(torch.arange(out[pixel_key].shape[0]), grid.prod(-1).tolist())
            out[pixel_key] = out[pixel_key][torch.cat([rows[i] for i in index])]
            out[grid_key] = grid[index]
            if kind == "video" and out.get("second_per_grid_ts") is not None:
                out["second_per_grid_ts"] = out["second_per_grid_ts"][index]
        return out

    def _encode(
        self, getter: str, pixels: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], Any]:
        """Merged features per image/video ``[N_i, D]``, the requested ViT signals per image/video, and the vision
        output itself."""
        requests = list(self.method.requests(cls_token=False))
        with QwenProbe(self.model.model.visual, requests, grid_thw) as probe:
            out = getattr(self.model.model, getter)(pixels, grid_thw, return_dict=True)
        return list(out.pooler_output), probe.per_item(), out

    def _encoder_output(
        self, vision_out: Any, features: list[torch.Tensor], kept: list[torch.Tensor], chosen: list[ImageSelection]
    ) -> BaseModelOutputWithPooling:
        """What the model gets as ``mm_encoder_outputs[kind]``: the kept (and merged) features per image/video."""
        return BaseModelOutputWithPooling(pooler_output=kept)

    def _units(self, kind: str, thw: torch.Tensor) -> list[Unit]:
        merge = self.model.config.vision_config.spatial_merge_size
        t, h, w = int(thw[0]), int(thw[1]) // merge, int(thw[2]) // merge
        if kind == "video" and self.video_units and self.method.video_unit == "video" and self.scope in (None, "image"):
            return [Unit(torch.arange(t * h * w), (h, w) if t == 1 else None, video=(t, h, w))]
        per_frame = kind == "video" and self.scope != "image"
        if not per_frame:
            return [Unit(torch.arange(t * h * w), (h, w) if t == 1 else None)]
        return [Unit(torch.arange(f * h * w, (f + 1) * h * w), (h, w)) for f in range(t)]

    def _select(
        self, kind: str, features: list[torch.Tensor], probed: list[dict[str, torch.Tensor]], grid_thw: torch.Tensor,
        is_placeholder: torch.Tensor,
        keep: torch.Tensor, images: list[ImageRecord], seen_in_row: list[int], kwargs: dict[str, Any],
    ) -> tuple[list[torch.Tensor], list[ImageSelection]]:
        length = is_placeholder.shape[1]
        flat_positions = placeholder_positions(is_placeholder, features, kind)
        all_units = [self._units(kind, thw) for thw in grid_thw]
        budgets = self.kept_counts([u.index.numel() for units in all_units for u in units], kwargs)
        kept_features, choices, start = [], [], 0
        for i, (feats, units) in enumerate(zip(features, all_units, strict=True)):
            n = feats.shape[0]
            positions = flat_positions[start:start + n]
            start += n
            row = int(positions[0]) // length
            unit_budgets, budgets = budgets[: len(units)], budgets[len(units):]
            shared = {}
            if TEXT_EMBEDDINGS in self.method.signals_needed(cls_token=False):
                config = self.model.config
                shared[TEXT_EMBEDDINGS] = text_embeddings(
                    self.model, kwargs["input_ids"], kwargs.get("attention_mask"), row, int(positions[-1]) % length,
                    (config.image_token_id, config.video_token_id),
                )
            if PAIRED_TEXT in self.method.signals_needed(cls_token=False):
                config = self.model.config
                shared[PAIRED_TEXT] = paired_text_embeddings(
                    self.model, kwargs["input_ids"], kwargs.get("attention_mask"), row, int(positions[-1]) % length,
                    (config.image_token_id, config.video_token_id),
                )
            signals = [
                {FEATURES: feats[u.index.to(feats.device)].detach(), **shared,
                 **{key: value[u.index.to(value.device)] for key, value in probed[i].items()}}
                for u in units
            ]
            chosen = select_image(
                self.method, feats, units, unit_budgets, signals, image_index=len(images), row=row,
                index_in_row=seen_in_row[row], cls_token=False,
            )
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[chosen.slots] = False
            keep.view(-1)[positions[dropped.to(positions.device)]] = False
            kept_features.append(chosen.features)
            choices.append(chosen)
            images.append(self._record(kind, grid_thw[i], row, seen_in_row[row], n, chosen))
            seen_in_row[row] += 1
        return kept_features, choices

    def _record(self, kind: str, thw: torch.Tensor, row: int, index_in_row: int, n: int, chosen: Any) -> ImageRecord:
        merge = self.model.config.vision_config.spatial_merge_size
        t, h, w = int(thw[0]), int(thw[1]) // merge, int(thw[2]) // merge
        boxes = grid_boxes((h, w)).repeat(t, 1)
        segments = torch.arange(t).repeat_interleave(h * w) if t > 1 else None
        return ImageRecord(
            row, index_in_row, n, chosen.kept, (h, w) if t == 1 else None, boxes=boxes, view="image",
            segments=segments, merged=chosen.assign, n_merged=chosen.n_merged, kind=kind,
        )


def _pad(config: Any) -> int:
    text_pad = getattr(config.text_config, "pad_token_id", None)
    return pad_id((text_pad, getattr(config, "pad_token_id", None)), {config.image_token_id, config.video_token_id})
