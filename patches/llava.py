"""LLaVA-1.5 (``LlavaForConditionalGeneration``, model_type ``llava``): vision-stage pruning.

Per prefill: run ``get_image_features`` once inside a :class:`~tokenprune.patches.clip_signals.ClipProbe` (hooks
that recompute only the signals the method declared, at the layers it asked for: works under eager, sdpa and
flash-attention), select per image, drop the unselected ``<image>`` placeholders from ``input_ids``/
``attention_mask`` (and ``labels``), re-pad rows to a common length, and hand the kept features (plus any merged
tokens of a :class:`~tokenprune.methods.Selection`) to the model through ``mm_encoder_outputs``. Methods that prune
inside the vision encoder (``stage = "vision-encoder"``: FlowCut) run the tower's layer loop instead
(``patches/clip_encoder_loop.py``) and are placed the same way, by their original patch indices.

Positions: re-indexed contiguously (0..L'-1), as every official LLaVA-side implementation does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune.compute_dtype import compute_dtype_device
from tokenprune.methods import CLS_SIGNALS, FEATURES, PAIRED_TEXT, TEXT_EMBEDDINGS, Selection, SelectionContext
from tokenprune.patches import image_runs
from tokenprune.patches.base import (
    PrunedCall,
    VisionStageAdapter,
    compacted_inputs,
    pad_id,
    placeholder_positions,
    text_embeddings,
)
from tokenprune.patches.clip_encoder_loop import encode_pruned
from tokenprune.patches.clip_signals import PROBE_SIGNALS, ClipProbe, encoder_layers, resolve_layer
from tokenprune.patches.paired_text import paired_text_embeddings
from tokenprune.patches.units import checked_indices
from tokenprune.record import ImageRecord, PruneRecord, grid_boxes


class LlavaAdapter(VisionStageAdapter):
    model_types = ("llava",)
    signals = frozenset({FEATURES, TEXT_EMBEDDINGS, PAIRED_TEXT}) | PROBE_SIGNALS
    encoder_loop = True  # runs "vision-encoder" methods (FlowCut) in the tower's layer loop

    def check_method(self) -> None:
        self.method.check_family(cls_token=True)  # methods no adapter can run yet say why
        super().check_method()
        tower = self.model.model.vision_tower
        if self.method.needs & CLS_SIGNALS and getattr(tower.embeddings, "class_embedding", None) is None:
            raise ValueError(
                f"method {self.method.name!r} needs the [CLS] token ({sorted(self.method.needs & CLS_SIGNALS)}), but "
                f"this model's vision tower ({self.model.config.vision_config.model_type}) has no [CLS] token; use a "
                f"method that needs no [CLS], e.g. 'divprune'"
            )
        layers = [r.layer for r in self.method.requests(cls_token=True) if r.layer is not None]
        if layers:  # fail at enable time, not at the first prefill, when a requested vision layer does not exist
            n_layers = len(encoder_layers(tower))
            for layer in layers:
                resolve_layer(layer, 0, n_layers)

    # --- signals ---------------------------------------------------------------------------------------------
    def _feature_layer_index(self, vision_feature_layer: Any) -> int:
        """Index of the encoder layer whose output is ``hidden_states[vision_feature_layer]``."""
        if not isinstance(vision_feature_layer, int):
            raise ValueError(
                f"method {self.method.name!r} needs signals of one feature layer, but the model "
                f"concatenates several (vision_feature_layer={vision_feature_layer!r})"
            )
        n_layers = len(encoder_layers(self.model.model.vision_tower))
        hidden_index = vision_feature_layer if vision_feature_layer >= 0 else n_layers + 1 + vision_feature_layer
        if not 1 <= hidden_index <= n_layers:
            raise ValueError(f"vision_feature_layer={vision_feature_layer} selects no encoder layer's output")
        return hidden_index - 1

    def _feature_choice(self, kwargs: dict[str, Any]) -> tuple[Any, str]:
        """``(vision_feature_layer, vision_feature_select_strategy)`` of this call (the config's by default)."""
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        layer = cfg.vision_feature_layer if layer is None else layer
        return layer, kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy

    def _encode(self, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Projected features per image ``[N_i, D]`` and the vision-tower signals the method requested, per image."""
        llava = self.model.model
        layer, strategy = self._feature_choice(kwargs)
        extra = {"image_sizes": kwargs["image_sizes"]} if kwargs.get("image_sizes") is not None else {}
        requests = [r for r in self.method.requests() if r.name in PROBE_SIGNALS]
        feature_layer = self._feature_layer_index(layer) if requests else 0
        with ClipProbe(llava.vision_tower, requests, feature_layer) as probe:
            out = llava.get_image_features(
                pixel_values=kwargs["pixel_values"], vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True, **extra,
            )
        features = list(out.pooler_output)
        signals = probe.per_image(drop_cls=strategy == "default") or [{} for _ in features]
        return features, signals

    def _place(self, feats: torch.Tensor, result: torch.Tensor | Selection, n: int) -> tuple[torch.Tensor, Any]:
        """The image's new span ``[k + m, D]`` and its selection (merged rows projected if pre-projector)."""
        if not isinstance(result, Selection):
            return feats[checked_indices(result, n, self.method.name).to(feats.device)], None
        kept = checked_indices(result.kept, n, self.method.name, allow_empty=result.n_merged > 0).to(feats.device)
        if not result.n_merged:
            return feats[kept], result
        merged = result.merged
        if result.space != FEATURES:
            projector = self.model.model.multi_modal_projector
            dtype, device = compute_dtype_device(projector, feats)  # the projector's output dtype = its input's
            with torch.no_grad():
                merged = projector(merged.to(device=device, dtype=dtype))
        merged = merged.to(device=feats.device, dtype=feats.dtype)
        return torch.cat([merged[: result.lead], feats[kept], merged[result.lead:]]), result

    def _grid(self, n: int) -> tuple[int, int] | None:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return (side, side) if side * side == n else None

    def decoder_image_counts(self, kwargs: dict[str, Any]) -> dict[int, list[int]]:
        """Each image's placeholder count (images can sit side by side: ``patches/image_runs.py``): what the call's
        ``mm_encoder_outputs`` hold (``generate`` pre-encodes; a vision stage's kept spans), else the family's rule."""
        counts = image_runs.encoded_counts(kwargs, self.model.config)
        token = int(self.model.config.image_token_id)
        if token not in counts and kwargs.get("pixel_values") is not None:
            counts[token] = self.placeholder_counts(kwargs)
        return {t: c for t, c in counts.items() if c}

    def placeholder_counts(self, kwargs: dict[str, Any]) -> list[int]:
        """Placeholders of each image of the call's ``pixel_values``: the square patch grid, plus [CLS] under the
        "full" strategy (as ``get_image_features``); [] for towers that size each image (``image_sizes``)."""
        if kwargs.get("image_sizes") is not None:
            return []
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2 + int(self._feature_choice(kwargs)[1] == "full")
        return [n] * kwargs["pixel_values"].shape[0]

    # --- pruning ---------------------------------------------------------------------------------------------
    def _placeholders(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """``[B, L]`` bool image-placeholder mask of a fresh prefill with images, else None (nothing to prune)."""
        if kwargs.get("pixel_values") is None or kwargs.get("mm_encoder_outputs") is not None:
            return None
        input_ids = self.prefill_ids(kwargs)
        if input_ids is None:
            return None
        is_image = input_ids == self.model.config.image_token_id
        return is_image if bool(is_image.any()) else None

    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        """One path for both stages; the switch is where the selection happens. A "vision-encoder" method (FlowCut)
        prunes in the tower's layer loop and its survivors are projected; any other method selects on the projected
        features of the stock ``get_image_features``. Either way each image's span replaces the first ``k + m`` of
        its placeholders and the call is compacted."""
        is_image = self._placeholders(kwargs)
        if is_image is None:
            return None
        in_encoder = self.method.stage == "vision-encoder"
        if in_encoder:
            sizes = self._encoder_sizes(kwargs)
            budgets = self.kept_counts(sizes, kwargs)
            in_encoder = any(k < n for k, n in zip(budgets, sizes, strict=True))  # else the stock path: bit-identical
        if in_encoder:
            features, probe_signals = None, None
        else:
            features, probe_signals = self._encode(kwargs)
            sizes = [f.shape[0] for f in features]
            budgets = self.kept_counts(sizes, kwargs)
        input_ids = kwargs["input_ids"]
        length = input_ids.shape[1]
        flat_positions = placeholder_positions(is_image, sizes)
        slots = torch.split(flat_positions, sizes)
        contexts, seen_in_row = [], self.images_before(input_ids.shape[0])
        for i, (n, positions) in enumerate(zip(sizes, slots, strict=True)):
            row = int(positions[0]) // length
            contexts.append(SelectionContext(k=budgets[i], n=n, signals={}, grid=self._grid(n), image_index=i,
                                             row=row, index_in_row=seen_in_row[row]))
            seen_in_row[row] += 1
        if in_encoder:
            spans = self._select_in_encoder(kwargs, budgets)
        else:
            spans = self._select(kwargs, features, probe_signals, contexts, slots)

        keep = torch.ones_like(input_ids, dtype=torch.bool)
        kept_features, images = [], []
        for positions, ctx, (span, kept, selection) in zip(slots, contexts, spans, strict=True):
            keep.view(-1)[positions[span.shape[0]:]] = False  # placeholders are identical: keep the first k + m
            kept_features.append(span)
            merged = selection.assign.cpu() if selection is not None and selection.assign is not None else None
            images.append(ImageRecord(
                ctx.row, ctx.index_in_row, ctx.n, kept, ctx.grid, boxes=grid_boxes(ctx.grid, ctx.n),
                merged=merged, n_merged=selection.n_merged if selection is not None else 0,
            ))
        return self._compacted(kwargs, keep, kept_features, images)

    def _select(
        self, kwargs: dict[str, Any], features: list[torch.Tensor], probe_signals: list[dict[str, torch.Tensor]],
        contexts: list[SelectionContext], slots: tuple[torch.Tensor, ...],
    ) -> list[tuple[torch.Tensor, torch.Tensor, Selection | None]]:
        """Per image ``(span, kept, selection)``: the method's selection on the projected features and signals."""
        input_ids, length = kwargs["input_ids"], kwargs["input_ids"].shape[1]
        with_signals = []
        for ctx, feats, signals, positions in zip(contexts, features, probe_signals, slots, strict=True):
            signals = {FEATURES: feats.detach(), **signals}
            if TEXT_EMBEDDINGS in self.method.needs:
                signals[TEXT_EMBEDDINGS] = text_embeddings(
                    self.model, input_ids, kwargs.get("attention_mask"), ctx.row, int(positions[-1]) % length,
                    (self.model.config.image_token_id,),
                )
            if PAIRED_TEXT in self.method.needs:
                signals[PAIRED_TEXT] = paired_text_embeddings(
                    self.model, input_ids, kwargs.get("attention_mask"), ctx.row, int(positions[-1]) % length,
                    (self.model.config.image_token_id,),
                )
            with_signals.append(replace(ctx, signals=signals))
        contexts = with_signals
        results = self.method.select_many(contexts)  # images of equal size in one batched call where it has one
        spans = []
        for feats, ctx, result in zip(features, contexts, results, strict=True):
            span, selection = self._place(feats, result, ctx.n)
            spans.append((span, (selection.kept if selection is not None else result).cpu(), selection))
        return spans

    def _encoder_sizes(self, kwargs: dict[str, Any]) -> list[int]:
        """Patch tokens per image of a "vision-encoder" method (which needs the "default" strategy: [CLS] dropped)."""
        _, strategy = self._feature_choice(kwargs)
        if strategy != "default":
            raise ValueError(
                f"method {self.method.name!r} prunes the patch tokens inside the encoder and drops [CLS] at the end; "
                f"it needs vision_feature_select_strategy='default', got {strategy!r}"
            )
        vc = self.model.config.vision_config
        return [(vc.image_size // vc.patch_size) ** 2] * kwargs["pixel_values"].shape[0]

    def _select_in_encoder(
        self, kwargs: dict[str, Any], budgets: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
        """Per image ``(span, kept, None)``: the tower's layer loop prunes, the survivors ``[k_i, D]`` are projected;
        they are placed by their original patch indices."""
        llava = self.model.model
        layer, _ = self._feature_choice(kwargs)
        survivors = encode_pruned(llava.vision_tower, self.method, kwargs["pixel_values"],
                                  self._feature_layer_index(layer), budgets)
        with torch.no_grad():
            return [(llava.multi_modal_projector(hidden[None])[0], kept, None) for hidden, kept in survivors]

    def _compacted(
        self, kwargs: dict[str, Any], keep: torch.Tensor, kept_features: list[torch.Tensor], images: list[ImageRecord]
    ) -> PrunedCall:
        """Drop the placeholders where ``keep`` is False from every per-token input, re-pad, re-index positions."""
        config = self.model.config
        pad = pad_id((getattr(config.text_config, "pad_token_id", None),), {config.image_token_id})
        new_kwargs = compacted_inputs(kwargs, keep, pad, dropped=("pixel_values", "image_sizes"))
        new_kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=kept_features)}
        record = PruneRecord(
            self.method.name, tuple(images), kwargs["input_ids"].shape[1], new_kwargs["input_ids"].shape[1]
        )
        return PrunedCall(new_kwargs, record)
