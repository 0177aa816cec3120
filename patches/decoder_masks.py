"""The attention masks of the decoder loop's pruned layers (``patches/decoder_loop.py``), from the first pruned one on.

:func:`build_mask`: one causal + padding mask for every layer (LLaVA, Qwen, InternVL, OneVision). :class:`LayerMasks`:
one mask per layer, for language models whose layers do not share one: sliding-window layers next to global ones, and
image tokens that attend to each other in both directions (Gemma 3's ``token_type_ids`` blocks).

The rule is the unpruned model's, applied to the slots that are left, in LAYER-0 coordinates (a kept token keeps the
sequence index it had in the prompt, as its rotary position does): key ``k`` is visible to query ``q`` iff ``k`` is
a valid (non-padding) written entry, and ``k`` precedes ``q`` in the layer's sequence OR both belong to the same image
block; a sliding-window layer (``self_attn.sliding_window = W``) also needs ``coord(k) > coord(q) - W`` -- HF's
``sliding_window_overlay`` AND ``(causal OR blockwise)`` (``create_masks_for_vision_model``), counted in original
positions -- and ``slot(k) > slot(q) - W`` in the layer's own sequence, what a sliding cache (the last ``W - 1``
entries) can hold. For kept tokens the second follows from the first (fewer tokens than positions between two kept
ones); it only bites on merged / recycled extra tokens, which stand at a representative's position out of order, and
keeps cached decoding equal to a full recompute.

Which entries a layer returns in a call comes from its cache layer's own ``get_mask_sizes`` (a sliding cache keeps the
last ``W - 1`` of what it was fed, a static one its preallocated slots): the layer's sequence is the stage's kept
prompt slots followed by the tokens after the prompt, and the keys are its entries ``[offset, offset + length)``.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.patches import pruned_cache


def visible(
    key_slots: torch.Tensor, key_coords: torch.Tensor, key_ok: torch.Tensor, key_blocks: torch.Tensor | None,
    query_slots: torch.Tensor, query_coords: torch.Tensor, query_blocks: torch.Tensor | None, window: int | None,
) -> torch.Tensor:
    """``[B, q, K]`` bool: which keys each query sees. Slots ``[B or 1, K]`` / ``[B or 1, q]`` order the layer's
    sequence (causality), coords are layer-0 positions (the window), blocks are image numbers (-1 text) or None,
    ``key_ok`` ``[B, K]`` marks valid written keys."""
    allowed = key_slots[:, None, :] <= query_slots[:, :, None]
    if key_blocks is not None and query_blocks is not None:
        same = (key_blocks[:, None, :] == query_blocks[:, :, None]) & (query_blocks[:, :, None] >= 0)
        allowed = allowed | same
    if window is not None:
        allowed = allowed & (key_coords[:, None, :] > query_coords[:, :, None] - window)
        allowed = allowed & (key_slots[:, None, :] > query_slots[:, :, None] - window)
    return allowed & key_ok[:, None, :]


def kernel_mask(impl: str, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` ``[B, q, K]`` as the attention kernel takes it: eager -- additive float ``[B, 1, q, K]``; sdpa
    -- boolean. Query rows with no visible key (padding) see every key: no NaN, never read."""
    if "flash" in impl:
        raise ValueError(
            f"decoder-stage pruning on a model with sliding-window layers or bidirectional image blocks needs a "
            f"4-D attention mask per layer type, which attn_implementation={impl!r} cannot take; load the model with "
            f"attn_implementation='sdpa' or 'eager'"
        )
    allowed = (allowed | ~allowed.any(dim=-1, keepdim=True))[:, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


class LayerMasks:
    """The masks of one call's layers from one pruning stage on: one layer sequence (the stage's kept prompt slots,
    then the tokens after the prompt), whose last ``q`` entries are the call's queries; one mask per distinct
    ``(keys returned, offset, window)``, built when a layer first asks."""

    def __init__(self, impl: str, dtype: torch.dtype, coords: torch.Tensor, ok: torch.Tensor,
                 blocks: torch.Tensor | None, q: int):
        self.impl, self.dtype, self.q = impl, dtype, q
        self.coords, self.ok, self.blocks = coords, ok, blocks  # [B, S] each (blocks: None without image blocks)
        self._built: dict[tuple[int, int, int | None], torch.Tensor] = {}

    def for_layer(self, cache: Any, layer: int, window: int | None) -> torch.Tensor:
        """The mask of decoder layer ``layer`` (its cache ``cache``, or None: no cache, every entry returned)."""
        length = self.coords.shape[1]
        past = length - self.q
        if cache is not None and hasattr(cache, "get_mask_sizes"):
            kv, offset = cache.get_mask_sizes(self.q, layer)
        else:
            kv, offset = length, 0
        key = (int(kv), int(offset), window)
        if key not in self._built:
            self._built[key] = self._build(int(kv), int(offset), window, past)
        return self._built[key]

    def _build(self, kv: int, offset: int, window: int | None, past: int) -> torch.Tensor:
        device = self.coords.device
        length = self.coords.shape[1]
        slots = torch.arange(offset, offset + kv, device=device)[None]  # [1, kv] entries of the layer's sequence
        written = slots < length
        take = slots.clamp(max=length - 1).expand(self.coords.shape[0], -1)
        key_coords, key_ok = self.coords.gather(1, take), self.ok.gather(1, take) & written
        key_blocks = None if self.blocks is None else self.blocks.gather(1, take)
        query_slots = torch.arange(past, length, device=device)[None]
        query_coords = self.coords[:, past:]
        query_blocks = None if self.blocks is None else self.blocks[:, past:]
        allowed = visible(slots, key_coords, key_ok, key_blocks, query_slots, query_coords, query_blocks, window)
        return kernel_mask(self.impl, allowed, self.dtype)


def call_padding(model_mask: Any, mask: Any, sel: Any, batch: int, past: int, q: int) -> Any:
    """The call's 2-D padding mask ``[B, past + q]`` when the language model got one mask per layer type: the
    model's own 2-D mask; else, on a cache, the prefill's prompt mask (``sel.mask``) then ones (HF's precomputed
    per-type masks -- a static cache -- are sized against the first layer of each type, which may be a pruned one);
    else HF's full-attention mask (a prefill: no layer written yet)."""
    if isinstance(model_mask, torch.Tensor) and model_mask.shape == (batch, past + q):
        return model_mask
    if past > 0 and sel is not None and sel.mask is not None and sel.mask.shape[0] == batch:
        after = torch.ones(batch, past + q - sel.mask.shape[1], dtype=sel.mask.dtype, device=sel.mask.device)
        return torch.cat([sel.mask, after], dim=1)
    return pruned_cache.padding_mask_2d(mask, past + q)

def build_mask(
    impl: str, kv_valid: torch.Tensor, q: int, dtype: torch.dtype, kv_len: int | None = None
) -> torch.Tensor | None:
    """The attention mask for ``q`` queries that are the last ``q`` of ``kv_valid.shape[1]`` keys (causal + padding),
    in the form the kernel takes: flash -- 2-D 0/1 (None without padding); eager -- additive float; others (sdpa)
    -- boolean ``[B, 1, q, kv]``. Query rows with no visible key (padding) see every key: no NaN, never read.
    ``kv_len`` (a static cache: every layer returns ``max_cache_len`` keys): the unwritten key slots are masked."""
    if kv_len is not None and kv_len > kv_valid.shape[1]:
        blank = torch.zeros(kv_valid.shape[0], kv_len - kv_valid.shape[1], dtype=torch.bool, device=kv_valid.device)
        full = build_mask(impl, kv_valid, q, dtype)
        if "flash" in impl:
            return torch.cat([kv_valid, blank], dim=1).long()
        blank = blank[:, None, None].expand(-1, 1, q, -1)
        if impl == "eager":
            return torch.cat([full, torch.full(blank.shape, torch.finfo(dtype).min, dtype=dtype,
                                               device=full.device)], dim=-1)
        return torch.cat([full, blank], dim=-1)
    if "flash" in impl:
        return None if bool(kv_valid.all()) else kv_valid.long()
    kv = kv_valid.shape[1]
    keys = torch.arange(kv, device=kv_valid.device)
    causal = keys[None, :] <= (keys[kv - q:])[:, None]                    # [q, kv]
    allowed = causal[None] & kv_valid[:, None, :]                          # [B, q, kv]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed[:, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=kv_valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed

