"""FlowCut: prune inside the vision encoder, layer by layer, by cumulative information flow."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.functional import flowcut_step
from tokenprune.methods.base import CLS_ATTENTION, Deviation, PruningMethod, SelectionContext, SignalRequest


@dataclass
class FlowCut(PruningMethod):
    """FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (2025).

    Prunes the OUTPUT tokens of vision layers 0..select-1 (a real encoder speed-up): per layer a score from the
    [CLS] attention, the [CLS]-value similarity and the value norms, accumulated across layers, and an
    entropy-adaptive number of tokens removed at every second layer (:meth:`encoder_step` =
    :func:`tokenprune.functional.flowcut_step`, tested against the paper's worked example). Budget: ``ctx.k``
    patches after the feature layer (target ``k + 1`` with [CLS]). The adapter runs the encoder's layer loop
    (``patches/clip_encoder_loop.py``); LLaVA-1.5 only.
    """

    name = "flowcut"
    paper = "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (2025)"
    deviations = (
        Deviation(
            "`0 log 0 = 0` in the attention entropy.",
            "The official CLIP code yields NaN there.",
        ),
        Deviation(
            "Prune counts are per image; images run through the encoder one at a time.",
            "The official code takes the maximum over the batch, so a prompt would keep different tokens alone and in "
            "a batch.",
        ),
        Deviation(
            "The [CLS] row and the values are recomputed in fp32 from `q_proj`/`k_proj`/`v_proj`.",
            "The official code reads eager attention maps of every layer; recomputing keeps the tower's sdpa or flash "
            "kernel.",
        ),
        Deviation(
            "Only `vision_feature_select_strategy=\"default\"`.",
            "The official code prunes the [CLS]-first layout that strategy produces.",
        ),
    )
    stage = "vision-encoder"
    needs = frozenset({CLS_ATTENTION})  # per encoder layer, recomputed by the encoder loop (not by the probe)
    no_cls_reason = (
        "its Qwen2-VL variant is a different algorithm (mean-query scores without the semantic term, a ViT target "
        "of 8K patches before the 2x2 merger, then LLM-stage re-scoring at decoder layer 1) that is not "
        "implemented; use 'divprune' or 'hiprune' instead"
    )

    def requests(self, cls_token: bool = True) -> tuple[SignalRequest, ...]:
        self.signals_needed(cls_token)  # family check only: the encoder loop computes the per-layer rows itself
        return ()

    def encoder_step(
        self, cls_attn: torch.Tensor, semantic: torch.Tensor, value_l1: torch.Tensor,
        cumulative: torch.Tensor | None, length: int, target: int, remaining: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One vision layer: ``(kept patches ascending, cumulative scores of all current patches)``."""
        return flowcut_step(cls_attn, semantic, value_l1, cumulative, length, target, remaining)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.k >= ctx.n:  # nothing to prune: the adapters run the stock tower (bit-identical)
            return torch.arange(ctx.n)
        raise NotImplementedError(
            "FlowCut selects inside the vision encoder's layer loop (patches/clip_encoder_loop.py), not after it"
        )
