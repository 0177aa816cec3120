"""CoreMatching: core tokens matched with the FFN's core neurons, and the decode computed on those neurons only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune import functional as F
from tokenprune.budget import Keep, kept_count
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan


@dataclass
class CoreMatching(DecoderMethod):
    """CoreMatching (Wang et al., CoreMatching: A Co-adaptive Sparse Inference Framework with Token and Neuron
    Pruning for Comprehensive Acceleration of Vision-Language Models, ICML 2025; official code
    github.com/wangqinsi1/2025-ICML-CoreMatching).

    Token sparsity: in the FFN of layer ``layer - 1`` each row's core neurons are the ``neuron_keep`` share of its
    token-wise core neurons (top ``rho`` of each token's positive activations) that are core for the most tokens;
    an image's core tokens are those activating the most core neurons, above the elbow ("maximum geometric
    distance") of the sorted matches; only they enter layer ``layer`` and the later ones. Positions KEEP.
    Neuron sparsity: every layer's core neurons are computed the same way at the prefill (dense FFN) and the decode
    computes each layer's FFN on them only (``patches/sparse_ffn.py``); ``neuron_keep=1.0`` keeps the FFN dense,
    and so does a prefill that pruned no token (``keep=1.0`` is the unpruned model, whatever ``neuron_keep``).

    Budget: the core-token count is adaptive (data-dependent); ``keep`` caps it per image (the largest matches stay)
    and ``adaptive=False`` keeps exactly ``keep``'s count.
    """

    name = "corematching"
    paper = ("CoreMatching: A Co-adaptive Sparse Inference Framework with Token and Neuron Pruning for Comprehensive "
             "Acceleration of Vision-Language Models (ICML 2025)")
    exact_counts = False
    layer_option = "layer"
    deviations = (
        Deviation(
            "One selection, in the FFN of layer `layer - 1` (the paper's procedure); the tokens left out are removed "
            "from layer `layer` on.",
            "The released code instead re-selects in each of layers 5-18 by the co-activation of the image tokens "
            "with one fixed text token (the fifth from the end) and zeroes the dropped tokens' keys and values in "
            "that layer's cache (they stay in the sequence and still take softmax mass).",
        ),
        Deviation(
            "`keep` caps the adaptive core-token count per image; `adaptive=False` keeps exactly that many.",
            "The paper's count is adaptive only; the cap makes `keep=1.0` the unpruned model and budgets comparable.",
        ),
        Deviation(
            "The decode gathers each layer's core-neuron weights at every step instead of keeping a reduced copy.",
            "Keeps the model's weights untouched and no extra memory; the FFN MACs drop as in the paper, weight "
            "memory does not.",
        ),
        Deviation(
            "Shares round up (ceil(rho x positive), ceil(beta x union)); a neuron is activated when its activation "
            "is > 0 (the released code's test); the budget is per image; when no match lies above the elbow (a "
            "straight or flat curve) the tokens at the elbow's value stay.",
            "The paper defines the shares as percentiles without a rounding rule; the released code would keep no "
            "image token at all on such a curve.",
        ),
    )
    layer: int = 2              # first layer that sees only the core tokens (matched in layer `layer - 1`'s FFN)
    rho: float = 0.2            # token-wise core share of a token's positive activations (paper: 0.2)
    neuron_keep: float = 0.4    # beta: share of the token-wise core neurons kept as core neurons (paper: 0.4)
    adaptive: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"corematching: layer (first pruned layer) must be an int >= 1; got {self.layer!r}")
        for option in ("rho", "neuron_keep"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"corematching: {option} must be a share in (0, 1]; got {value!r}")

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return (StagePlan(layer=self.layer, score_layer=self.layer - 1),)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        return [kept_count(keep, n)]

    def sparse_ffn(self) -> bool:
        return True

    def ffn_core(self, layer: int, act: torch.Tensor) -> torch.Tensor | None:
        if self.neuron_keep >= 1.0:
            return None
        return F.core_neurons(act, self.rho, self.neuron_keep)

    def ffn_signal(self, layer: int, act: torch.Tensor, valid: torch.Tensor,
                   core: torch.Tensor | None) -> torch.Tensor | None:
        if layer != self.layer - 1:
            return None
        if core is None:
            core = F.core_neurons(act[valid], self.rho, self.neuron_keep)
        return F.core_match(act, core)

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        match = row.accumulated  # [N] core neurons each slot activates (patches/sparse_ffn.py)
        return [F.corematching(match[slots], k, self.adaptive) for slots, k in images]
