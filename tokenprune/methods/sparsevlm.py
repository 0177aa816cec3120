"""SparseVLM and AdaptInfer: visual tokens rated by the text inside the LLM, in three stages (SparseVLM recycles)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch

from tokenprune import functional as F
from tokenprune.budget import Keep
from tokenprune.functional._ranking import top_k_indices
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, Recycled, RowSignals, StagePlan


def table_budget(keep: Keep, n: int) -> float:
    """The paper's budget (tokens of 576) that ``keep`` names: a ratio ``r`` is ``576 r`` (``keep=1/3`` is "192"),
    an int count ``c`` of this image's ``n`` tokens is ``576 c / n`` (``keep=192`` is "192" on LLaVA-1.5)."""
    ratio = Fraction(str(keep)) if isinstance(keep, float) else Fraction(min(keep, n), n)
    return float(ratio * F.TABLE_TOKENS)


@dataclass
class SparseVLM(DecoderMethod):
    """SparseVLM (Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
    Inference, ICML 2025), official code v1.5.

    Text raters: the text tokens after the image whose share of the visual tokens' attention over the text
    (``softmax`` over text of the input-embedding products, mean over visual tokens) is above the mean, chosen once
    on the LLM's input embeddings. At each sparsification layer ``l`` (official ``2, 6, 15``; the layer's own
    attention, so the first pruned layers are ``3, 7, 16``) the visual tokens are ranked by the raters' attention
    (softmax over all keys, mean over heads and raters) and the top ones kept; with ``recycle`` (v1.5 default) the
    30% most relevant deleted tokens are clustered (DPC-kNN on the layer's output) into ``int(m/10)+1`` recycled
    tokens, appended after the kept ones; they count as visual tokens in the next stages. Positions REINDEX (v1.5:
    0..N'-1; decode shifted per layer); Qwen: KEEP, a recycled token at its cluster center's position.

    Budget: the paper's table. ``keep=192`` (int, LLaVA-1.5) or ``keep=1/3`` (ratio: 192 of 576) keeps
    300 / 200 / 110 visual tokens after layers 2 / 6 / 15 (v1.5 table; 128: 303/110/36; 96: 238/48/26; 64:
    66/30/17), plus the recycled tokens; other budgets are interpolated and counts rescaled by ``n/576``
    (``functional.schedule_counts``). "192" is the table's name, not a layer average: the true layer average at
    192 is 202.75 plus recycled tokens. ``layers``: sparsification (scoring) layers; None = the official ones on any
    depth (an error at enable time where they do not exist). SparseVLM+ (v2.0: gravity-corrected, top-14 heads,
    KEEP) is not offered.
    """

    name = "sparsevlm"
    paper = "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference (ICML 2025)"
    deviations = (
        Deviation(
            "v1.5 only; SparseVLM+ v2.0 (gravity correction, top-14 heads, kept positions) is not offered.",
            "One version, the one the paper's tables report.",
        ),
        Deviation(
            "Raters and relevance from recomputed attention rows.",
            "The official code materialises a full softmax matrix in every layer, which sdpa and flash kernels never "
            "return.",
        ),
        Deviation(
            "DPC-kNN without the official random noise on the density; ties to the lowest index.",
            "Deterministic: the same prompt keeps the same tokens.",
        ),
        Deviation(
            "When a table count reaches the current count, nothing is pruned at that stage.",
            "The official `min(count, n - 1)` always drops one token, even when the budget asks to keep them all.",
        ),
        Deviation(
            "Budgets other than the table's are interpolated; counts are rescaled by `n / 576` on LLaVA-NeXT and "
            "Qwen.",
            "The official table is for 576 tokens at 64 / 128 / 192.",
        ),
        Deviation(
            "Batches and several images per prompt; with several images the raters use every visual token of the row "
            "and the text after the last image. Qwen: positions kept, a recycled token at its cluster centre's "
            "position.",
            "The official code runs batch 1 on LLaVA only.",
        ),
    )
    positions = "reindex"
    table: ClassVar[dict[int, tuple[int, ...]]] = F.SPARSEVLM_TABLE
    default_layers: ClassVar[tuple[int, ...]] = (2, 6, 15)
    layers: tuple[int, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = 0.3

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
            if len(self.layers) != 3 or any(b <= a for a, b in zip(self.layers[:-1], self.layers[1:], strict=True)):
                raise ValueError(f"{self.name}: layers must be 3 strictly increasing sparsification layers (the "
                                 f"table has 3 stages); got {self.layers}")
        if not 0.0 <= self.recycle_ratio <= 1.0:
            raise ValueError(f"{self.name}: recycle_ratio must lie in [0, 1]; got {self.recycle_ratio!r}")

    def sparse_layers(self, n_layers: int) -> tuple[int, ...]:
        return self.layers if self.layers is not None else self.default_layers

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return tuple(StagePlan(layer=l + 1, score_layer=l) for l in self.sparse_layers(n_layers))  # noqa: E741

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        return F.schedule_counts(self.table, table_budget(keep, n), n)

    def raters(self, row: RowSignals) -> torch.Tensor:
        """Slots of the text raters (chosen on the prompt's input embeddings; text is never pruned)."""
        text = row.text_after()
        if text.numel() == 0:  # no text after the image: the last prompt token rates
            return torch.tensor([row.last], device=row.valid.device)
        embeddings = row.embeddings
        chosen = F.sparsevlm_raters(embeddings[row.visual_prompt], embeddings[row.index[text]])
        return text[chosen.to(text.device)] if chosen.numel() else text  # all equal: every text token rates

    def scores(self, stage: int, row: RowSignals) -> torch.Tensor:
        return row.attention(self.raters(row)).mean(dim=(0, 1))  # [N]

    def select_stage(
        self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]
    ) -> list[torch.Tensor | Recycled]:
        relevance = self.scores(stage, row)
        out: list[torch.Tensor | Recycled] = []
        for slots, k in images:
            rel = relevance[slots]
            kept = top_k_indices(rel, k)
            if not self.recycle or k >= slots.numel():
                out.append(kept)
                continue
            centers, members = F.sparsevlm_recycle(rel, kept, row.hidden[slots], self.recycle_ratio)
            groups = [(k + i, m, torch.full((m.numel(),), 1.0 / m.numel())) for i, m in enumerate(members)]
            out.append(Recycled.merge_groups(kept, centers, groups, slots.numel()))
        return out


@dataclass
class AdaptInfer(SparseVLM):
    """AdaptInfer (Zhang et al., AdaptInfer: Adaptive Token Pruning for Vision-Language Model Inference with
    Dynamic Text Guidance, arXiv 2508.06084), author's LLaVA code.

    SparseVLM's three-stage loop with a different score: every text token after the image is a query, weighted by
    the attention it receives from and pays to the other text tokens (``Att + Att^T - diag``, summed), and the
    visual tokens are ranked by the weighted sum of those rows' attention (heads summed). Layers ``1, 10, 20`` (own
    attention; first pruned 2, 11, 21), recycling off (official ``s_flag=0``), positions REINDEX (Qwen: KEEP).

    Budget: the author's table: ``keep=128`` (or 128/576) keeps 290 / 72 / 18 visual tokens (64: 133/27/3; 48:
    80/24/2; 32: 40/12/0, where 0 becomes 1 here), interpolated and rescaled as SparseVLM's. The author's Qwen2-VL
    schedule (layers 0/9/19, ratios 0.17/0.6/0.3 of the current count) is not built in; ``layers=(0, 9, 19)``
    sets its layers.
    """

    name = "adaptinfer"
    paper = "AdaptInfer: Adaptive Token Pruning for Vision-Language Model Inference with Dynamic Text Guidance (2025)"
    deviations = (
        Deviation(
            "The LLaVA schedule (table, official layers 1 / 10 / 20) on every family; the 32-token setting's final 0 "
            "keeps one token.",
            "The author's Qwen2-VL schedule (layers 0 / 9 / 19, ratios 0.17 / 0.6 / 0.3 of the current count) is not "
            "built in; `layers=(0, 9, 19)` sets its layers.",
        ),
    )
    table: ClassVar[dict[int, tuple[int, ...]]] = F.ADAPTINFER_TABLE
    default_layers: ClassVar[tuple[int, ...]] = (1, 10, 20)
    recycle: bool = False

    def scores(self, stage: int, row: RowSignals) -> torch.Tensor:
        text = row.text_after()
        if text.numel() == 0:  # no text after the image: the last prompt token guides
            text = torch.tensor([row.last], device=row.valid.device)
        attn = row.attention(text)  # [H, T, N]
        return F.adaptinfer_scores(attn[:, :, text], attn)
