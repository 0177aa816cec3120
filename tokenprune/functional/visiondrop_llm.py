"""VisionDrop's LLM stages (VisionDrop, 2025): per stage, dominant tokens by the visual tokens' own
attention and contextual tokens merged from the rest, with the paper's progressive schedule."""

from __future__ import annotations

import math

import torch

from tokenprune.functional.merging import visiondrop

# The paper's schedule for LLaVA-1.5-7B at "32 tokens" (a layer average over 32 layers): 48 tokens after the ViT
# stage (42 dominant incl. [CLS] + 6 contextual), then [dominant, contextual] per LLM stage (layers 8, 16, 24).
VISION_TOKENS = 48
LLM_STAGES = ((30, 5), (22, 4), (16, 3))


def visiondrop_stage_counts(n: int, fraction: float) -> list[tuple[int, int]]:
    """``(dominant, contextual)`` per LLM stage for ``n`` visual tokens entering the LLM, where about ``fraction`` of
    them survive the last stage. The stage totals follow the paper's shape ``48 -> 35 -> 26 -> 19``: stage ``s``
    keeps ``n * fraction ** e_s`` tokens with ``e_s = log(t_s / 48) / log(19 / 48)``; dominant = that total times the
    paper's ``d_s / t_s``, contextual = :func:`visiondrop_contextual` (exactly the paper's pairs at ``n = 48``,
    ``fraction = 19/48``). A stage whose total reaches ``n`` prunes nothing (``(n, 0)``)."""
    totals = [d + c for d, c in LLM_STAGES]
    last = totals[-1] / VISION_TOKENS
    out = []
    for s, ((d, _), t) in enumerate(zip(LLM_STAGES, totals, strict=True)):
        total = n * fraction ** (math.log(t / VISION_TOKENS) / math.log(last))
        if math.floor(total + 0.5 + 1e-9) >= n:
            out.append((n, 0))
            continue
        dominant = max(1, math.floor(total * d / t + 0.5 + 1e-9))
        out.append((dominant, visiondrop_contextual(s, dominant)))
    return out


def visiondrop_contextual(stage: int, dominant: int) -> int:
    """Contextual tokens of LLM stage ``stage`` for ``dominant`` dominant ones: the paper's ratio, rounded half up."""
    d, c = LLM_STAGES[stage]
    return math.floor(dominant * c / d + 0.5)


def visiondrop_fraction(average: float) -> tuple[float, float]:
    """``(vision keep, LLM fraction)`` whose schedule keeps ``average`` of the visual tokens on average over the four
    equal spans of layers (the paper's "32 tokens" = 32/576 with 48 after the ViT): the ViT stage keeps
    ``min(1, 1.5 * average)`` (the paper: the first stage holds ~1.5x the target average) and the LLM fraction is
    the paper's 19/48 or, where the ViT stage already keeps everything, solved by bisection; ``(1, 1)`` at 1."""
    if not 0.0 < average <= 1.0:
        raise ValueError(f"visiondrop: a layer-average keep ratio must lie in (0, 1]; got {average!r}")
    totals = [VISION_TOKENS] + [d + c for d, c in LLM_STAGES]
    exponents = [math.log(t / VISION_TOKENS) / math.log(totals[-1] / VISION_TOKENS) for t in totals]
    vision = min(1.0, 1.5 * average)
    if average >= 1.0:
        return 1.0, 1.0

    def mean(f: float) -> float:
        return vision * sum(f**e for e in exponents) / len(exponents)

    if mean(totals[-1] / VISION_TOKENS) >= average - 1e-12:
        return vision, totals[-1] / VISION_TOKENS
    lo, hi = totals[-1] / VISION_TOKENS, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < average else (lo, mid)
    return vision, hi


def visiondrop_merge_groups(
    attention: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One LLM stage as a merge plan: ``(dominant_idx, targets, groups)`` where contextual token ``c`` (target
    order) is ``sum(weights * hidden[members])`` for ``groups[c] = (members, weights)``: the target with weight 1
    plus the mean of the tokens assigned to it (:func:`tokenprune.functional.visiondrop`)."""
    kept, _, assign = visiondrop(attention, hidden, keys, dominant, contextual)
    groups, targets = [], []
    n = hidden.shape[0]
    rest = torch.ones(n, dtype=torch.bool, device=hidden.device)
    rest[kept] = False
    remaining = rest.nonzero().squeeze(1)
    count = min(contextual, remaining.numel()) if kept.numel() < n else 0
    step = max(1, remaining.numel() // count) if count else 1
    for c in range(count):
        target = remaining[c * step]
        others = ((assign == c) & (torch.arange(n, device=hidden.device) != target)).nonzero().squeeze(1)
        members = torch.cat([target[None], others])
        weights = torch.cat([torch.ones(1), torch.full((others.numel(),), 1.0 / max(1, others.numel()))])
        targets.append(target)
        groups.append((members, weights))
    targets_t = torch.stack(targets) if targets else torch.zeros(0, dtype=torch.long)
    return kept, targets_t, groups
