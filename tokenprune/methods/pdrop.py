"""PyramidDrop: drop visual tokens in stages inside the LLM, scored by the last instruction token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.budget import Keep
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan


@dataclass
class PyramidDrop(DecoderMethod):
    """PyramidDrop (Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction, CVPR 2025).

    At each boundary ``b`` (first pruned layer) layer ``b``'s own projections score the visual tokens from its input
    (the output of layer ``b - 1``): attention of the last prompt token, softmax over all keys, head mean. Stage
    ``s`` keeps ``int(n * ratio**s)`` of the ORIGINAL ``n`` visual tokens. Positions REINDEX (official: re-padded,
    0..N'-1; decode positions shifted by the tokens removed before each layer); Qwen: KEEP (M-RoPE).

    ``layers``: boundaries; ``None`` = the paper's S = 4 equal stages, ``round(L*s/4)`` (the official ``(8, 16, 24)``
    of 32 layers; a rule relative to the depth, so it is not an error on other depths). Budget: ``ratio`` is lambda
    when given (official 0.5); with ``ratio=None`` the ``keep`` budget is a LAYER AVERAGE (PDrop's "192 tokens"
    convention) and lambda is solved for it: ``keep=0.46875`` (270/576) gives lambda=0.5 on
    32 layers; an int ``keep`` is an average token count.
    """

    name = "pdrop"
    paper = "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction " \
        "(CVPR 2025)"
    deviations = (
        Deviation(
            "Stage counts are `int(n * lambda ** s)` but at least one token.",
            "The official count can reach 0 for small images, which would leave an image with no token at all.",
        ),
        Deviation(
            "Batches of any size and padding side; budgets per image.",
            "The official code re-pads right only and pools the prompt's visual tokens.",
        ),
        Deviation(
            "Qwen2-VL/2.5-VL keep the original positions of the kept tokens.",
            "Re-indexing is undefined for M-RoPE; LLaVA re-indexes as officially.",
        ),
    )
    positions = "reindex"
    layers: tuple[int, ...] | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
            if not self.layers or any(b <= a for a, b in zip(self.layers[:-1], self.layers[1:], strict=True)):
                raise ValueError(f"pdrop: layers must be strictly increasing first-pruned layers; got {self.layers}")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"pdrop: ratio (lambda) must lie in (0, 1]; got {self.ratio!r}")

    def boundaries(self, n_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        return tuple(round(n_layers * s / 4) for s in (1, 2, 3))

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return tuple(StagePlan(layer=b, score_layer=b) for b in self.boundaries(n_layers))

    def lambda_for(self, n: int, keep: Keep, n_layers: int) -> float:
        if self.ratio is not None:
            return self.ratio
        average = min(1.0, keep / n) if isinstance(keep, int) else keep
        return F.pdrop_ratio(average, self.boundaries(n_layers), n_layers)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        stages = len(self.boundaries(n_layers))
        return F.pdrop_counts(n, self.lambda_for(n, keep, n_layers), stages)

    def scores(self, stage: int, row: RowSignals) -> torch.Tensor:
        return row.attention().mean(dim=(0, 1))

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        attn = row.attention()[:, 0]  # [H, N]
        return [F.fastv(attn[:, slots], k) for slots, k in images]  # same rule: top-k of the head-mean row
