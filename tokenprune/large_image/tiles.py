"""Which tiles of the next pyramid level to encode, from the text-guided scores of the current level's tokens
(LRS-VQA, Luo et al., ICCV 2025; official code VisionXLab/LRS-VQA, ``get_next_level_fea``).

The ``ratio`` share of the current level's tokens with the highest relevance (``int(n * ratio)``, at least one) vote
for the next-level tile under their centre; tiles are ranked by their number of votes (exact ties: lowest raster
index first) and the first ``max_tiles`` are encoded (``None``: every tile that got a vote, as the official inference
code does). Tokens over the padding of edge tiles have no place in the image and do not vote.
"""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import top_k_indices
from tokenprune.large_image.pyramid import Level, child_tile


def token_centres(boxes: torch.Tensor, level: Level, tile: tuple[int, int]) -> torch.Tensor:
    """``[n, 2]`` ``(x, y)`` centres in ``level`` pixels of the tokens of ``tile`` ``(row, col)``, from their
    ``boxes`` ``[n, 4]`` given as fractions of the tile image (NaN rows stay NaN: tokens with no place)."""
    t = level.tile
    cx = (boxes[:, 0] + boxes[:, 2]).float() / 2 * t + tile[1] * t
    cy = (boxes[:, 1] + boxes[:, 3]).float() / 2 * t + tile[0] * t
    return torch.stack([cx, cy], dim=1)


def select_child_tiles(
    scores: torch.Tensor,
    centres: torch.Tensor,
    parent: Level,
    child: Level,
    ratio: float,
    max_tiles: int | None,
) -> list[tuple[int, int]]:
    """Tiles ``(row, col)`` of ``child`` to encode, raster order. ``scores`` ``[n]``, ``centres`` ``[n, 2]`` (in
    ``parent`` pixels; NaN or padding: no vote) of the parent level's local tokens."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1]; got {ratio}")
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1 (or None: every tile that got a vote); got {max_tiles}")
    places = [child_tile(parent, child, float(x), float(y)) if x == x and y == y else None for x, y in centres.tolist()]
    inside = torch.tensor([p is not None for p in places], dtype=torch.bool)
    if not bool(inside.any()):
        raise ValueError("no token of the current level lies inside the image: nothing to descend into")
    candidates = inside.nonzero().squeeze(1)
    k = max(1, int(candidates.numel() * ratio))
    top = candidates[top_k_indices(scores.float()[candidates], k)]
    votes = torch.zeros(child.n_tiles, dtype=torch.long)
    for i in top.tolist():
        r, c = places[i]
        votes[r * child.grid[1] + c] += 1
    voted = votes.nonzero().squeeze(1)
    order = voted[torch.sort(-votes[voted], stable=True).indices]  # most votes first, ties: lowest raster index
    chosen = sorted(order[: max_tiles if max_tiles is not None else order.numel()].tolist())
    return [(i // child.grid[1], i % child.grid[1]) for i in chosen]
