"""HiPrune: hierarchical anchor / buffer / register selection from two vision-encoder layers."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k, top_k_indices


def hiprune_anchor_count(k: int, alpha: float = 0.1) -> int:
    """Anchors for a budget ``k``: ``round(k * alpha / 5)`` as the official code (Python rounding; 192 -> 4,
    128 -> 3, 64 -> 1)."""
    return max(0, round(k * alpha / 5))


def _buffers(anchors: torch.Tensor, grid_w: int, n: int, quirks: bool) -> torch.Tensor:
    """Anchors plus their 4-neighbourhood on a grid of width ``grid_w``.

    ``quirks=True`` reproduces the official arithmetic: ``a +- 1`` wraps across row ends and out-of-range
    neighbours are clamped to token 0 / N-1 (adding those tokens). ``quirks=False`` keeps only real grid neighbours.
    """
    if quirks:
        cand = torch.cat([anchors, anchors - 1, anchors + 1, anchors - grid_w, anchors + grid_w])
        return torch.unique(cand.clamp(0, n - 1))
    col = anchors % grid_w
    parts = [anchors, anchors[col > 0] - 1, anchors[(col < grid_w - 1) & (anchors + 1 < n)] + 1,
             anchors[anchors - grid_w >= 0] - grid_w, anchors[anchors + grid_w < n] + grid_w]
    return torch.unique(torch.cat(parts))


def hiprune(
    object_attn: torch.Tensor, deep_attn: torch.Tensor, grid_w: int, k: int, n_anchor: int, *, quirks: bool = True
) -> torch.Tensor:
    """HiPrune (HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders, 2025).

    ``object_attn`` / ``deep_attn`` ``[N]``: attention each token receives (mean over heads and queries) in the
    "object" layer and in the deep (feature) layer. Anchors = top-``n_anchor`` of the object scores; buffers = their
    4-neighbours on the grid of width ``grid_w``; registers = the top deep scores among the other tokens, filling the
    budget ``k``. With ``quirks`` the official neighbourhood arithmetic (row wrap across row ends, clamping of
    out-of-grid neighbours to token 0 / N-1) is reproduced. If anchors + buffers exceed ``k``, the ``k`` of
    them with the highest object score are kept (the official code fails there).
    """
    n = object_attn.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=object_attn.device)
    obj, deep = object_attn.float(), deep_attn.float().clone()
    anchors = top_k_indices(obj, n_anchor) if n_anchor > 0 else torch.zeros(0, dtype=torch.long)
    chosen = _buffers(anchors.to(obj.device), grid_w, n, quirks) if n_anchor > 0 else anchors.to(obj.device)
    if chosen.numel() >= k:
        return torch.sort(chosen[top_k_indices(obj[chosen], k)]).values
    # The official code subtracts 1 from their deep scores (attention < 1, so they sink); excluding them outright
    # picks the same registers whenever the official code picks k distinct tokens.
    deep[chosen] = -torch.inf
    registers = top_k_indices(deep, k - chosen.numel())
    return torch.sort(torch.cat([chosen, registers])).values
