"""FasterVLM: keep the tokens the vision encoder's [CLS] attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import CLS_ATTENTION, PruningMethod, SelectionContext


@dataclass
class FasterVLM(PruningMethod):
    """[CLS] Attention is All You Need for Training-Free Visual Token Pruning (Zhang et al., 2024).

    Top-k of the head-averaged [CLS] attention row of the vision feature layer (the layer whose hidden states
    LLaVA feeds the projector, ``vision_feature_layer=-2``), applied to the projected tokens in original order.
    Needs a vision tower with a [CLS] token (CLIP); no hyper-parameters besides the budget.
    """

    name = "fastervlm"
    paper = "FasterVLM: [CLS] Attention is All You Need for Training-Free Visual Token Pruning (2024)"
    needs = frozenset({CLS_ATTENTION})
    no_cls_reason = (
        "FasterVLM ranks tokens by the [CLS] attention row and its paper gives no substitute; use 'hiprune' or "
        "'holov' (attention received) or 'divprune' (features only) instead"
    )

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return F.fastervlm(ctx.signal(CLS_ATTENTION), ctx.k)
