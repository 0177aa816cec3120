"""Deterministic ranking shared by the selectors: exact ties go to the lowest index."""

from __future__ import annotations

import torch


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` (1-D), returned sorted ascending.

    A stable descending sort puts the lowest index first among exact ties, which is what the official code
    gets from ``torch.topk`` on CUDA (CPU ``topk`` promises no order).
    """
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n, device=scores.device)
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (tokens to keep); got {k!r} for {n} tokens")
