"""Gemma 3 (``Gemma3ForConditionalGeneration``, model_type ``gemma3``): vision-stage pruning.

Per prefill: run ``get_image_features`` once inside a :class:`~tokenprune.patches.clip_signals.ClipProbe` (SigLIP's
encoder layers have CLIP's ``q_proj``/``k_proj`` attention, so the same fp32 recomputation serves; SigLIP has no
[CLS]), average-pool every probed signal onto the LLM's token grid exactly as the projector pools the patches
(``Gemma3MultiModalProjector.avg_pool``: 64 x 64 patches -> 16 x 16 = 256 tokens on the released checkpoints),
select per image, drop the unselected ``<image_soft_token>`` placeholders from ``input_ids`` / ``attention_mask`` /
``token_type_ids`` (and ``labels``), re-pad, and hand the kept features to the model through
``mm_encoder_outputs``. ``<start_of_image>`` / ``<end_of_image>`` are text tokens: never pruned.

* Pooled signals: attention received and hidden states (at the last layer after the tower's ``post_layernorm``:
  what the projector averages) are averaged over each token's ``kernel x kernel`` patches, as the projector averages
  the patches; a merged hidden state (VFlowOpt's recycled cells) goes through the projector's per-token tail. The
  attention map (VFlowOpt) is the map among the POOLED tokens, ``P A P^T`` with ``A`` the head-mean SigLIP map and
  ``P`` the average-pooling matrix: token ``i``'s row is the mean over its member query patches of the attention
  they give to each token's member key patches (summed), so rows still sum to 1 (the aggregation InternVL's pixel
  shuffle gets, ``patches/internvl.py``). It is computed in chunks of query patches
  (``clip_signals.pooled_attention_map``): at 896 px (4,096 patches, 16 heads) the largest tensors are
  ``[16, 256, 4096]`` fp32 blocks (64 MiB each; ~200 MiB peak), never the ``[16, 4096, 4096]`` map (1 GiB a copy).

* Pan-and-scan (``do_pan_and_scan=True`` in the processor): the original image and each crop are separate
  ``pixel_values`` rows with their own ``<start_of_image>`` ... ``<end_of_image>`` block of 256 tokens; each is one
  selection unit with its own budget (``handle.last`` lists them in prompt order, ``index_in_row`` 0, 1, ...).
* Bidirectional image block: the model builds it from ``token_type_ids`` (each contiguous run of 1s is one block,
  ``get_block_sequence_ids_for_mask``); the compacted ``token_type_ids`` mark exactly the kept image tokens, still
  contiguous between ``<start_of_image>`` and ``<end_of_image>``, so the pruned prompt's block is exactly the kept
  tokens, in the global and in the sliding-window layers.
* Positions: RE-INDEXED (0..L'-1), the pruned prompt is a Gemma 3 prompt like any other. Gemma 3's RoPE is 1-D
  and HF's sliding-window mask counts sequence indices (``sliding_window_overlay``: ``kv_idx > q_idx - W``; the
  sliding cache keeps the last ``W - 1`` entries), so re-indexing keeps the window and the rotary distances in one
  coordinate, as in the unpruned model: a query sees the ``W`` tokens before it of the sequence the LLM runs on.
  Kept original positions would make RoPE count removed tokens that the window does not.

Decoder-stage methods (FastV, PDrop, ...) run inside the LLM through the shared decoder loop with per-layer masks
(``patches/decoder_masks.py``): from the pruned layer on, each layer type gets its own mask over the kept slots --
causal, the bidirectional block over exactly the kept tokens of each image (from ``token_type_ids``, by the model's
own ``get_block_sequence_ids_for_mask``), and in the sliding-window layers the window counted in ORIGINAL positions
(a kept token at position ``p`` sees keys at positions ``> p - W``), as the unpruned model counts it. Positions stay
original (``decoder_keep_positions``): each layer gets its own rotary tables (local and global bases) gathered at the
kept slots. The recomputed attention rows a method scores with follow the score layer's own rule.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from tokenprune.compute_dtype import compute_dtype_device
from tokenprune.methods import ATTENTION_MAP, ATTENTION_RECEIVED, FEATURES, PAIRED_TEXT, TEXT_EMBEDDINGS, VISION_HIDDEN
from tokenprune.patches.base import (
    PrunedCall,
    VisionStageAdapter,
    compacted_inputs,
    pad_id,
    placeholder_positions,
    text_embeddings,
)
from tokenprune.patches.clip_signals import ClipProbe, encoder_layers, resolve_layer
from tokenprune.patches.paired_text import paired_text_embeddings
from tokenprune.patches.units import Unit, select_image
from tokenprune.record import ImageRecord, PruneRecord, grid_boxes

POOLED_SIGNALS = frozenset({ATTENTION_RECEIVED, ATTENTION_MAP, VISION_HIDDEN})


class Gemma3Adapter(VisionStageAdapter):
    model_types = ("gemma3",)
    signals = frozenset({FEATURES, TEXT_EMBEDDINGS, PAIRED_TEXT}) | POOLED_SIGNALS
    cls_token = False
    decoder_keep_positions = True  # original positions: the sliding window and RoPE count them, as unpruned
    decoder_one_d_rope = True

    @classmethod
    def decoder_reason(cls, model_type: str, name: str, first_layer: int, config: Any = None) -> str | None:
        impl = getattr(config, "_attn_implementation", None) or ""
        if "flash" in impl:
            return (
                f"decoder-stage method {name!r} on Gemma 3 needs one 4-D attention mask per layer type (sliding "
                f"window, bidirectional image block over the kept tokens), which attn_implementation={impl!r} cannot "
                f"take; load the model with attn_implementation='sdpa' or 'eager', or use a vision-stage method"
            )
        return None

    def decoder_blocks(self) -> Any:
        """The image blocks HF builds the bidirectional mask from: each run of ``token_type_ids == 1``."""

        def blocks(kwargs: dict[str, Any]) -> torch.Tensor | None:
            types = kwargs.get("token_type_ids")
            return None if types is None else get_block_sequence_ids_for_mask(types)

        return blocks

    def check_method(self) -> None:
        try:
            super().check_method()
        except ValueError as err:
            raise ValueError(
                f"{err}. Gemma 3's SigLIP tower has no [CLS] token; use a method without [CLS], e.g. 'divprune', or "
                f"one with a substitute signal (attention received / hidden states of the pooled grid; see the "
                f"method table)"
            ) from None
        if self.scope == "image":
            raise ValueError(
                "scope='image' cannot pool a Gemma 3 image with its pan-and-scan crops: the model's inputs do not say "
                "which <start_of_image> blocks are crops of one image, so every block (image or crop) has its own "
                "budget. Use scope=None (or 'crop')"
            )
        n_layers = len(encoder_layers(self.model.model.vision_tower))
        for request in self.method.requests(cls_token=False):
            if request.name in POOLED_SIGNALS:  # fail at enable time, not at the first prefill
                resolve_layer(request.layer, n_layers - 1, n_layers)

    # --- signals ---------------------------------------------------------------------------------------------
    def _grid(self) -> tuple[int, int, int]:
        """``(patches per side, pooling kernel, tokens per side)`` of the projector."""
        return projector_grid(self.model.model.multi_modal_projector)

    def _pool_groups(self) -> torch.Tensor:
        return pool_groups(self.model.model.multi_modal_projector)

    def _encode(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Projected features per image ``[T*T, D]`` and the requested signals per image, on the pooled grid."""
        gemma = self.model.model
        requests = [r for r in self.method.requests(cls_token=False) if r.name in POOLED_SIGNALS]
        n_layers = len(encoder_layers(gemma.vision_tower))
        groups = self._pool_groups() if any(r.name == ATTENTION_MAP for r in requests) else None
        with ClipProbe(gemma.vision_tower, requests, n_layers - 1, map_groups=groups) as probe:  # layer None: last
            out = gemma.get_image_features(pixel_values, return_dict=True)
        features = list(out.pooler_output)  # [n_images, T*T, D] -> one [T*T, D] per image
        per_image = probe.per_image(drop_cls=False) or [{} for _ in features]
        norm = getattr(gemma.vision_tower, "vision_model", gemma.vision_tower).post_layernorm
        return features, pool_probed(gemma.multi_modal_projector, norm, requests, n_layers, per_image)

    def _project(self, pooled: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return project_pooled(self.model.model.multi_modal_projector, pooled, like)

    # --- pruning ---------------------------------------------------------------------------------------------
    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        if kwargs.get("pixel_values") is None or kwargs.get("mm_encoder_outputs") is not None:
            return None
        input_ids = self.prefill_ids(kwargs)
        if input_ids is None:
            return None
        config = self.model.config
        is_image = input_ids == config.image_token_id
        if not bool(is_image.any()):
            return None
        types = kwargs.get("token_type_ids")
        if types is None or types.shape != input_ids.shape or not torch.equal(types == 1, is_image):
            raise ValueError(
                "Gemma 3 needs token_type_ids marking exactly the image tokens (1) to build the bidirectional image "
                f"block of its attention mask; got {'none' if types is None else 'a different marking'}. Pass the "
                "processor's token_type_ids with input_ids"
            )
        features, signals = self._encode(kwargs["pixel_values"])
        budgets = self.kept_counts([f.shape[0] for f in features], kwargs)
        if len(set(budgets)) > 1 and _expands(kwargs, self.model.generation_config):
            raise ValueError(
                f"Gemma 3 takes the kept image features as one [images, tokens, D] tensor, which generate repeats for "
                f"beams / num_return_sequences only when every image keeps the same count; this call's budgets "
                f"differ ({sorted(set(budgets))}). Use keep= (the same count per image) with beams, or call generate "
                f"once per prompt"
            )
        batch, length = input_ids.shape
        flat_positions = placeholder_positions(is_image, features)
        side = self._grid()[2]
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        kept_features, images, start, seen_in_row = [], [], 0, self.images_before(batch)
        placeholders = (config.image_token_id, config.boi_token_id, config.eoi_token_id)
        for i, feats in enumerate(features):
            n = feats.shape[0]
            positions = flat_positions[start:start + n]
            start += n
            row = int(positions[0]) // length
            unit_signals = {FEATURES: feats.detach(), **signals[i]}
            if TEXT_EMBEDDINGS in self.method.signals_needed(cls_token=False):
                unit_signals[TEXT_EMBEDDINGS] = text_embeddings(
                    self.model, input_ids, kwargs.get("attention_mask"), row, int(positions[-1]) % length,
                    placeholders,
                )
            if PAIRED_TEXT in self.method.needs:
                unit_signals[PAIRED_TEXT] = paired_text_embeddings(  # begin/end-of-image: config delimiters
                    self.model, input_ids, kwargs.get("attention_mask"), row, int(positions[-1]) % length,
                    (config.image_token_id,),
                )
            grid = (side, side) if side * side == n else None
            chosen = select_image(
                self.method, feats, [Unit(torch.arange(n), grid)], [budgets[i]], [unit_signals], image_index=i,
                row=row, index_in_row=seen_in_row[row], cls_token=False, placement="span",
                project=functools.partial(self._project, like=feats),
            )
            keep.view(-1)[positions[chosen.features.shape[0]:]] = False  # identical placeholders: keep the first
            kept_features.append(chosen.features)
            images.append(ImageRecord(
                row, seen_in_row[row], n, chosen.kept, grid, boxes=grid_boxes(grid, n), view="image",
                merged=chosen.assign, n_merged=chosen.n_merged,
            ))
            seen_in_row[row] += 1
        return self._compacted(kwargs, keep, kept_features, images)

    def _compacted(
        self, kwargs: dict[str, Any], keep: torch.Tensor, kept_features: list[torch.Tensor], images: list[ImageRecord]
    ) -> PrunedCall:
        """Drop the placeholders where ``keep`` is False from every per-token input, re-pad, re-index positions."""
        config = self.model.config
        pad = pad_id(
            (getattr(config.text_config, "pad_token_id", None),),
            {config.image_token_id, config.boi_token_id, config.eoi_token_id},
        )
        new_kwargs = compacted_inputs(
            kwargs, keep, pad, dropped=("pixel_values",), extra={"token_type_ids": (kwargs["token_type_ids"], 0)}
        )
        new_kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=_stacked(kept_features))}
        record = PruneRecord(
            self.method.name, tuple(images), kwargs["input_ids"].shape[1], new_kwargs["input_ids"].shape[1]
        )
        return PrunedCall(new_kwargs, record)


def pool_probed(
    projector: Any, post_layernorm: Any, requests: list, n_layers: int, per_image: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """The probe's per-patch signals of each image on the LLM's pooled token grid: hidden states of the last layer
    through SigLIP's ``post_layernorm`` first (what the projector reads), the attention map as pooled by the probe
    itself (``map_groups``). Shared by the HF adapter and the vLLM model."""
    read = {
        r.key for r in requests if r.name == VISION_HIDDEN and resolve_layer(r.layer, n_layers - 1, n_layers)
        == n_layers - 1
    }

    def pooled(key: str, value: torch.Tensor) -> torch.Tensor:
        if key.split("@")[0] == ATTENTION_MAP:  # pooled by the probe
            return value
        with torch.no_grad():
            return pooled_signal(projector, post_layernorm(value) if key in read else value)

    return [{key: pooled(key, value) for key, value in item.items()} for item in per_image]


def projector_grid(projector: Any) -> tuple[int, int, int]:
    """``(patches per side, pooling kernel, tokens per side)`` of a Gemma 3 projector (HF's or vLLM's: the same
    attributes)."""
    return projector.patches_per_image, projector.kernel_size, projector.tokens_per_side


def pooled_signal(projector: Any, value: torch.Tensor) -> torch.Tensor:
    """A per-patch signal ``[P*P]`` or ``[P*P, D]`` averaged over each ``kernel x kernel`` pooling window, as
    the projector pools the patches: ``[T*T]`` or ``[T*T, D]`` in the LLM tokens' raster order."""
    _, kernel, tokens = projector_grid(projector)
    grid = value.float().reshape(tokens, kernel, tokens, kernel, *value.shape[1:])
    return grid.mean(dim=(1, 3)).reshape(tokens * tokens, *value.shape[1:])


def pool_groups(projector: Any) -> torch.Tensor:
    """``[T*T, kernel*kernel]``: the patch indices (raster order) each LLM token averages (tokens in raster)."""
    side, kernel, tokens = projector_grid(projector)
    patches = torch.arange(side * side).reshape(tokens, kernel, tokens, kernel)
    return patches.permute(0, 2, 1, 3).reshape(tokens * tokens, kernel * kernel)


def project_pooled(projector: Any, pooled: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pooled vision-space tokens (averages of post-layernorm patches, e.g. VFlowOpt's recycled cell tokens)
    through the projector's per-token tail -- its RMSNorm and projection after the average pooling -- in the
    dtype of its output ``like``: a pooled grid token comes out as the model's own feature."""
    dtype, device = compute_dtype_device(projector, like)
    weight = projector.mm_input_projection_weight
    with torch.no_grad():
        normed = projector.mm_soft_emb_norm(pooled.to(device=device, dtype=dtype))
        return (normed @ weight.to(device=device, dtype=dtype)).to(like.dtype)


def _stacked(spans: list[torch.Tensor]) -> torch.Tensor:
    """The images' kept rows as ``Gemma3Model.forward`` takes them (one tensor it scatters over the placeholders):
    ``[images, k, D]`` when every image keeps ``k`` rows -- the layout ``generate`` repeats per row for beams --
    else ``[1, sum k, D]`` (:meth:`Gemma3Adapter.prune` refuses to let ``generate`` repeat that one)."""
    if len({span.shape[0] for span in spans}) == 1:
        return torch.stack(spans)
    return torch.cat(spans)[None]


def _expands(kwargs: dict[str, Any], default: Any) -> bool:
    """Will ``generate`` repeat the prompt rows (beams, several sequences per prompt)?"""
    config = kwargs.get("generation_config") or default
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    sequences = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    return beams > 1 or sequences > 1
