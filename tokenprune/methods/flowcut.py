"""FlowCut: prune inside the vision encoder, layer by layer, by cumulative information flow."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.methods.base import CLS_ATTENTION, PruningMethod, SelectionContext


@dataclass
class FlowCut(PruningMethod):
    """FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (2025).

    Prunes the OUTPUT tokens of vision layers 0..select-1 (a real encoder speed-up): per layer a score from the
    [CLS] attention, the [CLS]-value similarity and the value norms, accumulated across layers, and an
    entropy-adaptive number of tokens removed at every second layer (:func:`tokenprune.functional.flowcut_step`,
    tested against the paper's worked example). Budget: ``ctx.k`` patches after the feature layer (target ``k + 1``
    with [CLS]). Not runnable yet: the adapters do not run the encoder's layer loop with per-layer pruning.
    """

    name = "flowcut"
    paper = "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (2025)"
    stage = "vision-encoder"
    needs = frozenset({CLS_ATTENTION})
    unavailable = (
        "FlowCut prunes inside the vision encoder, layer by layer; the adapters do not yet run the encoder's layer "
        "loop with per-layer pruning (its selection rule is available as tokenprune.functional.flowcut_step). Use "
        "'fastervlm' or 'visionzip' ([CLS]-attention methods after the encoder) instead"
    )

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        raise NotImplementedError(self.unavailable)
