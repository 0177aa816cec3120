"""CDPruner: a conditional DPP that keeps diverse tokens weighted by their relevance to the instruction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import FEATURES, TEXT_EMBEDDINGS, Deviation, PruningMethod, SelectionContext
from tokenprune.methods.batched import select_grouped


@dataclass
class CDPruner(PruningMethod):
    """Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs (CDPruner, 2025).

    Kernel similarity = cosine of the projected tokens; relevance = mean cosine between each projected token and the
    prompt's text embeddings (LLM input space, as third-party ports do: the official code uses a separate CLIP text
    tower, which LLaVA/Qwen checkpoints do not ship). ``quirks=True`` negates the relevance as the official code.
    Budget: ``ctx.k`` tokens per image/crop.
    """

    name = "cdpruner"
    paper = "CDPruner: Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs " \
            "(2025)"
    deviations = (
        Deviation(
            "Relevance from the projected tokens against the prompt's LLM input embeddings.",
            "The official code uses a separate CLIP text tower on the question, which LLaVA and Qwen checkpoints do "
            "not ship.",
        ),
        Deviation(
            "The min-max normalisation of the relevance runs per image or crop.",
            "The official code normalises over the whole batch of crops, so a crop's selection depends on the others.",
        ),
        Deviation(
            "A pick whose residual is at most 1e-12 stops updating the conditional kernel.",
            "The official update divides by that residual and produces NaN.",
        ),
    )
    needs = frozenset({FEATURES, TEXT_EMBEDDINGS})
    quirks: bool = True

    @staticmethod
    def relevance(ctx: SelectionContext, unit: torch.Tensor | None = None) -> torch.Tensor:
        """Raw relevance ``[N]``; ``unit``: the features' fp32 unit rows if already computed (shared with the
        kernel: one fp32 copy of the image instead of two)."""
        feats, text = ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS)
        return F.instruction_relevance(feats, text, unit=unit) if text.shape[0] else feats.new_ones(ctx.n).float()

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        unit = F.unit_rows(ctx.signal(FEATURES), 1e-12)
        return F.cdpruner(ctx.signal(FEATURES), self.relevance(ctx, unit), ctx.k, quirks=self.quirks, unit=unit)

    def select_many(self, contexts: list[SelectionContext]) -> list[torch.Tensor]:
        def grouped(group: list[SelectionContext]) -> torch.Tensor:
            unit = torch.stack([F.unit_rows(c.signal(FEATURES), 1e-12) for c in group])
            relevance = torch.stack([self.relevance(c, u) for c, u in zip(group, unit, strict=True)])
            return F.cdpruner(torch.stack([c.signal(FEATURES) for c in group]), relevance, group[0].k,
                              quirks=self.quirks, unit=unit)

        return select_grouped(contexts, self.select, grouped)
