"""Random and uniform baselines: content-blind controls."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.methods.base import PruningMethod, SelectionContext


@dataclass
class RandomPrune(PruningMethod):
    """Random pruning, the control of every pruning paper (e.g. UniPruneBench, 2025; LightCompress RandomPrune).

    The u-th selection unit (crop or frame; 0 for a whole image) of the i-th image of a prompt draws from
    ``seed + 1000 * i + u``, so a prompt is pruned the same way alone or in a batch.
    """

    name = "random"
    paper = "Random token selection baseline"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"random: seed must be an int; got {self.seed!r}")

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1000 * ctx.index_in_row + ctx.unit_index)
        return F.random(ctx.n, ctx.k, generator=generator)


@dataclass
class UniformPrune(PruningMethod):
    """Uniform spatial sampling: ``k`` patches spread evenly over the image's patch grid (pooling-style control)."""

    name = "uniform"
    paper = "Uniform spatial sampling baseline"

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return F.uniform(ctx.grid, ctx.k, n=ctx.n)
