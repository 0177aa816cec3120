"""CATP: two-stage pruning of the images of a multimodal in-context-learning prompt (examples, then the query)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from tokenprune import functional as F
from tokenprune.budget import Keep, kept_count
from tokenprune.methods.base import FEATURES, PAIRED_TEXT, Deviation, PruningMethod, SelectionContext
from tokenprune.methods.decoder_base import DecoderMethod, RowSignals, StagePlan
from tokenprune.methods.two_stage import TwoStageMethod

PAPER = "CATP: Contextually Adaptive Token Pruning, for multimodal in-context learning (AAAI 2026)"


@dataclass
class CATPSubmodular(PruningMethod):
    """CATP stage 1, per image before the LLM: greedy facility location over the image's projected tokens plus
    ``lambda1`` x alignment to the mean embedding of the image's paired text (:func:`F.catp_submodular`)."""

    name = "catp-submodular"
    paper = PAPER + ", stage 1"
    needs = frozenset({FEATURES, PAIRED_TEXT})
    needs_without_cls = frozenset({FEATURES, PAIRED_TEXT})
    crop_scope = "image"  # one pool per image (LLaVA-NeXT: base tile and crops together)
    lambda1: float = 0.7

    def __post_init__(self) -> None:
        if not self.lambda1 >= 0:
            raise ValueError(f"catp: lambda1 (weight of the text alignment) must be >= 0; got {self.lambda1!r}")

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return F.catp_submodular(ctx.signal(FEATURES), ctx.signal(PAIRED_TEXT), ctx.k, lambda1=self.lambda1)


@dataclass
class CATPProgressive(DecoderMethod):
    """CATP stage 2 ("progressive adaptation"), inside the LLM. The output of layer ``K`` (scored with the attention
    of layers K-1 and K): the tokens of ALL in-context images form one pool, scored
    ``max(0, A_K - A_{K-1}) + lambda2 * cos(h, mean of the query sample)`` (A: head-mean attention of the prompt's
    last token), and the lowest are removed so that the pool keeps its share. The output of layer ``K + 1``: the
    query image's tokens, scored by cosine to the mean of the kept in-context image tokens. Positions KEEP.

    ``K`` (``layer``): None = the paper's 6 (10 on LLMs of 40+ layers, its 13B setting). ``query_image``: the index
    of the query among the row's images (default the last). A row with one image runs as 0-shot (no pool; the query
    scored against its own text) unless ``require_context=True``, which raises.
    """

    name = "catp-progressive"
    paper = PAPER + ", stage 2"
    exact_counts = False  # one pool over the in-context images: per-image counts adapt
    layer_option = "layer"
    layer: int | None = None
    lambda2: float = 0.6
    query_image: int = -1
    require_context: bool = False

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 1):
            raise ValueError(f"catp: layer (K, the layer that scores the in-context images) must be an int >= 1 "
                             f"(layer K-1's attention is read too); got {self.layer!r}")
        if isinstance(self.query_image, bool) or not isinstance(self.query_image, int):
            raise ValueError(f"catp: query_image is the index of the query among a row's images (e.g. -1: the last); "
                             f"got {self.query_image!r}")
        if not self.lambda2 >= 0:
            raise ValueError(f"catp: lambda2 (weight of the query similarity) must be >= 0; got {self.lambda2!r}")
        self._previous = None  # the layer whose attention gives A_{K-1} on this model (set by attention_layers)

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        k = self.layer if self.layer is not None else (10 if n_layers >= 40 else 6)
        return StagePlan(layer=k + 1, score_layer=k), StagePlan(layer=k + 2, score_layer=k + 1)

    def attention_layers(self, plan: tuple[StagePlan, ...]) -> tuple[int, ...]:
        self._previous = plan[0].score_layer - 1
        return (self._previous,)

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        """The image's share after both stages (in-context images: after layer K, the query: after K + 1)."""
        k = kept_count(keep, n)
        return [k, k]

    def _query(self, row: RowSignals, n_images: int) -> int:
        q = self.query_image + n_images if self.query_image < 0 else self.query_image
        if not 0 <= q < n_images:
            raise ValueError(f"catp: query_image={self.query_image} but prompt row {row.source_row} has {n_images} "
                             f"image(s); pass an index in {-n_images}..{n_images - 1} (default -1: the last image)")
        if n_images < 2 and self.require_context:
            raise ValueError(
                f"catp: prompt row {row.source_row} has {n_images} image; require_context=True prunes multi-image "
                f"in-context prompts only (in-context examples, each image followed by its text, then the query "
                f"image and question). Give the examples, or use a single-image method such as 'divprune'"
            )
        return q

    @staticmethod
    def _sample(row: RowSignals, images: list[tuple[torch.Tensor, int]], q: int) -> torch.Tensor:
        """Slots of the query image's paired text: the valid non-visual slots after it, before the next image."""
        slots = torch.arange(row.valid.shape[0], device=row.valid.device)
        visual = torch.zeros_like(row.valid)
        for s, _ in images:
            visual[s] = True
        after = slots > int(images[q][0].max())
        if q + 1 < len(images):
            after &= slots < int(images[q + 1][0].min())
        return slots[after & row.valid & ~visual]

    def select_stage(self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        q = self._query(row, len(images))
        context = [i for i in range(len(images)) if i != q]
        out = [torch.arange(s.numel(), device=s.device) for s, _ in images]
        text = self._sample(row, images, q)
        hidden = row.hidden
        if stage == 0:
            if not context:
                return out
            pool = torch.cat([images[i][0] for i in context])
            budget = sum(images[i][1] for i in context)
            sample = torch.cat([images[q][0], text])
            a_k = row.attention()[..., pool.to(row.valid.device)]
            a_prev = row.attention_at(self._previous)[..., pool.to(row.valid.device)]
            kept = F.catp_context(a_k, a_prev, hidden[pool], hidden[sample].float().mean(dim=0), budget,
                                  lambda2=self.lambda2)
            chosen = torch.zeros(pool.numel(), dtype=torch.bool, device=kept.device)
            chosen[kept] = True
            start = 0
            for i in context:
                n = images[i][0].numel()
                out[i] = chosen[start:start + n].nonzero().squeeze(1)
                start += n
            return out
        if context:
            anchor = hidden[torch.cat([images[i][0] for i in context])].float().mean(dim=0)
        elif text.numel():
            anchor = hidden[text].float().mean(dim=0)
        else:
            raise ValueError(f"catp: the query image of prompt row {row.source_row} has no text after it to score "
                             f"its tokens against; put the question after the query image")
        slots, k = images[q]
        out[q] = F.catp_query(hidden[slots], anchor, k)
        return out


@dataclass
class CATP(TwoStageMethod):
    """CATP (Contextually Adaptive Token Pruning, AAAI 2026) for multimodal in-context learning: prompts of
    in-context examples (an image, then its text) followed by the query image and question.

    Stage 1 (:class:`CATPSubmodular`, before the LLM, per image): keep the ``1 - R/2`` share of the image's tokens
    maximising facility location + ``lambda1`` x alignment to the image's paired text (the text between it and the
    next image: ``docs/methods/two-stage.md``). Stage 2 (:class:`CATPProgressive`, in the LLM at layers K and K+1):
    the in-context images as one pool, then the query image, down to the ``1 - R`` share.

    Budget: ``keep = 1 - R``, the share of each image's tokens left after both stages (the paper's R = 66.7 / 77.8 /
    89.9 % are ``keep=0.333 / 0.222 / 0.101``); each stage removes ``R / 2`` of them. A float ratio only.
    """

    name = "catp"
    paper = PAPER
    deviations = (
        Deviation(
            "The paper's algorithm (no official code): layer `K` (0-based, default 6; 10 on 40+ layers) is read as the "
            "layer whose output is pruned: the in-context images are scored with the attention of layers K-1 and K "
            "and the hidden states leaving K, removed from layer K+1; the query image is scored on the output of "
            "K+1 and removed from layer K+2.",
            "The paper does not give the index base nor whether layer K's output or input is pruned.",
        ),
        Deviation(
            "Counts: stage 1 keeps `round(S (1 + keep) / 2)` of an image's S tokens; stage 2 keeps "
            "`round(n keep' )` of the n entering the LLM, `keep' = 2 keep / (1 + keep)`, summed over the in-context "
            "images for their pool.",
            "The paper floors `S (1 - R/2)` and `S (1 - R)`; one rounding rule (half up) serves every method here.",
        ),
        Deviation(
            "The query sample is the query image's tokens and the text after it up to the next image; the "
            "attention row is the prompt's last token's, also when `query_image` is not the last image.",
            "The paper's query sample is the last (image, question) pair of the prompt; it does not define other "
            "orders.",
        ),
        Deviation(
            "A prompt row with one image runs as 0-shot: stage 1 as usual, no in-context pool at layer K, the "
            "query image scored at K+1 against the mean hidden state of its own text.",
            "The paper evaluates in-context prompts only; one behaviour for every prompt keeps CATP usable "
            "everywhere.",
            "require_context=True",
        ),
        Deviation(
            "LLaVA-NeXT: stage 1 runs on one pool per image (base tile and crops together); its `image_newline` "
            "tokens are not candidates and are dropped when the image is pruned.",
            "The paper does not say how AnyRes crops and newline tokens enter the per-image selection.",
        ),
        Deviation(
            "On a hybrid LLM (Qwen3.5) the layers are moved to full-attention layers, and the attention of layer K-1 "
            "is read at the closest full-attention layer below the scoring layer.",
            "Attention rows exist only at full-attention layers there.",
        ),
    )
    needs = frozenset({FEATURES, PAIRED_TEXT})
    needs_without_cls = frozenset({FEATURES, PAIRED_TEXT})
    layer: int | None = None
    lambda1: float = 0.7
    lambda2: float = 0.6
    query_image: int = -1
    require_context: bool = False

    def __post_init__(self) -> None:
        self.stages()  # validates the options

    def stages(self) -> tuple[CATPSubmodular, CATPProgressive]:
        return CATPSubmodular(lambda1=self.lambda1), CATPProgressive(
            layer=self.layer, lambda2=self.lambda2, query_image=self.query_image,
            require_context=self.require_context,
        )

    def stage_keeps(self, keep: Keep) -> tuple[Keep, Keep]:
        """``keep = 1 - R`` split R/2 per stage: ``(1 - R/2, (1 - R) / (1 - R/2))`` of what enters each stage."""
        if not isinstance(keep, float):
            raise ValueError(f"catp: keep is the share 1 - R of each image's tokens after both stages (the paper's "
                             f"R = 77.8% is keep=0.222); pass a float ratio, got {keep!r}")
        kept = Fraction(str(keep))
        vision = (1 + kept) / 2
        return float(vision), min(1.0, float(kept / vision))

    def requests(self, cls_token: bool = True) -> tuple:
        return self.stages()[0].requests(cls_token)

    def schedule(self, images: list[int], keep: float, num_layers: int) -> list[int]:
        """Visual tokens entering each LLM layer for a prompt row whose images have ``images`` stage-1 candidates
        each (in prompt order): the counts a run keeps, for the FLOPs / KV calculator
        (:func:`tokenprune.budget.flops.prefill_flops` of ``text + schedule``). Layers ``0..K``: stage 1's tokens;
        ``K+1``: the in-context pool cut; ``K+2..``: the query image cut too (one image: 0-shot, no pool)."""
        vision, decoder = self.stage_keeps(keep)
        entering = [kept_count(vision, n) for n in images]
        final = [kept_count(decoder, n) for n in entering]
        plan = self.stages()[1].plan(num_layers)
        if not -len(images) <= self.query_image < len(images):
            raise ValueError(f"catp: query_image={self.query_image} but the schedule has {len(images)} image(s)")
        q = self.query_image % len(images)
        context = sum(f for i, f in enumerate(final) if i != q) if len(images) > 1 else 0
        first, second = plan[0].layer, plan[1].layer
        return ([sum(entering)] * first + [context + entering[q]] * (second - first)
                + [context + final[q]] * (num_layers - second))
