"""FoPru: focal pruning by the attention the image tokens receive (or give) in the penultimate vision layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import ATTENTION_MAP, Deviation, PruningMethod, SelectionContext


@dataclass
class FoPru(PruningMethod):
    """FoPru: Focal Pruning for Efficient Large Vision-Language Models (Jiang et al., 2024).

    Score = column mean (attention received) of the head-mean patch-to-patch attention of the penultimate vision
    layer (the feature layer of LLaVA), or the row mean if its variance is larger. ``strategy="rank"`` keeps the
    top ``ctx.k`` tokens; ``"row"`` keeps the ``max(1, k // w)`` grid rows with the largest score sums (so a multiple
    of the grid width, not exactly ``k``). No official code exists; this follows the paper.
    """

    name = "fopru"
    paper = "FoPru: Focal Pruning for Efficient Large Vision-Language Models (2024)"
    deviations = (
        Deviation(
            "The paper's algorithm; `strategy=\"row\"` keeps the `max(1, k // w)` grid rows with the largest score "
            "sums.",
            "No official code was released; a whole-row budget is a multiple of the grid width.",
        ),
    )
    needs = frozenset({ATTENTION_MAP})
    no_cls_reason = (
        "FoPru is defined for CLIP-based LVLMs (square patch grid, patch-to-patch attention); it describes no "
        "aggregation over Qwen's 2x2 merge units (nor a SigLIP port); use 'hiprune' or 'holov' (attention received) "
        "instead"
    )
    strategy: str = "rank"

    def __post_init__(self) -> None:
        if self.strategy not in ("rank", "row"):
            raise ValueError(f"fopru: strategy must be 'rank' or 'row'; got {self.strategy!r}")

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return F.fopru(ctx.signal(ATTENTION_MAP), ctx.k, strategy=self.strategy, grid=ctx.grid)
