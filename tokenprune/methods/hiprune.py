"""HiPrune: anchors from a middle vision layer, buffers around them, registers from the deep layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import ATTENTION_RECEIVED, Deviation, PruningMethod, SelectionContext, SignalRequest


@dataclass
class HiPrune(PruningMethod):
    """HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders (2025).

    Scores are the attention each token RECEIVES (mean over heads and queries) in an "object" layer and in the
    feature layer. Budget: ``ctx.k`` tokens in total, of which ``round(k * alpha / 5)`` anchors (192 -> 4,
    64 -> 1); buffers = the anchors' grid neighbours; registers fill the rest. ``object_layer`` is 0-based; ``None``
    is the paper's default: 8 (layer 9 of 24, CLIP) on towers with [CLS], 15 (block 16 of 32) on Qwen2.5-VL, whose
    deep layer is the last block. ``quirks=True`` keeps the official row-wrap / clamping of neighbours.
    """

    name = "hiprune"
    paper = "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision Encoders (2025)"
    deviations = (
        Deviation(
            "Registers exclude the anchor and buffer tokens outright instead of subtracting 1 from their scores.",
            "Same picks whenever the official code picks `k` distinct tokens; never a duplicate index.",
        ),
        Deviation(
            "If anchors and buffers exceed `k`, the best `k` of them by object-layer score are kept.",
            "The official code fails on that budget.",
        ),
    )
    needs = frozenset({ATTENTION_RECEIVED})
    needs_without_cls = frozenset({ATTENTION_RECEIVED})
    alpha: float = 0.1
    object_layer: int | None = None
    quirks: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 5:
            raise ValueError(f"hiprune: alpha must lie in [0, 5] (anchors = round(k * alpha / 5)); got {self.alpha}")
        if self.object_layer is not None and not isinstance(self.object_layer, int):
            raise TypeError(f"hiprune: object_layer must be an int layer index or None; got {self.object_layer!r}")

    def layer(self, cls_token: bool = True) -> int:
        if self.object_layer is not None:
            return self.object_layer
        return 8 if cls_token else 15

    def requests(self, cls_token: bool = True) -> tuple[SignalRequest, ...]:
        self.check_family(cls_token)
        return SignalRequest(ATTENTION_RECEIVED, self.layer(cls_token)), SignalRequest(ATTENTION_RECEIVED)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        obj = ctx.signal(ATTENTION_RECEIVED, self.layer(ctx.cls_token))
        deep = ctx.signal(ATTENTION_RECEIVED)
        grid_w = ctx.grid[1] if ctx.grid is not None else ctx.n
        n_anchor = F.hiprune_anchor_count(ctx.k, self.alpha)
        return F.hiprune(obj, deep, grid_w, ctx.k, n_anchor, quirks=self.quirks)
