"""HoliTom: outer-LLM temporal + spatial merging of a video's tokens, then inner-LLM merging at an early layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenprune.budget import Keep, kept_count
from tokenprune.functional.holitom import holitom_inner, holitom_outer
from tokenprune.methods.base import (
    ATTENTION_RECEIVED,
    FEATURES,
    Deviation,
    PruningMethod,
    Selection,
    SelectionContext,
)
from tokenprune.methods.decoder_base import DecoderMethod, Recycled, RowSignals, StagePlan
from tokenprune.methods.two_stage import TwoStageMethod

PAPER = ("HoliTom: Holistic Token Merging for Fast Video Large Language Models (NeurIPS 2025, arXiv 2505.21334; "
         "official code github.com/cokeshao/HoliTom)")

_DEVIATIONS = (
    Deviation(
        "DPC-kNN density ties are broken by the lowest index (stable sort), with no random noise.",
        "The official code adds `rand * 1e-6` to the densities, which makes the clusters vary from run to run.",
    ),
    Deviation(
        "The retain ratio is `k / N` with `k` the shared budget's count of the video's `N` tokens (`keep=0.15` on "
        "6,272 tokens: 941 / 6,272), and `keep=1.0` keeps every token unchanged (no temporal averaging).",
        "One budget rule for every method; `keep=1.0` is bit-identical to the unpruned model. The official "
        "RETAIN_RATIO=1 would still average static tokens.",
    ),
    Deviation(
        "Qwen2-VL / Qwen2.5-VL: a frame is a temporal patch (2 input frames); a merged token sits at the M-RoPE "
        "position of its first member in time (frame-major, lowest spatial index), kept tokens at their own.",
        "The official code covers LLaVA-OneVision / LLaVA-Video (1-D positions, re-indexed); M-RoPE needs a member's "
        "(t, h, w) and the first member keeps the temporal axis monotone.",
    ),
    Deviation(
        "Qwen3-VL / Qwen3.5: the inner merge runs per frame (each frame's tokens sit between timestamp text, and "
        "the decoder stage treats each run of visual tokens as one image); DeepStack features of a merged token "
        "are the same combination of its members' rows.",
        "The official code covers LLaVA-OneVision / LLaVA-Video only (one visual span per video).",
    ),
    Deviation(
        "If the budget leaves no token at all, the most attended token of the first frame is kept.",
        "The official code would hand the LLM an empty video.",
    ),
)


@dataclass
class HoliTomOuter(PruningMethod):
    """HoliTom's outer-LLM stage ("HoliTom (w/o M)" in the paper): global temporal segmentation, temporal merging
    of each window's static tokens, spatial merging (DPC-kNN for static tokens, the most attended dynamic tokens
    per frame) -- :func:`tokenprune.functional.holitom.holitom_outer`. Videos only; one unit per whole video.

    Budget: ``keep`` is the retain ratio of the video's tokens (the paper's 10-25%, official RETAIN_RATIO),
    newline excluded. Options as the official environment variables: ``tau`` (T), ``beta`` (BETA), ``d`` (D, the
    contextual share of each frame's dynamic budget), ``knn`` (K), ``max_window`` (MAX_WINDOW_SIZE).
    """

    name = "holitomouter"
    paper = PAPER
    needs = frozenset({FEATURES, ATTENTION_RECEIVED})
    needs_without_cls = frozenset({FEATURES, ATTENTION_RECEIVED})
    crop_scope = "image"
    newline_candidates = True  # LLaVA-OneVision's newline after the video stays, last (official "one_token")
    fixed_budget = False
    video_unit = "video"
    video_only = True
    deviations = _DEVIATIONS
    tau: float = 0.8
    beta: float = 0.6
    d: float = 0.0
    knn: int = 7
    max_window: int = 1024

    def __post_init__(self) -> None:
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"{self.name}: tau (cosine threshold of a static token) must lie in [-1, 1]; "
                             f"got {self.tau}")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.d <= 1.0:
            raise ValueError(f"{self.name}: beta and d must lie in [0, 1]; got beta={self.beta}, d={self.d}")
        if self.knn < 1 or self.max_window < 1:
            raise ValueError(f"{self.name}: knn and max_window must be >= 1; got {self.knn}, {self.max_window}")

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        if ctx.video is None:
            raise ValueError(
                f"method {self.name!r} merges tokens across the frames of a video, but it was given an image (a "
                f"unit of {ctx.n} tokens that is not a whole video). Pass videos (pixel_values_videos) with the "
                f"default scope, or use an image method for images, e.g. 'divprune'"
            )
        if ctx.k >= ctx.n:
            return torch.arange(ctx.n)
        frames, h, w = ctx.video
        tokens = frames * h * w
        newline = ctx.n - tokens  # LLaVA-OneVision: one newline token after the video's frames
        if newline not in (0, 1):
            raise RuntimeError(f"{self.name}: a video unit of {frames} x {h} x {w} tokens holds {ctx.n} tokens")
        features = ctx.signal(FEATURES)[:tokens].reshape(frames, h * w, -1)
        attention = ctx.signal(ATTENTION_RECEIVED)[:tokens].reshape(frames, h * w)
        out = holitom_outer(features, attention, ctx.k / ctx.n, tau=self.tau, beta=self.beta, d=self.d, knn=self.knn,
                            max_window=self.max_window)
        kept, order, assign = out.kept, out.order, out.assign
        if newline:  # kept after everything else, as the official code appends it to the merged video
            k = kept.numel()
            kept = torch.cat([kept, torch.tensor([tokens])])
            order = torch.cat([torch.where(order < k, order, order + 1), torch.tensor([k])])
            assign = torch.cat([assign, torch.tensor([-1])])
        if out.merged.shape[0] == 0:
            return kept
        return Selection(kept, out.merged, assign, order=order)


@dataclass
class HoliTomMerge(DecoderMethod):
    """HoliTom's inner-LLM stage: at decoder layer ``layer`` (official HOLITOM_k = 18 of Qwen2-7B's 28) the
    ``round(n (1 - merge_ratio))`` image tokens most attended by the last prompt token (head mean, layer
    ``layer - 1``) stay; each other one is averaged into its most similar kept token (cosine of the hidden states),
    in prompt order (:func:`tokenprune.functional.holitom.holitom_inner`). Positions KEEP (official ``keep_indexs``).
    Its ``keep`` only says "all" (``keep=1.0``: no merge); the share merged is ``merge_ratio`` (HOLITOM_r)."""

    name = "holitommerge"
    paper = PAPER + ", inner-LLM merging"
    layer_option = "layer"
    layer: int = 18
    merge_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.merge_ratio < 1.0:
            raise ValueError(f"{self.name}: merge_ratio must lie in [0, 1); got {self.merge_ratio}")

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        return (StagePlan(layer=self.layer, score_layer=self.layer - 1),)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        if kept_count(keep, n) >= n:
            return [n]
        return [max(1, min(n, round(n * (1 - self.merge_ratio))))]

    def layer_tokens(self, text: int, visual: int, kept: int, num_layers: int) -> list[int]:
        """Tokens each LLM layer processes: ``text + kept`` up to ``layer - 1``, then the inner merge's share."""
        inner = max(1, round(kept * (1 - self.merge_ratio))) if kept else 0
        return [text + kept] * self.layer + [text + inner] * (num_layers - self.layer)

    def select_stage(
        self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]
    ) -> list[torch.Tensor | Recycled]:
        attention = row.attention().float().mean(dim=0)[0]  # [N] head mean, last prompt token
        out: list[torch.Tensor | Recycled] = []
        for slots, k in images:
            kept, weights = holitom_inner(attention[slots], row.hidden[slots], k)
            mixed = (weights != 0).sum(dim=1) > 1
            if not bool(mixed.any()):
                out.append(kept)
                continue
            rows = mixed.nonzero().squeeze(1)
            out.append(Recycled(kept, torch.zeros(0, dtype=torch.long), rows, weights[rows]))
        return out


@dataclass
class HoliTom(TwoStageMethod):
    """HoliTom (Shao et al., NeurIPS 2025): :class:`HoliTomOuter` before the LLM, :class:`HoliTomMerge` inside it.
    Videos only (Qwen2-VL, Qwen2.5-VL, Qwen3-VL / Qwen3.5, LLaVA-OneVision); an image gets a clear error.

    Budget: ``keep`` is the outer retain ratio (the paper's 10/15/20/25%); the inner stage then merges
    ``merge_ratio`` of what entered the LLM at ``layer`` (official 18, 0.5). ``keep=1.0`` prunes nothing. An int
    ``keep`` is the outer stage's token count per video; the inner merge runs for every ``keep`` but ``1.0``
    (``merge_ratio=0`` switches it off).
    """

    name = "holitom"
    paper = PAPER
    needs = HoliTomOuter.needs
    needs_without_cls = HoliTomOuter.needs_without_cls
    crop_scope = "image"
    fixed_budget = False
    video_unit = "video"
    video_only = True
    deviations: ClassVar[tuple[Deviation, ...]] = _DEVIATIONS + (
        Deviation(
            "The inner merge runs per video of every batch row; a row's last prompt token scores its own videos.",
            "The official code merges the first image span of batch row 0 only (batch size 1 in its evaluation).",
        ),
    )
    tau: float = 0.8
    beta: float = 0.6
    d: float = 0.0
    knn: int = 7
    max_window: int = 1024
    layer: int = 18
    merge_ratio: float = 0.5

    def __post_init__(self) -> None:
        self.stages()  # validates the options

    def stages(self) -> tuple[HoliTomOuter, HoliTomMerge]:
        outer = HoliTomOuter(tau=self.tau, beta=self.beta, d=self.d, knn=self.knn, max_window=self.max_window)
        return outer, HoliTomMerge(layer=self.layer, merge_ratio=self.merge_ratio)

    def stage_keeps(self, keep: Keep) -> tuple[Keep, Keep]:
        return keep, (1.0 if isinstance(keep, float) and keep >= 1.0 else 1 - self.merge_ratio)

    def requests(self, cls_token: bool = True) -> tuple:
        return self.stages()[0].requests(cls_token)

    def layer_tokens(self, text: int, visual: int, kept: int, num_layers: int) -> list[int]:
        """The FLOPs schedule (:mod:`tokenprune.budget.flops_targets`): ``kept`` = the outer stage's tokens (merged
        ones included), then the inner merge from ``layer`` on."""
        return self.stages()[1].layer_tokens(text, visual, kept, num_layers)
