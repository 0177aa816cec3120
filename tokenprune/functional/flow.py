"""FlowCut: information-flow scores and the entropy-adaptive prune schedule inside the vision encoder."""

from __future__ import annotations

import math

import torch

from tokenprune.functional._ranking import top_k_indices


def flowcut_scores(cls_attn: torch.Tensor, semantic: torch.Tensor, value_l1: torch.Tensor) -> torch.Tensor:
    """FlowCut's per-layer patch score ``(a / sum a + s / sum s) * |v|_1`` (fp32): ``cls_attn`` ``[N]`` head-mean
    [CLS] attention over the current patches, ``semantic`` ``[N]`` head-mean ``softmax(v_cls . v_j)`` at the patches,
    ``value_l1`` ``[N]`` L1 norm of each patch's head-mean value vector."""
    a, s = cls_attn.float(), semantic.float()
    a = a / a.sum().clamp_min(torch.finfo(torch.float32).tiny)
    s = s / s.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (a + s) * value_l1.float()


def flowcut_step(
    cls_attn: torch.Tensor,
    semantic: torch.Tensor,
    value_l1: torch.Tensor,
    cumulative: torch.Tensor | None,
    length: int,
    target: int,
    remaining: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut (FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models, 2025),
    one vision layer.

    ``length`` is the current sequence length incl. [CLS], ``target`` the final one incl. [CLS], ``remaining`` the
    layers left before the select layer (``select_layer - idx - 1``). The cumulative score is
    ``0.5 * previous + 0.5 * score`` (the score itself at the first layer). Layers with an even ``remaining`` prune
    ``round((N - (target - 1)) / sqrt(remaining) * (1 - (H / log N)^2))`` patches (``H`` = entropy of the normalised
    [CLS] attention; ``remaining = 0`` prunes down to ``target``), never below ``target``. Returns
    ``(kept_patches, cumulative)``: kept patch indices ascending and the cumulative scores of ALL current patches
    (gather them with the kept indices for the next layer). ``0 log 0`` counts as 0 (the official CLIP code
    yields NaN there).
    """
    n = cls_attn.shape[0]
    score = flowcut_scores(cls_attn, semantic, value_l1)
    cum = score if cumulative is None else 0.5 * cumulative.float() + 0.5 * score
    if remaining % 2 != 0 or length <= target:
        return torch.arange(n, device=cls_attn.device), cum
    if remaining == 0:
        new_length = target
    else:
        p = cls_attn.float() / cls_attn.float().sum().clamp_min(torch.finfo(torch.float32).tiny)
        entropy = float(-torch.special.xlogy(p, p).sum())
        ratio = entropy / math.log(n) if n > 1 else 1.0
        prune = round((n - (target - 1)) / math.sqrt(remaining) * (1 - ratio**2))
        new_length = max(length - prune, target)
    return top_k_indices(cum, max(1, new_length - 1)), cum
