"""DART: keep a few pivot tokens and the visual tokens that duplicate them least, once, inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.budget import Keep, kept_count
from tokenprune.functional.dart import dart, dart_count
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan


@dataclass
class DART(DecoderMethod):
    """DART (Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More,
    EMNLP 2025).

    At layer ``k - 1`` (official K=2): pivots = the 4 visual and 4 text tokens (text = every token after the image)
    whose post-RoPE keys (heads concatenated) have the largest L1 norm; then, pivot by pivot, the ``TOPK`` visual
    tokens least cosine-similar to it in layer ``k - 1``'s output passed through the model's final norm. From layer
    ``k`` on only the image pivots and the picked tokens remain. Positions KEEP (official). No attention weights.

    Budget: ``keep`` (ratio or count) gives the nominal budget M (official ``max_num_trunction``, e.g. 128 =
    ``keep=128`` or ``keep=0.222`` of 576); ``TOPK = M // 8`` and the image really keeps ``4 + 8 * TOPK`` tokens
    (128 -> 132, 192 -> 196, 64 -> 68), as the official code does. ``pivot_order="official"`` visits the pivots in
    the official code's order (a Python ``set`` of their prompt positions); ``"image-first"`` is the sorted loop.
    """

    name = "dart"
    paper = "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More (DART, " \
        "EMNLP 2025)"
    deviations = (
        Deviation(
            "On 1-D RoPE families (LLaVA, InternVL, Gemma 3) key norms use the unpadded prompt's positions.",
            "So a left-padded `forward` without `position_ids` selects what the row alone would; `generate` is "
            "unaffected.",
        ),
        Deviation(
            "GQA keys are not repeated over the query heads before the L1 norm.",
            "Repeating whole heads scales every norm alike: same ranking, less memory.",
        ),
        Deviation(
            "With fewer text tokens than text pivots, further rounds over the pivots make the missing picks.",
            "The count stays exactly `4 + 8 * TOPK`; the official code has no rule for a prompt that short.",
        ),
    )
    layer_option = "k"
    k: int = 2  # first pruned layer K (official 2)
    image_pivots: int = 4
    text_pivots: int = 4
    pivot_order: str = "official"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"dart: k (first pruned layer) must be an int >= 1; got {self.k!r}")
        if self.image_pivots < 1 or self.text_pivots < 0:
            raise ValueError(f"dart: need image_pivots >= 1 and text_pivots >= 0; got {self.image_pivots}, "
                             f"{self.text_pivots}")
        if self.pivot_order not in ("official", "image-first"):
            raise ValueError(f"dart: pivot_order must be 'official' or 'image-first'; got {self.pivot_order!r}")

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return (StagePlan(layer=self.k, score_layer=self.k - 1),)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        return [dart_count(n, kept_count(keep, n), self.image_pivots, self.text_pivots)]

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        keys = row.keys()  # [H_kv, N, d_h]
        norms = keys.float().abs().sum(dim=(0, 2))  # L1 over all heads (GQA repetition scales every token alike)
        states, text = row.normed_hidden(), row.text_after()
        out = []
        for slots, k in images:
            per_pivot = self._per_pivot(k, slots.numel())
            out.append(dart(norms, states, slots, text, k, per_pivot, self.image_pivots, self.text_pivots,
                            row.token_index, self.pivot_order))
        return out

    def _per_pivot(self, k: int, n: int) -> int:
        """``TOPK`` back from a count ``k = image_pivots + pivots * TOPK``."""
        return max(0, k - min(self.image_pivots, n)) // (self.image_pivots + self.text_pivots)
