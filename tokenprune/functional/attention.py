"""Attention-score selectors."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k, top_k_indices


def fastervlm(cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """FasterVLM ([CLS] Attention is All You Need for Training-Free Visual Token Pruning, Zhang et al., 2024).

    ``cls_attn`` is ``[H, N]`` (or ``[N]``): the [CLS] query row of the vision feature layer's attention over the
    image tokens, softmax taken over all keys including [CLS]. Heads are averaged after the softmax and the
    ``k`` highest-scoring tokens are kept, in their original order.
    """
    scores = cls_attn.float()
    if scores.ndim == 2:
        scores = scores.mean(dim=0)
    elif scores.ndim != 1:
        raise ValueError(f"cls_attn must be [H, N] or [N]; got shape {tuple(cls_attn.shape)}")
    check_k(k, scores.shape[0])
    return top_k_indices(scores, k)


def fopru(
    attn_map: torch.Tensor, k: int, *, strategy: str = "rank", grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """FoPru (FoPru: Focal Pruning for Efficient Large Vision-Language Models, 2024).

    ``attn_map`` ``[N, N]`` (or ``[H, N, N]``, heads averaged) attention among the image tokens of the penultimate
    vision layer, rows = queries, [CLS] removed after the softmax. The token score is the attention received
    (column mean) unless the attention given (row mean) has a strictly larger variance. ``"rank"`` keeps the top
    ``k`` tokens; ``"row"`` sums the scores per row of the ``(h, w)`` grid and keeps the top ``max(1, k // w)``
    whole rows (so ``rows * w`` tokens). Kept indices ascending.
    """
    a = attn_map.float()
    a = a.mean(dim=0) if a.ndim == 3 else a
    n = a.shape[-1]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=a.device)
    received, given = a.mean(dim=0), a.mean(dim=1)
    scores = given if float(given.var(unbiased=False)) > float(received.var(unbiased=False)) else received
    if strategy == "rank":
        return top_k_indices(scores, k)
    if strategy != "row":
        raise ValueError(f"fopru strategy must be 'rank' or 'row'; got {strategy!r}")
    if grid is None or grid[0] * grid[1] != n:
        raise ValueError(f"fopru's 'row' strategy needs the token grid (h, w) with h * w = {n}; got {grid}")
    h, w = grid
    rows = top_k_indices(scores.view(h, w).sum(dim=1), max(1, k // w))
    return (rows[:, None] * w + torch.arange(w, device=a.device)[None, :]).reshape(-1)
