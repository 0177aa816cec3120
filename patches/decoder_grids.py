"""2-D grid coordinates of the visual tokens as the decoder loop sees them, for grid-aware decoder methods (FEATHER's
uniform sampling, official code markendo/FEATHER): per prompt token its ``(row, column)`` within its image, ``-1`` where
unknown.

Qwen2-VL/2.5-VL: the M-RoPE ``(h, w)`` position rows of the image tokens, relative to the image's first row and
column (exact, also after pruning before the LLM, which keeps positions). LLaVA-1.5 and Gemma 3: a square run of
placeholders (24 x 24 = 576; Gemma 3's pooled 16 x 16 = 256 per image or crop) in raster order. LLaVA-NeXT's packed
layout (base tile + unpadded crops + newline tokens) has no single raster: unknown.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def visual_coords(model_type: str, image_of: torch.Tensor, position_ids: Any) -> torch.Tensor:
    """``[B, N, 2]`` long ``(row, column)`` of each token within its image (``image_of`` ``[B, N]``: image number per
    token, -1 text); -1 where unknown."""
    coords = torch.full((*image_of.shape, 2), -1, dtype=torch.long, device=image_of.device)
    mrope = isinstance(position_ids, torch.Tensor) and position_ids.ndim == 3 and position_ids.shape[0] >= 3
    for b in range(image_of.shape[0]):
        for m in range(int(image_of[b].max()) + 1):
            members = (image_of[b] == m).nonzero().squeeze(1)
            if mrope:
                hw = position_ids[-2:, b if position_ids.shape[1] > 1 else 0].to(members.device)[:, members].T.long()
                coords[b, members] = hw - hw.min(dim=0).values
            elif model_type in ("llava", "gemma3"):
                side = math.isqrt(members.numel())
                if side * side == members.numel():
                    local = torch.arange(members.numel(), device=members.device)
                    coords[b, members] = torch.stack([local // side, local % side], dim=1)
    return coords
