"""VisionZip and VisionDrop's vision stage: dominant tokens plus contextual tokens merged from the rest."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import (
    ATTENTION_RECEIVED,
    CLS_ATTENTION,
    CLS_HIDDEN,
    FEATURES,
    VISION_HIDDEN,
    VISION_KEYS,
    Deviation,
    PruningMethod,
    Selection,
    SelectionContext,
)


@dataclass
class VisionZip(PruningMethod):
    """VisionZip: Longer is Better but Not Necessary in Vision Language Models (Yang et al., CVPR 2025).

    Dominant tokens = [CLS] plus the patches with the highest [CLS] attention (heads summed) of the feature layer;
    the other patches are merged into contextual tokens by key similarity (targets uniform in the remaining list,
    ``target + mean(assigned)``), in the pre-projector space, then projected. Budget: ``ctx.k`` tokens in total,
    split as the paper's ``dominant + contextual`` (64 = 54 + 10; 128 -> 108 + 20): ``contextual =
    round_half_up(k * contextual / (dominant + contextual))``, the rest dominant, [CLS] included when ``keep_cls``
    (official); span layout as official: [CLS], dominant patches (raster order), contextual tokens. A budget
    covering every patch keeps the image unchanged (``keep=1.0`` is bit-identical), unless ``split_full_budget``
    asks for the official split there too.
    """

    name = "visionzip"
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"
    needs = frozenset({CLS_ATTENTION, CLS_HIDDEN, VISION_HIDDEN, VISION_KEYS})
    no_cls_reason = (
        "VisionZip picks dominant tokens by [CLS] attention and keeps the [CLS] token; its official code has no "
        "variant without [CLS]; use 'visiondrop' (same merging, attention-received scores there) or 'hiprune'"
    )
    deviations = (
        Deviation(
            "A budget other than the paper's `dominant + contextual` splits proportionally: `contextual = "
            "round_half_up(k * contextual / (dominant + contextual))`, the rest dominant ([CLS] included).",
            "The papers give fixed pairs (VisionZip 54 + 10 for 64 and 108 + 20 for 128, VisionDrop 42 + 6 for 48); "
            "one rule serves every budget and reproduces them.",
        ),
        Deviation(
            "When fewer tokens remain after the dominant ones than contextual tokens are asked for, one contextual "
            "token per remaining token is made.",
            "The official code fails there (a shape mismatch); at `dominant + contextual == N` it splits, and so do "
            "we (30 + 6 of 36).",
        ),
        Deviation(
            "A budget that covers every patch (`keep=1.0`, or `k >= N`) keeps the image as it is: no [CLS], "
            "nothing merged.",
            "`keep=1.0` is bit-identical to the unpruned model for every method. The official code still splits a "
            "full budget (`dominant=30, contextual=6` of 36 patches: [CLS] + 29 patches + 6 contextual tokens "
            "merged from the other 7).",
            "split_full_budget=True",
        ),
    )
    dominant: int = 54
    contextual: int = 10
    keep_cls: bool = True
    split_full_budget: bool = False

    def __post_init__(self) -> None:
        if self.dominant < 1 or self.contextual < 0:
            raise ValueError(f"{self.name}: need dominant >= 1 and contextual >= 0; got {self.dominant}, "
                             f"{self.contextual}")

    def split(self, k: int) -> tuple[int, int]:
        """``(dominant, contextual)`` counts for a total budget ``k`` (dominant includes [CLS] if kept)."""
        contextual = math.floor(k * self.contextual / (self.dominant + self.contextual) + 0.5)
        return k - contextual, contextual

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        if ctx.k >= ctx.n and not self.split_full_budget:
            return torch.arange(ctx.n)
        dominant, contextual = self.split(min(ctx.k, ctx.n))
        with_cls = self.keep_cls and ctx.cls_token
        if not ctx.cls_token:  # VisionDrop's no-[CLS] path: attention received, merged in the LLM input space
            scores, hidden, keys = ctx.signal(ATTENTION_RECEIVED), ctx.signal(FEATURES), ctx.signal(FEATURES)
        else:
            scores, hidden = ctx.signal(CLS_ATTENTION), ctx.signal(VISION_HIDDEN)
            keys = ctx.signal(VISION_KEYS).float().mean(dim=0)  # [N, d_h] head-mean keys
        kept, merged, assign = F.visionzip_with_assign(scores, hidden, keys, dominant - int(with_cls), contextual)
        if with_cls:
            merged = torch.cat([ctx.signal(CLS_HIDDEN).float()[None], merged])
            assign = torch.where(assign >= 0, assign + 1, assign)
        space = VISION_HIDDEN if ctx.cls_token else FEATURES
        return Selection(kept, merged, assign, lead=int(with_cls), space=space)


@dataclass
class VisionDrop(VisionZip):
    """VisionDrop (Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment, 2025): vision stage.

    The official vision stage is VisionZip's code (see :class:`VisionZip`) with the paper's split 42 + 6 (48 tokens
    before its LLM stages; dominant includes [CLS]). On towers without [CLS] (Qwen2-VL/2.5-VL) the paper scores
    tokens by mean attention received instead; there the merge metric and values are the projected tokens.
    The LLM stages come with the decoder-stage methods.
    """

    name = "visiondrop"
    paper = "VisionDrop: Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (2025)"
    needs_without_cls = frozenset({ATTENTION_RECEIVED, FEATURES})
    no_cls_reason = ""
    deviations = VisionZip.deviations + (
        Deviation(
            "Qwen2-VL/2.5-VL and Gemma 3 (no [CLS]): tokens are scored by the attention they receive and the merge "
            "uses the projected tokens as keys and values.",
            "The official code is LLaVA-1.5 only; the paper scores by attention received, and the Qwen and Gemma 3 "
            "adapters compute no ViT keys.",
        ),
    )
    dominant: int = 42
    contextual: int = 6
