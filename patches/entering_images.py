"""A NEW image in a later turn on a vision-pruned KV cache: pruned in the forward in which it enters the cache.

The caller passes what it passes to an unpruned model: the conversation so far (the ids the cache stands for) +
the new turn with its image placeholders, and the pixels of the new image (or of every image of the conversation,
as a processor run on the whole conversation returns them: the cached images' pixels are dropped here). The tokens
after the cache are pruned as a prompt of their own (:func:`segment_kwargs`: same per-image budget as in a fresh
prompt, same selector), then put behind the cached pruned prefix (:func:`joined_kwargs`), so positions continue in
original coordinates (LLaVA: contiguous over the kept tokens, as a fresh pruned run numbers them; Qwen: the new
image's ORIGINAL M-RoPE positions, set by the adapter's ``prune_entering``). The cache's
:class:`~tokenprune.patches.pruned_cache.CacheState` then stands for the longer conversation (:func:`grown_state`),
so a third turn continues it like any other.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.patches import pruned_cache

# Inputs that carry pixels or their per-image layout: the segment call gets them, the joined call does not.
PIXEL_KEYS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_grid_thw", "video_grid_thw",
              "batch_num_images", "second_per_grid_ts", "image_num_patches")


FORWARD_DECLINE = (
    "this forward adds a new image or video on a pruned KV cache. A forward sees only the new tokens, so the cache "
    "cannot be told which conversation it now stands for; tokenprune prunes a new image in a later turn inside "
    "generate. Call model.generate(input_ids=<the whole conversation so far + the new turn>, <the new image's pixel "
    "inputs>, past_key_values=cache) (max_new_tokens=1 for a prefill), or run the conversation on a fresh cache"
)


def decoder_stage_decline(name: str) -> str:
    """The error for a new image entering a cache with a decoder-stage selection."""
    return (
        f"{name}: this call adds a new image or video after a KV cache pruned by a decoder-stage method; its tokens "
        f"would have to be pruned inside the LLM, at the method's layers, in this continuation forward, which "
        f"tokenprune does not do (decoder-stage selections are made once, on a fresh prompt). Run the whole "
        f"conversation with its images on a fresh cache (past_key_values=None), use a vision-stage method (e.g. "
        f"'divprune'), or disable_pruning(model) for this call"
    )


def has_pixels(kwargs: dict[str, Any]) -> bool:
    return any(kwargs.get(key) is not None for key in PIXEL_KEYS)


def enters_new_images(ids: torch.Tensor, start: int, visual_ids: tuple[int, ...]) -> bool:
    """Do the ids after the first ``start`` (what the cache already stands for) hold image/video placeholders?"""
    return bool(torch.isin(ids[:, start:], torch.tensor(visual_ids, device=ids.device)).any())


def spans_per_row(ids: torch.Tensor, token_id: int) -> list[int]:
    """How many runs of ``token_id`` (one per image in the processors' prompts) each row of ``ids`` holds."""
    hit = (ids == token_id).long()
    starts = hit[:, 1:] > hit[:, :-1]
    return (starts.sum(-1) + hit[:, 0]).tolist()


def images_per_row(ids: torch.Tensor, visual_ids: tuple[int, ...]) -> list[int]:
    """Images and videos per row of ``ids`` (runs of each placeholder id)."""
    return [sum(n) for n in zip(*(spans_per_row(ids, token) for token in visual_ids), strict=True)]


def per_image_pixels(
    segment: dict[str, Any], ids: torch.Tensor, start: int, token: int, sizes: list[int] | None = None
) -> dict[str, Any]:
    """``segment`` with the pixel inputs of the images in ``ids[:, start:]`` only, for pixel inputs with one entry
    per image, row-major (``pixel_values``, ``image_sizes``; OneVision's ``batch_num_images`` recounted).
    ``sizes``: each given image's placeholder count (the adapter's, as the decoder loop tells images side by side
    apart: ``patches/image_runs.py``); None: one run of placeholders per image."""
    pixels = segment.get("pixel_values")
    if pixels is None:
        return segment
    if sizes:
        index, new = new_items_by_count(ids, start, token, sizes)
    else:
        new = spans_per_row(ids[:, start:], token)
        index = new_items(spans_per_row(ids[:, :start], token), new, pixels.shape[0], "image")
    if index is None:
        return segment
    out = dict(segment)
    for key in ("pixel_values", "image_sizes"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key][index]
    if out.get("batch_num_images") is not None:
        out["batch_num_images"] = torch.tensor(new, dtype=torch.long)
    return out


def new_items_by_count(
    ids: torch.Tensor, start: int, token: int, sizes: list[int]
) -> tuple[list[int] | None, list[int]]:
    """Which of the given images (``sizes``: each one's placeholder count, flat row-major order) are the NEW ones in
    ``ids[:, start:]``, and how many new images each row holds: images back to back (``"<image><image>"``) form one
    run of placeholders, so they are told apart by their counts, as the model assigns its features. The index is
    None when only the new images were given; a ValueError when the counts fit neither reading."""
    cached = (ids[:, :start] == token).sum(-1).tolist()
    new = (ids[:, start:] == token).sum(-1).tolist()
    if sum(sizes) == sum(new):
        parts = [(row, n, True) for row, n in enumerate(new)]
    elif sum(sizes) == sum(cached) + sum(new):
        parts = [(row, t, is_new) for row, (c, n) in enumerate(zip(cached, new, strict=True))
                 for t, is_new in ((c, False), (n, True))]
    else:
        raise ValueError(
            f"this call adds {sum(new)} image placeholder tokens after a pruned KV cache whose prompt holds "
            f"{sum(cached)}; the pixel inputs describe {len(sizes)} image(s) of {sum(sizes)} placeholder tokens, "
            f"neither the new images alone nor every image of the conversation. Pass the pixels of the new image(s) "
            f"only (processor(images=new_images, text=new_turn)), or of every image of the conversation (processor "
            f"run on the whole conversation)"
        )
    index, per_row, item = [], [0] * len(new), 0
    for row, tokens, is_new in parts:
        while tokens > 0:
            if sizes[item] > tokens:
                raise ValueError(
                    f"the given images hold {sizes} placeholder tokens each, which do not line up with each row's "
                    f"image placeholders before the new turn ({cached}) and in it ({new}); build the inputs with the "
                    f"model's processor"
                )
            tokens -= sizes[item]
            if is_new:
                index.append(item)
                per_row[row] += 1
            item += 1
    return (None if parts and all(is_new for *_, is_new in parts) else index), per_row


def cached_images(state: Any, cached_ids: torch.Tensor, visual_ids: tuple[int, ...]) -> list[int]:
    """Images (and videos) per row that a pruned cache already holds: as its prefills recorded them
    (``CacheState.images``), else runs of placeholders in ``cached_ids`` (the conversation the cache stands for)."""
    images = getattr(state, "images", None)
    if images is None:
        return images_per_row(cached_ids, visual_ids)
    return pruned_cache.rows(images, cached_ids.shape[0], "input_ids").tolist()


def images_in_rows(record: Any, before: list[int]) -> torch.Tensor:
    """``[B]`` images per row after a prefill whose record is ``record``, on top of ``before`` per row."""
    counts = torch.tensor(before, dtype=torch.long)
    for image in record.images:
        counts[image.row] += 1
    return counts


def new_items(cached: list[int], new: list[int], given: int, what: str) -> list[int] | None:
    """Indices (row-major, as processors stack them) of the NEW images among ``given`` pixel items: None when only
    the new ones were given, the new ones' indices when every image of the conversation was; else a ValueError."""
    if given == sum(new):
        return None
    if given != sum(cached) + sum(new):
        raise ValueError(
            f"this call adds {sum(new)} new {what}(s) after a pruned KV cache that already holds {sum(cached)}; the "
            f"pixel inputs describe {given}. Pass the pixels of the new {what}(s) only (processor(images=new_images, "
            f"text=new_turn)), or of every {what} of the conversation (processor run on the whole conversation)"
        )
    index, first = [], 0
    for c, n in zip(cached, new, strict=True):
        index += range(first + c, first + c + n)
        first += c + n
    return index


def segment_kwargs(kwargs: dict[str, Any], mapped: dict[str, Any], length: int) -> dict[str, Any]:
    """The call's tokens after the cache (``mapped``: the call mapped onto the cache, see
    :func:`~tokenprune.patches.pruned_cache.continuation`) as a fresh prompt of their own, with the pixels."""
    ids = mapped["input_ids"]
    tail = ids[:, length:]
    segment = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "position_ids", "cache_position")}
    original = kwargs["input_ids"].shape[1]
    for key, value in kwargs.items():  # other per-token inputs (Gemma 3's token_type_ids): their tail
        if isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape == (ids.shape[0], original):
            segment[key] = value[:, original - tail.shape[1]:]
    segment["input_ids"] = tail
    mask = mapped.get("attention_mask")
    segment["attention_mask"] = torch.ones_like(tail) if mask is None else mask[:, length:]
    if mapped.get("mm_token_type_ids") is not None:
        segment["mm_token_type_ids"] = mapped["mm_token_type_ids"][:, length:]
    return segment


def cached_valid(mapped: dict[str, Any], length: int) -> torch.Tensor:
    """``[B]`` attended tokens of each row in the cache (cache coordinates): where the new tokens' text positions
    start."""
    mask = mapped.get("attention_mask")
    if mask is None:
        return torch.full((mapped["input_ids"].shape[0],), length, dtype=torch.long)
    return mask[:, :length].long().sum(-1)


def joined_kwargs(mapped: dict[str, Any], call_kwargs: dict[str, Any], length: int) -> dict[str, Any]:
    """The pruned segment behind the cached pruned prefix: per-token inputs over the whole (cache coordinates)
    sequence, the kept features of the new image(s) in ``mm_encoder_outputs``."""
    head_ids = mapped["input_ids"][:, :length]
    seg_ids = call_kwargs["input_ids"]
    joined = {k: v for k, v in call_kwargs.items() if k not in PIXEL_KEYS}
    joined["input_ids"] = torch.cat([head_ids, seg_ids], dim=1)
    head_mask = mapped.get("attention_mask")
    head_mask = torch.ones_like(head_ids) if head_mask is None else head_mask[:, :length]
    seg_mask = call_kwargs.get("attention_mask")
    seg_mask = torch.ones_like(seg_ids) if seg_mask is None else seg_mask
    joined["attention_mask"] = torch.cat([head_mask.to(seg_mask), seg_mask], dim=1)
    for key, value in call_kwargs.items():
        if key == "position_ids" or not isinstance(value, torch.Tensor) or key in ("input_ids", "attention_mask"):
            continue
        if value.shape[-1] == seg_ids.shape[1] and value.shape[-2:-1] == seg_ids.shape[:1]:  # per token
            # mm_token_type_ids is mapped onto the cache (Qwen reads it to find new vision tokens); other per-token
            # inputs (Gemma 3's token_type_ids) are read for the uncached tokens only: zeros over the cache
            head = mapped.get(key) if key == "mm_token_type_ids" else None
            head = value.new_zeros(*value.shape[:-1], length) if head is None else head[..., :length].to(value)
            joined[key] = torch.cat([head, value], dim=-1)
    positions = call_kwargs.get("position_ids")
    if positions is not None:  # generate feeds the last columns only; the head is never read
        joined["position_ids"] = torch.cat([positions.new_zeros(*positions.shape[:-1], length), positions], dim=-1)
    return joined


def grown_state(
    cache: Any, caller_ids: torch.Tensor, joined: dict[str, Any], rope_deltas: Any, images: torch.Tensor | None = None
) -> None:
    """The cache now stands for the caller's whole sequence (original coordinates) and holds the joined (pruned)
    one: a later call on it (turn 3) is mapped as any continuation."""
    mask = joined["attention_mask"]
    pruned_cache.attach(
        cache, original_ids=caller_ids.clone(), prefix_ids=joined["input_ids"].clone(),
        prefix_mask=None if bool((mask == 1).all()) else mask.clone(),
        prefix_types=joined.get("mm_token_type_ids"), rope_deltas=rope_deltas, images=images,
    )
