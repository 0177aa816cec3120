"""VFlowOpt: ViT-attention importance, ViT-output pruning with recycling, then LLM stages on the same map."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tokenprune import functional as F
from tokenprune.budget import Keep
from tokenprune.functional.vflowopt import CONFIGS, VFlowOptConfig, vflowopt_config
from tokenprune.methods.base import (
    ATTENTION_MAP,
    VISION_HIDDEN,
    Deviation,
    PruningMethod,
    Selection,
    SelectionContext,
)
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan
from tokenprune.methods.two_stage import TwoStageMethod

PAPER = "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization (ICCV 2025)"
OFFICIAL_LLM_LAYERS = (9, 18)  # of 28 (Qwen2-7B of LLaVA-OneVision)


def _budget(k: int, n: int) -> float:
    """The shipped budget ``k / n`` names (0.10 / 0.25 / 0.50 when ``k`` is that share of ``n`` rounded)."""
    for b in CONFIGS:
        if abs(k - b * n) <= 0.5 + 1e-9:
            return b
    return k / n


def _override(config: VFlowOptConfig, **fields: float | None) -> VFlowOptConfig:
    return dataclasses.replace(config, **{k: v for k, v in fields.items() if v is not None})


class ImportanceCarrier(dict):
    """The hand-off from VFlowOpt's vision stage to its LLM stages, one prefill at a time: ``(batch row, image in
    row) -> [n_span]`` ViT importance of the tokens the vision stage placed in the image's span (kept tokens, then
    the recycled ones at their representative's importance). The official code passes the map through an
    environment variable; here it is per method instance and per image, so batches work."""


@dataclass
class VFlowOptViT(PruningMethod):
    """VFlowOpt's vision stage: importance from the feature layer's attention map among image tokens (global-token
    rows), the least important tokens removed and recycled per 2-D cell into their most important member."""

    name = "vflowoptvit"
    paper = PAPER
    needs = frozenset({ATTENTION_MAP, VISION_HIDDEN})
    fixed_budget = False
    # Towers without [CLS] (SigLIP, its home: LLaVA-OneVision): the same map, nothing to drop.
    needs_without_cls = frozenset({ATTENTION_MAP, VISION_HIDDEN})
    carrier: ClassVar[Any] = None  # set per instance by VFlowOpt.stages()
    t: float | None = None      # None: the shipped (or interpolated) config of the budget
    m: float | None = None
    r_vit: float | None = None

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        if ctx.k >= ctx.n:
            importance, kept, groups = None, torch.arange(ctx.n), []
        else:
            config = _override(vflowopt_config(_budget(ctx.k, ctx.n)), t=self.t, m=self.m, r_vit=self.r_vit)
            importance = F.vflowopt_importance(ctx.signal(ATTENTION_MAP), config.t)
            kept, groups = F.vflowopt_recycle(importance, ctx.grid or (1, ctx.n), config.r_vit, config.m)
        reps = torch.tensor([g[0] for g in groups], dtype=torch.long)
        plain = kept[~torch.isin(kept, reps)]
        if self.carrier is not None:
            key = (ctx.row, ctx.index_in_row)
            span = (torch.zeros(ctx.n) if importance is None else torch.cat([importance[plain], importance[reps]]))
            self.carrier[key] = span if ctx.unit_index == 0 else torch.cat([self.carrier[key], span])
        if not groups:
            return kept
        hidden = ctx.signal(VISION_HIDDEN).float()
        merged = torch.stack([w.to(hidden.device) @ hidden[m.to(hidden.device)] for _, m, w in groups])
        assign = torch.full((ctx.n,), -1, dtype=torch.long)
        for i, (_, members, _) in enumerate(groups):
            assign[members] = i
        return Selection(plain, merged, assign, space=VISION_HIDDEN)


@dataclass
class VFlowOptLLM(DecoderMethod):
    """VFlowOpt's LLM stages: at layers 9 and 18 (official, of Qwen2-7B's 28; the same on any depth) the visual
    tokens with the lowest ViT importance (carried from the vision stage, not LLM attention) are removed,
    ``round(n (1 - r))`` of the current ``n``. Positions KEEP (official)."""

    name = "vflowoptllm"
    paper = PAPER
    layers: tuple[int, ...] | None = None
    llm_r: tuple[float, float] | None = None
    carrier: ClassVar[Any] = None

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        if self.layers is not None:
            bounds = tuple(self.layers)
        else:
            bounds = OFFICIAL_LLM_LAYERS  # on any depth; check_layers refuses them where they do not exist
        return tuple(StagePlan(layer=b, score_layer=b) for b in bounds)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        if float(keep) >= 1.0:
            return [n] * len(self.plan(n_layers))
        return F.vflowopt_llm_counts(n, self.llm_r if self.llm_r is not None else vflowopt_config(float(keep)).llm_r)

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        visual = row.visual_prompt
        starts = (visual & ~torch.nn.functional.pad(visual, (1, 0))[:-1]).nonzero().squeeze(1)
        ends = (visual & ~torch.nn.functional.pad(visual, (0, 1))[1:]).nonzero().squeeze(1)
        out = []
        for m, (slots, k) in enumerate(images):
            carried = (self.carrier or {}).get((row.source_row, m))  # beams: generate repeats the vision rows
            offsets = row.index[slots] - starts[m]
            if carried is None or carried.numel() != int(ends[m] - starts[m]) + 1:
                raise RuntimeError(
                    f"vflowopt: no ViT importance for image {m} of batch row {row.source_row} (or its span does not "
                    f"match the vision stage's); the LLM stages only run after VFlowOpt's own vision stage "
                    f"(method='vflowopt') on LLaVA-1.5 or LLaVA-OneVision, with the images and videos of a row "
                    f"separated by text"
                )
            out.append(F.vflowopt_llm(carried[offsets.cpu()], k))
        return out


@dataclass
class VFlowOpt(TwoStageMethod):
    """VFlowOpt (Yang et al., VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided
    Optimization, ICCV 2025), with the configurations its flow-guided search shipped (lmms-eval config).

    Vision stage (:class:`VFlowOptViT`): head-mean attention among the image tokens at the feature layer; global
    tokens = those receiving more than ``t`` times the mean, importance = their mean attention row (all rows if
    none); the ``round(N (1 - r_vit)) + int(N / m^2)`` least important tokens are removed and recycled per 2-D cell
    of side ``m`` into their most important member (importance-weighted mean, pre-projector). LLM stages
    (:class:`VFlowOptLLM`): the same map at layers 9 and 18 of 28, keep ratios ``llm_r`` of the current count.

    Budget: ``keep`` is the LAYER-AVERAGED share of visual tokens (the paper's 10% / 25% / 50%, exactly the
    shipped configs; other ratios interpolate them). A float only. Entropy term: ``alpha_v = 0`` in every shipped
    config, so patch entropy is not computed. Runs where the adapter gives a ViT attention map: LLaVA-1.5,
    LLaVA-OneVision, InternVL3 and Gemma 3 (the map among its pooled tokens); not on the Qwen adapters (no ViT
    attention map) nor LLaVA-NeXT (its spans do not line up with the per-crop hand-off yet).
    """

    name = "vflowopt"
    paper = PAPER
    deviations = (
        Deviation(
            "The shipped configurations (found for LLaVA-OneVision: SigLIP, 27 x 27 grid, 28 LLM layers) run as "
            "designed on LLaVA-OneVision (SigLIP layer 25 of 26, LLM layers 9 / 18 of 28) and, unscaled, on "
            "LLaVA-1.5's CLIP feature layer at the same LLM layers 9 / 18; budgets between 0.10 / 0.25 / 0.50 "
            "interpolate them.",
            "The official code is LLaVA-OneVision only; LLaVA-1.5 is the other family here with a ViT attention "
            "map.",
        ),
        Deviation(
            "LLaVA-OneVision: the ViT stage removes and recycles per crop (the base image and each crop under "
            "their own budget, cells within the crop's grid; a video per frame) instead of one removal count over "
            "all crops of the image; a down-scaled AnyRes token takes the attention row and column of the token "
            "under its centre; video frames are recycled like images.",
            "Our selection units are crops (the LLaVA-NeXT budget rule); the official multi-crop path ranks all "
            "crops together and its video path keeps a plain top-k.",
        ),
        Deviation(
            "Gemma 3: the ViT map is the map among the POOLED tokens, `P A P^T` (`A` the head-mean SigLIP map of the "
            "last encoder layer, `P` the projector's 4x4 average pooling: each token's row is the mean over its query "
            "patches of the attention they give to each token's key patches, summed; rows still sum to 1); recycled "
            "cells average the pooled post-layernorm outputs and go through the projector's RMSNorm and projection.",
            "The official code (LLaVA-OneVision) reads the unpooled SigLIP map, one row per LLM token there; Gemma 3's "
            "projector averages 16 patches into each LLM token, so the map and the recycled cells are taken on the "
            "tokens the LLM reads.",
        ),
        Deviation(
            "A recycled cell token is placed after the image's kept tokens.",
            "Officially it is written into its most important member's slot, so only its position differs under "
            "re-indexed positions; a merged token is placed the same way by every merging method here.",
        ),
        Deviation(
            "The patch-entropy term is not computed.",
            "`alpha_v = 0` in every shipped configuration, so it never changes a selection.",
        ),
        Deviation(
            "The flow-guided optimiser is replaced by an optional black-box search on your own prompts "
            "(`tokenprune.calibration.search_vflowopt`); the found configurations are shipped.",
            "The optimiser needs the training pipeline of the official repository; its results are the shipped "
            "configurations.",
        ),
        Deviation(
            "An LLM stage keeps at least one visual token per image.",
            "`n - round(n (1 - r))` can reach 0 officially, which would leave an image with no token at all.",
        ),
        Deviation(
            "The ViT importance map reaches the LLM stages per method instance and per image.",
            "The official code passes it through an environment variable (batch 1, one image).",
        ),
    )
    layers: tuple[int, ...] | None = None
    # None: the shipped config of the budget; set them (e.g. from ``tokenprune.calibration.search_vflowopt``) to
    # override: global-token threshold, cell size, ViT keep ratio, LLM keep ratios of the current count
    t: float | None = None
    m: float | None = None
    r_vit: float | None = None
    llm_r: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self._carrier = ImportanceCarrier()
        if self.llm_r is not None:
            self.llm_r = tuple(float(r) for r in self.llm_r)
            if len(self.llm_r) != 2 or not all(0.0 < r <= 1.0 for r in self.llm_r):
                raise ValueError(f"vflowopt: llm_r must be two keep ratios in (0, 1]; got {self.llm_r}")
        if self.r_vit is not None and not 0.0 < self.r_vit <= 1.0:
            raise ValueError(f"vflowopt: r_vit must lie in (0, 1]; got {self.r_vit!r}")
        if self.m is not None and self.m <= 0:
            raise ValueError(f"vflowopt: the cell size m must be > 0; got {self.m!r}")

    @classmethod
    def from_config(cls, config: VFlowOptConfig, **kwargs: Any) -> VFlowOpt:
        """A VFlowOpt with every hyper-parameter of ``config`` (e.g. what the calibration search returned)."""
        return cls(t=config.t, m=config.m, r_vit=config.r_vit, llm_r=config.llm_r, **kwargs)

    def stages(self) -> tuple[PruningMethod, PruningMethod]:
        vision = VFlowOptViT(t=self.t, m=self.m, r_vit=self.r_vit)
        llm = VFlowOptLLM(layers=self.layers, llm_r=self.llm_r)
        vision.carrier = llm.carrier = self._carrier
        return vision, llm

    def stage_keeps(self, keep: Keep) -> tuple[Keep, Keep]:
        if not isinstance(keep, float):
            raise ValueError(f"vflowopt: keep is the layer-averaged share of visual tokens (the paper's 0.10, 0.25 or "
                             f"0.50); pass a float ratio, got {keep!r}")
        return keep, keep
