"""ToDRE: a diverse subset before the LLM, then all visual tokens dropped once the text no longer looks at them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.budget import Keep, kept_count
from tokenprune.functional.todre import todre_drop_all, todre_text_to_visual
from tokenprune.methods.base import Deviation
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan
from tokenprune.methods.kcenter import KCenter
from tokenprune.methods.two_stage import TwoStageMethod

PAPER = "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance (arXiv 2505.18757, 2025)"


@dataclass
class ToDREDiversity(KCenter):
    """ToDRE stage 1: :class:`KCenter` with one pool per image (LLaVA-NeXT: base tile and crops together)."""

    name = "todre-diversity"
    paper = PAPER + ", stage 1"
    crop_scope = "image"
    rule: str = "maxsum"


@dataclass
class ToDRERelevance(DecoderMethod):
    """ToDRE stage 2: at the candidate layer ``l`` (default ``7L // 8``: 28 of 32, 24 of 28) the head-averaged
    attention of the instruction tokens (the valid tokens after the row's last visual token) gives
    alpha_{t->v} = their attention mass on the visual tokens / their total mass; alpha_{v->t} is 0 for such rows
    (causal: visual rows cannot see later text). If both are below ``tau`` every visual token of the row is removed
    from layer ``l + 1`` on, else none. Positions KEEP. Budget: none (``keep=1.0`` switches it off)."""

    name = "todre-relevance"
    paper = PAPER + ", stage 2"
    exact_counts = False
    layer_option = "layer"
    layer: int | None = None
    tau: float = 0.10

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"todre: tau (attention-ratio threshold) must lie in (0, 1]; got {self.tau!r}")

    def candidate(self, n_layers: int) -> int:
        """``7L // 8`` (28 of 32, 24 of 28): the paper defines the layer relative to the depth. On a model too
        shallow for a layer to run after it (L <= 4), enabling fails (:meth:`check_layers`); pass ``layer=``."""
        return self.layer if self.layer is not None else 7 * n_layers // 8

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        ell = self.candidate(n_layers)
        return (StagePlan(layer=ell + 1, score_layer=ell),)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        return [n if kept_count(keep, n) >= n else 0]

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        text = row.text_after()
        visual = torch.cat([slots for slots, _ in images])
        drop = False
        if text.numel():
            alpha_tv = todre_text_to_visual(row.attention(text), visual.to(text.device))
            drop = todre_drop_all(alpha_tv, 0.0, self.tau)
        return [slots.new_zeros(0) if drop else torch.arange(slots.numel(), device=slots.device)
                for slots, _ in images]


@dataclass
class ToDRE(TwoStageMethod):
    """ToDRE (arXiv 2505.18757, v2 "Effective Visual Token Pruning via Token Diversity and Task Relevance").

    Stage 1 (before the LLM, projected tokens): greedy diversity from the pivot with the highest [CLS] attention of
    the last vision layer (seeded random pivot without [CLS]); ``rule="maxsum"`` = v2's max-sum diversification
    (Algorithm 1, default), ``"kcenter"`` = v1's greedy k-center. Stage 2 (in the LLM): :class:`ToDRERelevance`.

    Budget: ``keep`` is the stage-1 retention per image (paper: 25% or 10% of all visual tokens, e.g. LLaVA-NeXT
    "up to 720 / 288"); stage 2 then removes the rest deep in the decoder when the text no longer attends to it,
    so layers ``0..l`` see ``keep * n`` visual tokens and layers ``l+1..L-1`` none.
    """

    name = "todre"
    paper = PAPER
    deviations = (
        Deviation(
            "The paper's algorithm; stage 1 defaults to v2's max-sum diversification (`rule=\"kcenter\"` for v1).",
            "No official code was released.",
        ),
        Deviation(
            "LLaVA-NeXT: one pool per packed image whose pivot is the highest [CLS] attention over all crops.",
            "The paper takes the pivot from the thumbnail; one pool keeps the diversity global over the image.",
        ),
        Deviation(
            "Stage 2 is checked once, at layer `floor(7L/8)` (0-based); the "
            "text set is every valid token after the row's last image; the decision is per prompt row.",
            "The paper leaves the index base open and may check later layers too; with image-then-question prompts "
            "the visual-to-text attention is 0 by causality, so the test is text-to-visual attention below the "
            "threshold.",
        ),
    )
    needs = KCenter.needs  # the vision stage's signals (the decoder stage needs none from the tower)
    needs_without_cls = KCenter.needs_without_cls
    rule: str = "maxsum"
    layer: int | None = None
    tau: float = 0.10
    seed: int = 0

    def __post_init__(self) -> None:
        self.stages()  # validates the options

    def stages(self) -> tuple[ToDREDiversity, ToDRERelevance]:
        return ToDREDiversity(rule=self.rule, seed=self.seed), ToDRERelevance(layer=self.layer, tau=self.tau)

    def stage_keeps(self, keep: Keep) -> tuple[Keep, Keep]:
        return keep, keep

    def requests(self, cls_token: bool = True) -> tuple:
        return self.stages()[0].requests(cls_token)
