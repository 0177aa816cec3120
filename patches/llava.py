"""LLaVA-1.5 (``LlavaForConditionalGeneration``, model_type ``llava``): vision-stage pruning.

Per prefill: run ``get_image_features`` once (with a pre-hook that recomputes only the [CLS] query row of the
feature layer's attention when the method needs it: works under eager, sdpa and flash-attention), select per
image, drop the unselected ``<image>`` placeholders from ``input_ids``/``attention_mask`` (and ``labels``), re-pad
rows to a common length, and hand the kept features to the model through ``mm_encoder_outputs``.

Positions: re-indexed contiguously (0..L'-1), as every official LLaVA-side implementation does.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenprune.patches.base import PrunedCall, VisionStageAdapter
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.compaction import compact, padding_side, reindex_positions
from tokenprune.methods import CLS_ATTENTION, FEATURES, SelectionContext
from tokenprune.record import ImageRecord, PruneRecord, grid_boxes


def cls_attention_hook(attn: torch.nn.Module, store: dict[str, torch.Tensor]) -> Any:
    """Pre-hook on a CLIP-style attention module: stores ``[B, H, T]``, the [CLS] query row's softmax (fp32)."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, T, D], after layer_norm1
        batch, length, _ = hidden.shape
        heads, head_dim = module.num_heads, module.head_dim
        with torch.no_grad():
            q = module.q_proj(hidden[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2).float()
            k = module.k_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2).float()
            scores = (q @ k.transpose(-1, -2)) * module.scale  # [B, H, 1, T]
            store["cls_attention"] = torch.softmax(scores, dim=-1)[:, :, 0]

    return attn.register_forward_pre_hook(hook, with_kwargs=True)


class LlavaAdapter(VisionStageAdapter):
    model_types = ("llava",)
    signals = frozenset({FEATURES, CLS_ATTENTION})

    def check_method(self) -> None:
        super().check_method()
        tower = self.model.model.vision_tower
        if CLS_ATTENTION in self.method.needs and getattr(tower.embeddings, "class_embedding", None) is None:
            raise ValueError(
                f"method {self.method.name!r} needs the [CLS] token's attention, but this model's vision tower "
                f"({self.model.config.vision_config.model_type}) has no [CLS] token; use a method that needs no "
                f"[CLS], e.g. 'divprune'"
            )

    # --- signals ---------------------------------------------------------------------------------------------
    def _feature_layer_index(self, vision_feature_layer: Any) -> int:
        """Index of the encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
        if not isinstance(vision_feature_layer, int):
            raise ValueError(
                f"method {self.method.name!r} needs the [CLS] attention of one feature layer, but the model "
                f"concatenates several (vision_feature_layer={vision_feature_layer!r})"
            )
        n_layers = len(self.model.model.vision_tower.encoder.layers)
        hidden_index = vision_feature_layer if vision_feature_layer >= 0 else n_layers + 1 + vision_feature_layer
        if not 1 <= hidden_index <= n_layers:
            raise ValueError(f"vision_feature_layer={vision_feature_layer} selects no encoder layer's output")
        return hidden_index - 1

    def _encode(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Projected features per image ``[N_i, D]`` and, if needed, [CLS] rows per image ``[H, N_i]``."""
        cfg, llava = self.model.config, self.model.model
        layer = kwargs.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        extra = {"image_sizes": kwargs["image_sizes"]} if kwargs.get("image_sizes") is not None else {}
        store: dict[str, torch.Tensor] = {}
        hook = None
        if CLS_ATTENTION in self.method.needs:
            attn = llava.vision_tower.encoder.layers[self._feature_layer_index(layer)].self_attn
            hook = cls_attention_hook(attn, store)
        try:
            out = llava.get_image_features(
                pixel_values=kwargs["pixel_values"], vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True, **extra,
            )
        finally:
            if hook is not None:
                hook.remove()
        features = list(out.pooler_output)
        cls_rows = None
        if hook is not None:
            rows = store["cls_attention"]  # [n_images, H, 1 + patches]
            rows = rows[:, :, 1:] if strategy == "default" else rows
            cls_rows = list(rows)
        return features, cls_rows

    def _grid(self, n: int) -> tuple[int, int] | None:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return (side, side) if side * side == n else None

    # --- pruning ---------------------------------------------------------------------------------------------
    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        if kwargs.get("pixel_values") is None or kwargs.get("mm_encoder_outputs") is not None:
            return None
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "tokenprune needs input_ids to find the image placeholders, but got inputs_embeds with pixel_values; "
                "pass input_ids (as the processor returns them) or call disable_pruning(model) first"
            )
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return None  # a continuation with a warm cache: not a fresh prefill
        image_token = self.model.config.image_token_id
        is_image = input_ids == image_token
        if not bool(is_image.any()):
            return None

        features, cls_rows = self._encode(kwargs)
        batch, length = input_ids.shape
        flat_positions = is_image.reshape(-1).nonzero().squeeze(1)
        total = sum(f.shape[0] for f in features)
        if flat_positions.numel() != total:
            raise ValueError(
                f"the prompt has {flat_positions.numel()} image placeholder tokens but the {len(features)} image(s) "
                f"give {total} features; build the inputs with the model's processor"
            )

        keep = torch.ones_like(input_ids, dtype=torch.bool)
        kept_features, images, start, seen_in_row = [], [], 0, [0] * batch
        budgets = self.kept_counts([f.shape[0] for f in features], kwargs)
        for i, feats in enumerate(features):
            n = feats.shape[0]
            positions = flat_positions[start:start + n]
            start += n
            row = int(positions[0]) // length
            signals = {FEATURES: feats.detach()}
            if cls_rows is not None:
                signals[CLS_ATTENTION] = cls_rows[i]
            ctx = SelectionContext(
                k=budgets[i], n=n, signals=signals, grid=self._grid(n),
                image_index=i, row=row, index_in_row=seen_in_row[row],
            )
            kept = _checked(self.method.select(ctx), n, self.method.name).to(feats.device)
            dropped = torch.ones(n, dtype=torch.bool, device=feats.device)
            dropped[kept] = False
            keep.view(-1)[positions[dropped.to(positions.device)]] = False
            kept_features.append(feats[kept])
            images.append(ImageRecord(row, seen_in_row[row], n, kept.cpu(), ctx.grid, boxes=grid_boxes(ctx.grid, n)))
            seen_in_row[row] += 1

        new_kwargs = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "image_sizes")}
        mask = kwargs.get("attention_mask")
        per_token: dict[str, tuple[torch.Tensor, int]] = {"input_ids": (input_ids, _pad_id(self.model.config))}
        counts = keep.sum(dim=1)
        if mask is not None or bool((counts != counts[0]).any()):  # unequal rows need a mask for the re-padding
            per_token["attention_mask"] = (mask if mask is not None else torch.ones_like(input_ids), 0)
        if kwargs.get("labels") is not None:
            per_token["labels"] = (kwargs["labels"], -100)
        if kwargs.get("position_ids") is not None:
            per_token["position_ids"] = (reindex_positions(kwargs["position_ids"], keep), 0)
        new_kwargs.update(compact(keep, per_token, side=padding_side(mask)))
        new_kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=kept_features)}
        new_length = new_kwargs["input_ids"].shape[1]
        record = PruneRecord(self.method.name, tuple(images), length, new_length)
        return PrunedCall(new_kwargs, record)


def _pad_id(config: Any) -> int:
    pad = getattr(config.text_config, "pad_token_id", None)
    if pad is None or pad == config.image_token_id:
        pad = 0 if config.image_token_id != 0 else 1
    return int(pad)


def _checked(kept: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Enforce the selector contract: long, 1-D, sorted ascending, unique, in range, non-empty."""
    kept = torch.as_tensor(kept)
    ok = (
        kept.dtype == torch.long and kept.ndim == 1 and 0 < kept.numel() <= n
        and int(kept.min()) >= 0 and int(kept.max()) < n and bool((kept[1:] > kept[:-1]).all())
    )
    if not ok:
        raise RuntimeError(
            f"method {name!r} returned invalid kept indices (need a sorted, unique 1-D long tensor within "
            f"range({n})): {kept.tolist()[:20]}"
        )
    return kept
