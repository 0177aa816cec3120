"""A pruned KV cache as a first-class cache: the state a pruned prefill leaves ON the cache object.

A pruned prefill writes fewer tokens than the prompt it stands for: a vision-stage method drops image tokens before
the LLM (every layer is shorter), a decoder-stage method drops them from layer K on (layers K.. are shorter than
layer 0). ``generate`` slices the new tokens of a follow-up call by the cache's length and builds positions and
masks from it, so a later call on that cache (a follow-up question, resumed generation, a copied prompt cache) needs
to know what the cache stands for. :class:`CacheState` holds exactly that and is attached to the cache object itself
(an attribute), so it follows the cache through ``copy.deepcopy`` (prompt reuse) and is dropped with it.

* Vision stage: the original prompt ids the cache was filled with, and the pruned prompt that is actually cached
  (ids, padding mask, Qwen ``mm_token_type_ids`` and M-RoPE ``rope_deltas``). A continuation's ``input_ids``
  (original prompt + anything after it) are mapped onto the cache: pruned prompt + the tokens after the original
  prompt; its 2-D attention mask likewise. Every layer then sees the tokens after the prompt at their original
  distance from it; positions follow the family's convention exactly as in a fresh pruned run.
* Decoder stage: the selection (per stage: kept prompt slots, per row), so decode calls on this cache, or on a copy
  of it, rebuild each pruned layer's mask from layer-0 coordinates (``patches/decoder_loop.py``).

An image is pruned once, in the forward in which it enters the cache; later calls see what was kept. A new image
in a later turn is pruned when it enters (``patches/entering_images.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ATTRIBUTE = "_tokenprune_state"


@dataclass
class CacheState:
    """What a pruned prefill left in one KV cache (``[B, ...]`` per row of the prefill's batch)."""

    original_ids: torch.Tensor | None = None   # [B, O] the prompt ids the caller passed
    prefix_ids: torch.Tensor | None = None     # [B, P] the pruned prompt the cache holds (layer 0)
    prefix_mask: torch.Tensor | None = None    # [B, P] its padding mask (None: no padding)
    prefix_types: torch.Tensor | None = None   # [B, P] Qwen mm_token_type_ids of the pruned prompt
    rope_deltas: torch.Tensor | None = None    # [B, 1] Qwen: original M-RoPE position - pruned text position
    images: torch.Tensor | None = None         # [B] images (and videos) the cache holds per row (None: not recorded)
    selection: Any = None                      # decoder stage: patches.decoder_call.PrefillSelection

    @property
    def vision_pruned(self) -> bool:
        return self.original_ids is not None


def state_of(cache: Any) -> CacheState | None:
    """The pruning state attached to ``cache`` (None for an unpruned or empty cache)."""
    return None if cache is None else getattr(cache, ATTRIBUTE, None)


def cached_length(cache: Any) -> int:
    """Tokens in layer 0 of ``cache`` (0 for None or a cache without ``get_seq_length``)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


def original_length(cache: Any) -> int:
    """How many tokens of the caller's sequence (original coordinates, padding included) ``cache`` stands for: its
    layer-0 length plus what a vision stage removed. Every layer stands for the same tokens; a decoder stage's
    shorter layers are mapped through the selection on the cache."""
    state = state_of(cache)
    length = cached_length(cache)
    if state is None or not state.vision_pruned or length == 0:
        return length
    return length + state.original_ids.shape[1] - state.prefix_ids.shape[1]


def attach(cache: Any, **fields: Any) -> CacheState | None:
    """Set ``fields`` on ``cache``'s state (created if absent). A vision-stage prefill passes all of its fields and
    replaces the previous state; a decoder-stage selection only sets ``selection``."""
    if cache is None:
        return None
    state = state_of(cache)
    if state is None or "original_ids" in fields:
        selection = state.selection if state is not None and "selection" not in fields else fields.get("selection")
        state = CacheState(**{**fields, "selection": selection})
    else:
        for key, value in fields.items():
            setattr(state, key, value)
    setattr(cache, ATTRIBUTE, state)
    return state


def forget(cache: Any) -> None:
    """Drop the state of a cache that is about to be filled from scratch (an empty cache)."""
    if cache is not None and ATTRIBUTE in getattr(cache, "__dict__", {}):
        delattr(cache, ATTRIBUTE)


def rows(tensor: torch.Tensor | None, batch: int, what: str) -> torch.Tensor | None:
    """``tensor`` ``[B, ...]`` repeated to ``batch`` rows the way ``generate`` repeats prompts (beams,
    ``num_return_sequences``: each row ``batch // B`` times in place)."""
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(
            f"this KV cache was filled by a pruned prefill of {tensor.shape[0]} prompt row(s); the call passes "
            f"{batch} rows for {what}, which is not a repetition of them (beams / num_return_sequences repeat each "
            f"row in place). Pass the same batch the cache was filled with, or start from a fresh cache"
        )
    return tensor.repeat_interleave(batch // tensor.shape[0], dim=0)


def continuation(state: CacheState, kwargs: dict[str, Any], cache_length: int) -> tuple[dict[str, Any], int]:
    """``generate``'s keyword arguments mapped onto a vision-pruned cache: ``input_ids`` (the original prompt the
    cache was filled with, then the new tokens) become the pruned prompt followed by the same new tokens; the 2-D
    attention mask and ``mm_token_type_ids`` follow. Returns the mapped kwargs and the original prompt length ``O``
    (the caller restores ``input_ids[:, :O]`` at the head of the output). Raises a ``ValueError`` when the ids do
    not continue the cached prompt."""
    ids = kwargs["input_ids"]
    batch, length = ids.shape
    original = rows(state.original_ids, batch, "input_ids").to(ids.device)
    prefix = rows(state.prefix_ids, batch, "input_ids").to(ids.device)
    o, p = original.shape[1], prefix.shape[1]
    if length < o or not torch.equal(ids[:, :o], original):
        raise ValueError(
            f"this KV cache holds a pruned prefill of a {o}-token prompt (its image was pruned when it entered the "
            f"cache), but the input_ids passed with it ({length} tokens) do not start with that prompt. Pass the "
            f"whole conversation so far (e.g. the previous call's output sequences) followed by the new tokens, or "
            f"start from a fresh cache (past_key_values=None) to prune the new prompt"
        )
    if length - o + p <= cache_length:
        raise ValueError(
            f"the pruned KV cache already holds {cache_length - p} token(s) after the {o}-token prompt; the "
            f"input_ids passed with it add nothing new ({length - o} tokens after the prompt). Append the new "
            f"tokens to the previous sequences"
        )
    new = dict(kwargs)
    new["input_ids"] = torch.cat([prefix, ids[:, o:]], dim=1)
    mask = kwargs.get("attention_mask")
    prefix_mask = rows(state.prefix_mask, batch, "attention_mask")
    if mask is not None and mask.ndim == 2:
        head = prefix_mask if prefix_mask is not None else torch.ones_like(prefix)
        new["attention_mask"] = torch.cat([head.to(mask), mask[:, o:]], dim=1)
    elif mask is None and prefix_mask is not None:
        new["attention_mask"] = torch.cat([prefix_mask.to(ids.device), torch.ones_like(ids[:, o:])], dim=1).long()
    types = kwargs.get("mm_token_type_ids")
    if types is not None and state.prefix_types is not None and types.shape[-1] == length:
        head = rows(state.prefix_types, batch, "mm_token_type_ids").to(types)
        new["mm_token_type_ids"] = torch.cat([head, types[:, o:]], dim=1)
    elif types is not None:
        new.pop("mm_token_type_ids")
    return new, o


def decode_mask(state: CacheState, mask: torch.Tensor, cache_length: int, q: int) -> torch.Tensor:
    """A manual loop's 2-D attention mask in original coordinates (prompt + everything after it) mapped onto the
    vision-pruned cache; returned unchanged when it already has the cache's length (+ ``q`` new tokens)."""
    prefix = state.prefix_ids
    o, p = state.original_ids.shape[1], prefix.shape[1]
    if mask.shape[1] == cache_length + q:
        return mask
    if mask.shape[1] != cache_length - p + o + q:
        raise ValueError(
            f"the attention mask has {mask.shape[1]} columns; on this pruned KV cache ({cache_length} cached tokens "
            f"standing for {cache_length - p + o}) with {q} new token(s) it must have {cache_length - p + o + q} "
            f"(original coordinates) or {cache_length + q} (cache coordinates)"
        )
    head = rows(state.prefix_mask, mask.shape[0], "attention_mask")
    head = torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device) if head is None else head
    return torch.cat([head.to(mask), mask[:, o:]], dim=1)


def full_mask(state: CacheState, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The 2-D mask of ``length`` keys in cache coordinates when the caller passed none: the pruned prompt's
    padding, then ones."""
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    head = rows(state.prefix_mask, batch, "attention_mask")
    if head is not None:
        mask[:, : head.shape[1]] = head.to(mask)
    return mask


def static_length(cache: Any) -> int | None:
    """The per-layer key length of a static (compileable) cache, whose layers return every preallocated slot."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    layers = getattr(cache, "layers", None) or []
    length = getattr(layers[0], "max_cache_len", None) if layers else None
    return int(length) if length is not None else None


def padding_mask_2d(mask: Any, length: int) -> Any:
    """The 2-D key-padding mask ``[B, length]`` behind the 4-D mask ``generate`` prepares for a static cache (its
    last query row: the keys the newest token may see; a Qwen dict: its ``full_attention`` entry); anything else
    unchanged."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", mask)
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[-1] >= length:
        last = mask[:, 0, -1, :length]
        return last if last.dtype == torch.bool else last == 0
    return mask


def without_cached_pixels(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without pixel inputs: their images are already in the cache (pruned when they entered)."""
    pixel_keys = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "video_grid_thw")
    return {k: v for k, v in kwargs.items() if k not in pixel_keys}


def with_original_prompt(out: Any, prompt_ids: torch.Tensor, pruned_length: int) -> Any:
    """Replace the pruned prompt at the head of ``generate``'s output with the caller's prompt ids (callers that
    slice by prompt length, as lmms-eval does, get exactly the generated tokens)."""
    sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if sequences is None:
        return out
    repeat = sequences.shape[0] // prompt_ids.shape[0]  # num_return_sequences / beams
    prompt = prompt_ids.to(sequences.device).repeat_interleave(repeat, dim=0)
    restored = torch.cat([prompt, sequences[:, pruned_length:]], dim=1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out
