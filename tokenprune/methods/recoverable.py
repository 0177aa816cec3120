"""Recoverable Compression: keep visual and text-relevant outliers, recover the rest into a few cluster tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import (
    CLS_ATTENTION_WIDE,
    FEATURES,
    TEXT_EMBEDDINGS,
    VISION_HIDDEN,
    VISION_KEYS,
    Deviation,
    PruningMethod,
    Selection,
    SelectionContext,
    SignalRequest,
)


@dataclass
class Recoverable(PruningMethod):
    """Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information (AAAI 2025).

    Signals as the official LLaVA-1.5 code: the [CLS] row of the LAST vision layer computed as one full-width head,
    that layer's keys (all heads concatenated), and the feature-layer states (merged pre-projector, then projected).
    Image-text similarity: cosine between each projected token and the mean of the prompt's text embeddings, scaled
    by ``768 ** -0.5`` as the official CLIP-space score (the official code runs a separate CLIP text tower). The
    number of kept tokens is data-dependent (LOF outlier fractions): ``keep`` only matters as ``k >= n`` (keep all).
    ``quirks=True`` (default) reproduces the official centre count ``int(feature_width * r)`` and its key gather by
    rest-list position (see :func:`tokenprune.functional.recoverable`); ``quirks=False`` is the clean algorithm.
    """

    name = "recoverable"
    paper = "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information " \
            "(AAAI 2025)"
    needs = frozenset({CLS_ATTENTION_WIDE, VISION_KEYS, VISION_HIDDEN, FEATURES, TEXT_EMBEDDINGS})
    no_cls_reason = (
        "Recoverable Compression's visual filter is the [CLS] attention row and the paper gives no substitute; use "
        "'cdpruner' or 'mmtok' (text-guided, no [CLS] needed) instead"
    )
    fixed_budget = False
    deviations = (
        Deviation(
            "Image-text similarity: cosine between each projected token and the mean of the prompt's text "
            "embeddings, at the official `768 ** -0.5` scale.",
            "The official code runs a separate CLIP text tower on the question's first line, which LLaVA and Qwen "
            "checkpoints do not ship.",
        ),
        Deviation(
            "The local outlier factor is computed exactly in fp64 (brute force, neighbour ties to the lowest index).",
            "The official code calls scikit-learn's `LocalOutlierFactor`; same definition, no extra dependency.",
        ),
        Deviation(
            "An image always keeps at least one token.",
            "With no outlier found the official code keeps none of the image's own tokens.",
        ),
        Deviation(
            "The attention-weighted sum of the non-centre tokens is not appended when there are none.",
            "The official code then appends a zero row, a token that carries nothing.",
        ),
    )
    neighbors: int = 20
    rest_neighbors: int = 10
    cluster_size: int = 32
    text_weight: float = 50.0
    quirks: bool = True

    def requests(self, cls_token: bool = True) -> tuple[SignalRequest, ...]:
        self.check_family(cls_token)
        return (SignalRequest(CLS_ATTENTION_WIDE, -1), SignalRequest(VISION_KEYS, -1), SignalRequest(VISION_HIDDEN),
                SignalRequest(FEATURES), SignalRequest(TEXT_EMBEDDINGS))

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        if ctx.k >= ctx.n:
            return torch.arange(ctx.n)
        feats, text = ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS)
        sim = F.instruction_relevance(feats, text.float().mean(dim=0, keepdim=True)) * 768**-0.5
        keys = ctx.signal(VISION_KEYS, -1).transpose(0, 1).reshape(ctx.n, -1)  # [H, N, d_h] -> [N, H * d_h]
        main, merged = F.recoverable(
            ctx.signal(CLS_ATTENTION_WIDE, -1), sim, ctx.signal(VISION_HIDDEN), keys, neighbors=self.neighbors,
            rest_neighbors=self.rest_neighbors, cluster_size=self.cluster_size, text_weight=self.text_weight,
            quirks=self.quirks,
        )
        return Selection(main, merged, space=VISION_HIDDEN)
