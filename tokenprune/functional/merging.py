"""Dominant + contextual token merging: VisionZip and the vision stage of VisionDrop."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import top_k_indices


def contextual_merge(
    hidden: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the ``remaining`` tokens (original order) into ``contextual`` tokens, as VisionZip/VisionDrop do.

    Targets are every ``step``-th remaining token (``step = max(1, R // contextual)``, first ``contextual`` of them);
    every other remaining token is assigned to the target whose key is most similar in cosine (ties: first target);
    a contextual token is ``hidden[target] + mean(hidden of its assigned tokens)`` (the target is not in the mean).
    Returns ``(merged [C, D] fp32, assign [N] long)``: ``assign`` maps each folded token (targets included) to its
    contextual token, -1 elsewhere.
    """
    n = hidden.shape[0]
    assign = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
    contextual = min(contextual, remaining.numel())
    if contextual <= 0:
        return hidden.new_zeros((0, hidden.shape[1]), dtype=torch.float32), assign
    step = max(1, remaining.numel() // contextual)
    is_target = torch.zeros(remaining.numel(), dtype=torch.bool, device=hidden.device)
    is_target[torch.arange(contextual, device=hidden.device) * step] = True
    targets, others = remaining[is_target], remaining[~is_target]
    metric = keys.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    choice = torch.argmax(metric[others] @ metric[targets].T, dim=1) if others.numel() else others  # [R - C]
    values = hidden.float()
    sums = torch.zeros(contextual, values.shape[1], device=hidden.device).index_add_(0, choice, values[others])
    counts = torch.bincount(choice, minlength=contextual).clamp_min(1).to(values.dtype)
    merged = values[targets] + sums / counts[:, None]
    assign[targets] = torch.arange(contextual, device=hidden.device)
    assign[others] = choice
    return merged, assign


def visionzip(
    cls_attn: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip (VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025).

    ``cls_attn`` ``[N]`` or ``[H, N]`` (heads summed as the official code; same ranking as the mean); ``hidden``
    ``[N, D]`` the feature layer's hidden states and ``keys`` ``[N, Dk]`` its head-mean keys, all over the patch
    tokens. ``dominant`` counts PATCH tokens (the official ``dominant=54`` includes [CLS] -> 53 here; the caller
    keeps [CLS]). Returns ``(dominant_idx, merged)``: the top-``dominant`` patches by [CLS] attention (ascending)
    and ``[contextual, D]`` contextual tokens (see :func:`contextual_merge`), in target order.
    """
    kept, merged, _ = visionzip_with_assign(cls_attn, hidden, keys, dominant, contextual)
    return kept, merged


def visionzip_with_assign(
    scores: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`visionzip` that also returns the ``assign`` map of :func:`contextual_merge`.

    ``dominant + contextual >= N`` still splits as the official code does (30 + 6 of 36: the 6 remaining tokens
    become 6 contextual tokens, each its own target); contextual tokens beyond the remaining ones are not made (the
    official code fails there). Only ``dominant >= N`` keeps every token as it is."""
    s = scores.float()
    s = s.sum(dim=0) if s.ndim == 2 else s
    n = s.shape[0]
    if dominant >= n:
        return torch.arange(n, device=s.device), hidden.new_zeros((0, hidden.shape[1]), dtype=torch.float32), \
            torch.full((n,), -1, dtype=torch.long, device=s.device)
    kept = top_k_indices(s, dominant) if dominant > 0 else torch.zeros(0, dtype=torch.long, device=s.device)
    rest = torch.ones(n, dtype=torch.bool, device=s.device)
    rest[kept] = False
    merged, assign = contextual_merge(hidden, keys, rest.nonzero().squeeze(1), contextual)
    return kept, merged, assign


def visiondrop(
    attention: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionDrop (VisionDrop: Training-Free Visual-Only Token Pruning, 2025), one stage.

    ``attention`` ``[Q, N]`` head-averaged attention rows from visual queries restricted to the visual keys (not
    renormalised) or an ``[N]`` score; the score is the column mean. Dominant = top-``dominant`` tokens, the rest
    merged into ``contextual`` tokens by key similarity (:func:`contextual_merge`). Returns
    ``(dominant_idx, merged, assign)``.
    """
    scores = attention.float()
    scores = scores.mean(dim=0) if scores.ndim == 2 else scores
    return visionzip_with_assign(scores, hidden, keys, dominant, contextual)
