"""Raster grids of the images as the decoder loop sees them, for grid-aware decoder methods (FEATHER's uniform
sampling, specs/methods_llm.md §5): per row, one ``(h, w)`` per image run of visual placeholders, or ``None``.

LLaVA-1.5: a square run (24 x 24 = 576). Qwen2-VL/2.5-VL: ``image_grid_thw`` divided by the spatial merge, when
the run has exactly that many tokens (an image pruned before the LLM or a video has no grid here). LLaVA-NeXT's
packed layout (base tile + unpadded crops + newline tokens) is not a raster: ``None``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def visual_grids(model: Any, image_of: torch.Tensor, grid_thw: torch.Tensor | None
                 ) -> dict[int, list[tuple[int, int] | None]]:
    """``{row: [grid of image 0, image 1, ...]}`` for ``image_of`` ``[B, N]`` (image number per token, -1 text)."""
    config = model.config
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
    qwen = grid_thw is not None and merge is not None
    flat = [] if not qwen else [
        (int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()
    ]
    runs = [(b, m) for b in range(image_of.shape[0]) for m in range(int(image_of[b].max()) + 1)]
    out: dict[int, list[tuple[int, int] | None]] = {b: [] for b in range(image_of.shape[0])}
    for g, (b, m) in enumerate(runs):
        n = int((image_of[b] == m).sum())
        grid = None
        if qwen:
            if len(flat) == len(runs) and flat[g][0] == 1 and flat[g][1] * flat[g][2] == n:
                grid = flat[g][1:]
        elif config.model_type == "llava":
            side = math.isqrt(n)
            grid = (side, side) if side * side == n else None
        out[b].append(grid)
    return out
