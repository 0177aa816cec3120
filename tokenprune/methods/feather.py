"""FEATHER: two pruning stages inside the LLM, scored by RoPE-free attention, with uniform grid sampling."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from tokenprune.budget import Keep
from tokenprune.functional.feather import feather, feather_counts, feather_uniform
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan


@dataclass
class FEATHER(DecoderMethod):
    """FEATHER (Endo et al., Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
    Acceleration, ICCV 2025).

    Two stages, first pruned layers 8 and 16 (``layers``; ``None`` = the paper's 8 and 16 on any depth, an error at
    enable time where they do not exist). At each
    the previous layer's q/k score the visual tokens: the last prompt token's attention WITHOUT RoPE, softmax over
    the image keys only, head mean. Stage 1 keeps the top ``int(rho * n)`` plus the uniform grid ``grid[::3, ::3]``;
    stage 2 keeps the top ``int(rho**2 * n_1)`` of the ``n_1`` tokens left (uniform ones are not protected).
    Positions KEEP.

    Budget: ``rho`` = ``keep`` (official ``fastv_ratio=0.7`` removed -> ``keep=0.3``; an int ``keep`` is
    ``rho * n``). LLaVA-1.5 (576 = 24 x 24, 64 uniform tokens): 576 x 8 layers, ~172..236 x 8, ~16..21 x 16.
    The kept counts depend on the overlap of top-k and grid: ``handle.last`` reports them.
    Grid coordinates: LLaVA-1.5 the 24 x 24 raster, Qwen the M-RoPE (h, w) positions; LLaVA-NeXT's packed layout
    has no single raster, every 9th token of the image is taken instead (a declared deviation, ``deviations``).
    """

    name = "feather"
    paper = "Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model Acceleration " \
        "(FEATHER, ICCV 2025)"
    deviations = (
        Deviation(
            "LLaVA-NeXT: the uniform set is every 9th token of the image.",
            "The packed layout has no single raster; the official code (Prismatic) has one square grid.",
        ),
        Deviation(
            "An image keeps at least one token at stage 2.",
            "The official `int(n1 * (rho * rho))` can reach 0, which would leave an image with no token at all.",
        ),
    )
    exact_counts = False
    layers: tuple[int, ...] | None = None
    stride: int = 3

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
            if len(self.layers) != 2 or self.layers[0] >= self.layers[1] or self.layers[0] < 1:
                raise ValueError(f"feather: layers must be two increasing first-pruned layers >= 1; got {self.layers}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"feather: stride (uniform grid step) must be an int >= 1; got {self.stride!r}")

    def boundaries(self, n_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        return (8, 16)

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return tuple(StagePlan(layer=b, score_layer=b - 1) for b in self.boundaries(n_layers))

    @staticmethod
    def rho(n: int, keep: Keep) -> float | Fraction:
        return keep if isinstance(keep, float) else Fraction(min(keep, n), n)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        """Stage 1: the top-k part (the uniform grid comes on top); stage 2: the count if stage 1 had kept exactly
        the top-k (the real one, :meth:`stage_count`, is ``int(rho**2 * n_1)`` of the ``n_1`` tokens stage 1 left)."""
        rho = self.rho(n, keep)
        if rho >= 1.0:
            return [n, n]
        first = feather_counts(n, rho)[0]
        return [first, feather_counts(first, rho)[1]]

    def stage_count(self, stage: int, n: int, current: int, keep: Keep, n_layers: int) -> int:
        rho = self.rho(n, keep)
        if stage == 0 or rho >= 1.0:
            return self.counts(n, keep, n_layers)[stage]
        return min(current, feather_counts(current, rho)[1])

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        out = []
        for slots, k in images:
            scores = row.attention_no_rope(slots).mean(dim=(0, 1))  # [n]: last token, no RoPE, image softmax
            if stage == 0:
                coords = row.coords[slots] if row.coords is not None else torch.full((slots.numel(), 2), -1)
                out.append(feather(scores, k, feather_uniform(coords, self.stride, row.image_local[slots])))
            else:
                out.append(feather(scores, k))
        return out
