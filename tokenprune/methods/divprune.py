"""DivPrune: keep a maximally diverse subset of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import FEATURES, Deviation, PruningMethod, SelectionContext
from tokenprune.methods.batched import select_grouped


@dataclass
class DivPrune(PruningMethod):
    """DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (Alvar et al., CVPR 2025).

    Greedy max-min diversity in cosine distance over the projected visual tokens (LLM input space, as the
    official code). The paper's default ratio is 0.098 (56 of 576 tokens); positions are re-indexed
    contiguously after pruning, as in the official code.
    """

    name = "divprune"
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)"
    deviations = (
        Deviation(
            "A token already selected is excluded from later picks (as the official Qwen port does).",
            "The official LLaVA loop can pick the same index again once every remaining token duplicates a selected "
            "one, and then silently keeps fewer than `k` tokens; whenever it picks `k` distinct tokens the selections "
            "are identical.",
        ),
    )
    needs = frozenset({FEATURES})
    crop_scope = "image"          # LLaVA-NeXT: one global pool over the packed image (base + unpadded crops)
    newline_candidates = True     # ... including the image_newline tokens, as the official code does

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return F.divprune(ctx.signal(FEATURES), ctx.k)

    def select_many(self, contexts: list[SelectionContext]) -> list[torch.Tensor]:
        return select_grouped(contexts, self.select, lambda group: F.divprune(
            torch.stack([c.signal(FEATURES) for c in group]), group[0].k))
