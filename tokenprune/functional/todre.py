"""ToDRE stage 2 (Effective Visual Token Pruning via Token Diversity and Task Relevance, 2025): once the text stops
attending to the image deep in the LLM, every visual token is removed."""

from __future__ import annotations

import torch


def todre_text_to_visual(attn_text_rows: torch.Tensor, visual: torch.Tensor) -> float:
    """alpha_{t->v}: share of the text rows' attention mass on the visual keys.

    ``attn_text_rows`` ``[..., R, N]``: attention of the R instruction tokens over ALL keys (softmax over every key,
    so each row sums to one and the denominator is R), averaged over the leading (head) dimensions."""
    a = attn_text_rows.float().reshape(-1, *attn_text_rows.shape[-2:]).mean(dim=0)  # [R, N]
    return float(a[:, visual].sum() / a.sum().clamp_min(1e-12))


def todre_drop_all(alpha_text_to_visual: float, alpha_visual_to_text: float, tau: float = 0.10) -> bool:
    """Remove all visual tokens after the candidate layer iff BOTH ratios are below ``tau`` (paper default 0.10).
    With the image before the question and causal attention, alpha_{v->t} is 0 (visual rows cannot see the text)."""
    return alpha_text_to_visual < tau and alpha_visual_to_text < tau
