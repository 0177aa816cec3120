"""VisionDrop's LLM stages (a decoder-stage method) and the full progressive VisionDrop (ViT stage + LLM stages)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from tokenprune.budget import Keep
from tokenprune.functional.visiondrop_llm import (
    LLM_STAGES,
    VISION_TOKENS,
    visiondrop_contextual,
    visiondrop_fraction,
    visiondrop_merge_groups,
    visiondrop_stage_counts,
)
from tokenprune.methods.base import Deviation, PruningMethod
from tokenprune.methods.decoder_base import DecoderMethod, Recycled, RowSignals, StagePlan
from tokenprune.methods.two_stage import TwoStageMethod
from tokenprune.methods.visionzip import VisionDrop

PAPER = "VisionDrop: Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (2025)"


@dataclass
class VisionDropLLM(DecoderMethod):
    """VisionDrop's LLM stages (VisionDrop: Rethinking Visual Token Reduction in LVLMs under Cross-modal
    Misalignment, 2025): visual-only, progressive, dominant + contextual merging inside the LLM.

    At each boundary ``b`` (``None``: four equal stages, ``round(L s / 4)``, the paper's 8, 16, 24 of 32) layer
    ``b``'s own q/k on its input score each visual token by the attention it receives from the image's visual
    queries (softmax over ALL keys, causal, not renormalised; mean over heads and queries). The top tokens stay
    (dominant); the rest are merged into contextual tokens by head-mean post-RoPE key similarity (VisionZip's rule:
    ``target + mean(assigned)``), appended after the dominant ones. Positions REINDEX (Qwen: KEEP; a contextual
    token at its target's position). Later stages treat contextual tokens as visual tokens.

    Budget: ``keep`` is the share (or count) of the visual tokens ENTERING the LLM that survive the last stage,
    contextual ones included; the stages follow the paper's ``48 -> 35 -> 26 -> 19`` shape
    (``keep=19/48`` on 48 tokens gives 30+5, 22+4, 16+3). Use ``visiondropfull`` for the paper's one-budget method.
    """

    name = "visiondropllm"
    paper = PAPER
    deviations = (
        Deviation(
            "Budgets other than the paper's 32 tokens follow the same schedule shape (stage totals `n * f ** e_s`, "
            "dominant : contextual as the paper's pairs).",
            "The paper gives one schedule (48 -> 35 -> 26 -> 19 on LLaVA-1.5).",
        ),
        Deviation(
            "GQA models (Qwen) merge by head-mean keys over the KV heads.",
            "The official code is LLaVA-1.5 only (no GQA).",
        ),
    )
    positions = "reindex"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
            if len(self.layers) != len(LLM_STAGES) or any(
                    b <= a for a, b in zip(self.layers[:-1], self.layers[1:], strict=True)):
                raise ValueError(f"{self.name}: layers must be {len(LLM_STAGES)} strictly increasing first-pruned "
                                 f"layers; got {self.layers}")

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        bounds = self.layers if self.layers is not None else tuple(round(n_layers * s / 4) for s in (1, 2, 3))
        return tuple(StagePlan(layer=b, score_layer=b) for b in bounds)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        fraction = float(Fraction(str(keep))) if isinstance(keep, float) else min(1.0, keep / n)
        return [d for d, _ in visiondrop_stage_counts(n, fraction)]

    @staticmethod
    def _received(row: RowSignals, slots: torch.Tensor) -> torch.Tensor:
        """``[Q, n]`` head-mean attention of the visual queries ``slots`` to the same visual keys."""
        return row.attention(slots).mean(dim=0)[:, slots]

    def select_stage(
        self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]
    ) -> list[torch.Tensor | Recycled]:
        keys = row.keys().float().mean(dim=0)  # [N, d_h] head-mean keys
        out: list[torch.Tensor | Recycled] = []
        for slots, k in images:
            contextual = max(0, min(visiondrop_contextual(stage, k), slots.numel() - k))
            attention = self._received(row, slots)
            kept, targets, groups = visiondrop_merge_groups(attention, row.hidden[slots], keys[slots], k, contextual)
            if not groups:
                out.append(kept)
                continue
            triples = [(k + c, members, weights) for c, (members, weights) in enumerate(groups)]
            out.append(Recycled.merge_groups(kept, targets, triples, slots.numel()))
        return out


@dataclass
class VisionDropFull(TwoStageMethod):
    """VisionDrop (VisionDrop: Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment, 2025), the
    full progressive method: the ViT stage (``visiondrop``: VisionZip's dominant + contextual rule, 42 + 6 of 48)
    then the LLM stages (``visiondropllm``) at layers 8, 16, 24.

    Budget: the paper's LAYER AVERAGE. ``keep=32/576`` (or ``keep=32``, tokens) on LLaVA-1.5 gives 48 tokens after
    the ViT (1.5x the average, the paper's rule) and 35, 26, 19 after the LLM stages: (48 + 35 + 26 + 19) x 8 / 32
    = 32. A ratio above 2/3 keeps every token in the ViT stage and solves the LLM fraction for the average;
    ``keep=1.0`` prunes nothing. An int ``keep`` keeps ``round(1.5 keep)`` after the ViT and 19/48 of them at the
    end.
    """

    name = "visiondropfull"
    paper = PAPER
    layers: tuple[int, ...] | None = None

    def stages(self) -> tuple[PruningMethod, PruningMethod]:
        return VisionDrop(), VisionDropLLM(layers=self.layers)

    def stage_keeps(self, keep: Keep) -> tuple[Keep, Keep]:
        if isinstance(keep, float):
            vision, fraction = visiondrop_fraction(float(Fraction(str(keep))))
            return vision, fraction
        return max(1, int(1.5 * keep + 0.5)), sum(LLM_STAGES[-1]) / VISION_TOKENS
