"""FastV: prune the visual tokens that the last prompt token ignores, once, inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.budget import Keep, kept_count
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan


@dataclass
class FastV(DecoderMethod):
    """FastV (Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024).

    Score: attention of the last prompt token to each visual token in layer ``k - 1``, softmax over ALL keys per
    head, then the head mean (official code; the paper's all-query mean is not implemented). Layers ``0..k-1`` see
    every token; from layer ``k`` on only the top tokens remain. Positions KEEP (original ids, official HF port).

    Budget: ``keep`` is the share (or int count) of each image's visual tokens kept FROM layer ``k`` on (the
    paper's ``1 - R``; R=50% is ``keep=0.5``). "FastV at 192 tokens" in most tables means 192 kept after layer K,
    not a layer average: LLaVA-1.5-7B, ``k=2``, ``keep=192`` gives 576 x 2 layers + 192 x 30 layers.
    """

    name = "fastv"
    paper = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, ECCV 2024)"
    deviations = (
        Deviation(
            "The budget is per image: several images in a prompt each keep their share.",
            "The official code pools every visual token of the prompt (batch 1).",
        ),
        Deviation(
            "The paper text's variant (mean over all query rows) is not implemented.",
            "The official code scores with the last prompt token's row, as here.",
        ),
    )
    layer_option = "k"
    k: int = 2  # first pruned layer K (paper: 2; HF demo: 3)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"fastv: k (first pruned layer) must be an int >= 1; got {self.k!r}")

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return (StagePlan(layer=self.k, score_layer=self.k - 1),)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        return [kept_count(keep, n)]

    def scores(self, stage: int, row: RowSignals) -> torch.Tensor:
        return row.attention().mean(dim=(0, 1))  # [N]: last-row attention, head mean

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        attn = row.attention()[:, 0]  # [H, N]
        return [F.fastv(attn[:, slots], k) for slots, k in images]
