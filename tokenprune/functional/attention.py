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
