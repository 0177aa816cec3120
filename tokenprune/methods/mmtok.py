"""MMTok: choose the visual tokens that best cover the prompt's text and the image itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import FEATURES, TEXT_EMBEDDINGS, VISION_HIDDEN, Deviation, PruningMethod, SelectionContext


@dataclass
class MMTok(PruningMethod):
    """MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (2025).

    Greedy coverage of two item sets: the prompt's text embeddings (LLM input space) against the projected tokens,
    and the image's own tokens in the pre-projector space (LLaVA: feature-layer CLIP states; Qwen: last ViT block
    averaged per merge unit). ``tv_temp=None`` is the official per-family value: 0.02 (LLaVA), 0.01 (Qwen).
    Budget: ``ctx.k`` tokens per image/crop. Text = :data:`TEXT_EMBEDDINGS` (a declared deviation, ``deviations``).
    """

    name = "mmtok"
    paper = "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (2025)"
    deviations = (
        Deviation(
            "Text items are all prompt tokens after the image (template words and stop-words included).",
            "The official code keeps only the question's words minus a stop-word list, which needs its own tokenizer "
            "pipeline per model.",
        ),
        Deviation(
            "LLaVA-1.5: the letter-box padding patches are not excluded.",
            "The official exclusion depends on its own image preprocessing, not on what transformers' processor did.",
        ),
    )
    needs = frozenset({FEATURES, TEXT_EMBEDDINGS, VISION_HIDDEN})
    alpha: float = 0.5
    tv_temp: float | None = None
    vv_temp: float = 0.2

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.vv_temp <= 0 or (self.tv_temp is not None and self.tv_temp <= 0):
            raise ValueError(f"mmtok: need alpha >= 0 and positive temperatures; got {self.options()}")

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        tv_temp = self.tv_temp if self.tv_temp is not None else (0.02 if ctx.cls_token else 0.01)
        return F.mmtok(ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS), ctx.k, ctx.signal(VISION_HIDDEN),
                       alpha=self.alpha, tv_temp=tv_temp, vv_temp=self.vv_temp)
