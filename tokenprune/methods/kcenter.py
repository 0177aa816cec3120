"""ToDRE stage 1: a diverse subset by greedy k-center (or max-sum) selection from a [CLS]-chosen pivot."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import CLS_ATTENTION, FEATURES, Deviation, PruningMethod, SelectionContext, SignalRequest
from tokenprune.methods.batched import select_grouped


@dataclass
class KCenter(PruningMethod):
    """ToDRE stage 1 (ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance, 2025).

    Pivot = the patch with the highest [CLS] attention of the LAST vision layer (heads averaged); on towers without
    [CLS] a seeded random pivot, as the paper does. Then greedy diversity over the projected tokens in cosine
    distance: ``rule="kcenter"`` (paper v1) or ``"maxsum"`` (v2). Budget: ``ctx.k`` tokens. ToDRE's stage 2 (drop
    all visual tokens deep in the LLM) is a decoder-stage method.
    """

    name = "kcenter"
    paper = "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance (2025), stage 1"
    deviations = (
        Deviation(
            "The paper's algorithm: v1 greedy k-center by default, v2 max-sum with `rule=\"maxsum\"`.",
            "No official code was released.",
        ),
    )
    needs = frozenset({FEATURES, CLS_ATTENTION})
    needs_without_cls = frozenset({FEATURES})
    rule: str = "kcenter"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in ("kcenter", "maxsum"):
            raise ValueError(f"kcenter: rule must be 'kcenter' (ToDRE v1) or 'maxsum' (v2); got {self.rule!r}")

    def requests(self, cls_token: bool = True) -> tuple[SignalRequest, ...]:
        if not cls_token:
            return (SignalRequest(FEATURES),)
        return SignalRequest(FEATURES), SignalRequest(CLS_ATTENTION, -1)

    def pivot(self, ctx: SelectionContext) -> int:
        if ctx.cls_token:
            return int(torch.argmax(ctx.signal(CLS_ATTENTION, -1).float().mean(dim=0)))
        generator = torch.Generator().manual_seed(self.seed + ctx.index_in_row)
        return int(torch.randint(ctx.n, (1,), generator=generator))

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return F.kcenter(ctx.signal(FEATURES), ctx.k, self.pivot(ctx), rule=self.rule)

    def select_many(self, contexts: list[SelectionContext]) -> list[torch.Tensor]:
        return select_grouped(contexts, self.select, lambda group: F.kcenter(
            torch.stack([c.signal(FEATURES) for c in group]), group[0].k,
            torch.tensor([self.pivot(c) for c in group]), rule=self.rule))
