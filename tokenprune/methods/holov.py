"""HoloV: spread the budget over contiguous chunks of the image, in proportion to their holistic scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import (
    ATTENTION_RECEIVED,
    CLS_ATTENTION,
    FEATURES,
    Deviation,
    PruningMethod,
    Selection,
    SelectionContext,
)


@dataclass
class HoloV(PruningMethod):
    """HoloV (Don't Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention, NeurIPS
    2025).

    Token attention = head-mean [CLS] row of the feature layer (LLaVA) or, without [CLS] (Qwen2.5-VL, as the
    official port), attention received in the last ViT block; similarity variance over the projected tokens.
    ``chunks=None`` is the official count: 16 with [CLS], ``max(1, int(1024/576 * N / k))`` without. Budget:
    ``ctx.k`` tokens; with ``quirks`` (official) the zero rows the official code appends when chunks cannot spend
    their share are placed after the kept tokens so the image still has ``k`` tokens; ``quirks=False`` keeps fewer.
    """

    name = "holov"
    paper = "HoloV: Don't Just Chase \"Highlighted Tokens\" in MLLMs: Revisiting Visual Holistic Context Retention " \
            "(NeurIPS 2025)"
    deviations = (
        Deviation(
            "Kept tokens are in raster order.",
            "The official code orders them by chunk, then by descending attention inside a chunk; raster order keeps "
            "the image's layout for the LLM, like every other method here.",
        ),
        Deviation(
            "Qwen2.5-VL: the signal is attention received on the image-pad span, un-permuted from window order.",
            "The official Qwen port reads it in window order and one token off (`<|vision_start|>`); those are not "
            "reproduced.",
        ),
    )
    needs = frozenset({CLS_ATTENTION, FEATURES})
    needs_without_cls = frozenset({ATTENTION_RECEIVED, FEATURES})
    chunks: int | None = None
    alpha_var: float = 0.09
    quirks: bool = True

    def __post_init__(self) -> None:
        if self.chunks is not None and self.chunks < 1:
            raise ValueError(f"holov: chunks must be >= 1 or None (official default); got {self.chunks}")

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        feats = ctx.signal(FEATURES)
        attn = ctx.signal(CLS_ATTENTION).float().mean(dim=0) if ctx.cls_token else ctx.signal(ATTENTION_RECEIVED)
        chunks = self.chunks or (16 if ctx.cls_token else F.holov_chunk_count(ctx.n, ctx.k))
        kept, n_pad = F.holov(attn, feats, ctx.k, chunks=chunks, alpha_var=self.alpha_var)
        if not self.quirks or n_pad == 0:
            return kept
        return Selection(kept, feats.new_zeros((n_pad, feats.shape[1])), space=FEATURES)
