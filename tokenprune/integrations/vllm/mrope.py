"""Qwen2-VL / Qwen2.5-VL M-RoPE positions with pruned image placeholders (numpy/torch only, no vLLM import).

Each kept image token keeps the ORIGINAL position it has in the unpruned prompt, and the text after an image resumes
where it does in the unpruned prompt (``base + max position of the media + 1``), as Hugging Face's ``get_rope_index``
and vLLM's unpruned ``get_mrope_input_positions`` do. vLLM knows the kept indices only after the vision tower ran,
so positions are written in two steps:

1. :func:`placeholder_positions` at request admission: exact for text; the image's ``length`` placeholders get the
   first ``length`` grid positions (provisional).
2. :func:`media_coords` appended to each image's embeddings (4 extra channels: t, h, w, extent), gathered at the kept
   rows; vLLM's runner then calls ``recompute_mrope_positions`` (the EVS contract), which writes ``base + (t, h, w)``
   for the media and ``base + extent`` onward for the text after it. The extent is the media's max position + 1
   (vLLM's EVS helper uses ``llm_grid_w`` instead, which is wrong for images taller than wide).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MediaSpan:
    """One image or video in the prompt: placeholder ``offset`` and ``length`` (after pruning), its grid in LLM
    tokens (``h``, ``w`` already divided by the spatial merge size) and the temporal factor of its t positions
    (``second_per_grid * tokens_per_second`` for Qwen2.5-VL videos, 1.0 otherwise)."""

    offset: int
    length: int
    t: int
    h: int
    w: int
    t_factor: float = 1.0


def grid_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> np.ndarray:
    """``[3, t*h*w]`` int64 (t, h, w) positions of a media grid relative to its first token, in raster order, with
    the t row scaled and truncated as vLLM's and HF's unpruned code do."""
    grid = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid.astype(np.int64)


def extent(t: int, h: int, w: int, t_factor: float = 1.0) -> int:
    """How far the text after the media is shifted from the media's first position (max position + 1)."""
    return int(grid_positions(t, h, w, t_factor).max()) + 1


def media_coords(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """``[t*h*w, 4]`` int64: per token its (t, h, w) position and the media's :func:`extent` (the 4 channels
    vLLM's ``recompute_mrope_positions`` reads from the end of each media's embeddings)."""
    grid = grid_positions(t, h, w, t_factor)
    ext = np.full((1, grid.shape[1]), extent(t, h, w, t_factor), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([grid, ext]).T))


def placeholder_positions(num_tokens: int, spans: list[MediaSpan]) -> tuple[torch.Tensor, int]:
    """``([3, num_tokens] int64 positions, delta)`` for a prompt whose media occupy ``spans`` (step 1 above).

    ``delta = max position + 1 - num_tokens`` (vLLM's ``mrope_position_delta``, used for decode positions). With
    every span unpruned this is exactly vLLM's and HF's unpruned result.
    """
    parts, start, next_pos = [], 0, 0
    for span in sorted(spans, key=lambda s: s.offset):
        text = span.offset - start
        if text < 0 or span.length > span.t * span.h * span.w:
            raise ValueError(f"media span {span} overlaps the previous one or is longer than its grid")
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
        next_pos += text
        parts.append(grid_positions(span.t, span.h, span.w, span.t_factor)[:, : span.length] + next_pos)
        next_pos += extent(span.t, span.h, span.w, span.t_factor)
        start = span.offset + span.length
    if start > num_tokens:
        raise ValueError(f"media spans end at {start}, after the prompt's {num_tokens} tokens")
    text = num_tokens - start
    parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
    positions = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.int64)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return torch.from_numpy(positions), delta
