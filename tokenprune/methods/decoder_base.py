"""The decoder-stage contract: methods that prune visual tokens between the LLM's decoder layers.

A decoder method says WHERE it prunes (:meth:`DecoderMethod.plan`: the first pruned layer of each stage and the
layer whose input its scores come from), HOW MANY visual tokens of each image survive each stage
(:meth:`DecoderMethod.counts`, the paper's budget convention) and WHICH (:meth:`DecoderMethod.select_stage`, from
the per-row signals the adapter's decoder loop computes lazily: :class:`RowSignals`). The loop
(``patches/decoder_loop.py``) does the rest: gathering, positions (``positions``: ``"keep"`` or ``"reindex"``; Qwen is
always KEEP), masks, KV cache and decode.

Merging and recycling (SparseVLM's recycled tokens, VisionDrop's contextual tokens): instead of bare kept positions,
``select_stage`` may return a :class:`Recycled` for an image. Its extra tokens are appended right after the image's
kept tokens; each stands at the place of a REPRESENTATIVE token that was not kept (that token's prompt index: its
position under KEEP, incl. the M-RoPE rows on Qwen, its padding-mask column and its image); under REINDEX the loop
numbers it right after the token before it. Any output token (kept or extra) may get a new hidden state, a weighted
sum of the image's current hidden states (the input of the first pruned layer). The loop applies the same mix on
``use_cache=False`` replays, so cached and uncached generation agree; later stages treat extra tokens as ordinary
visual tokens of their image; ``handle.last`` counts them as ``n_merged``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from tokenprune.budget import Keep
from tokenprune.functional._ranking import top_k_indices
from tokenprune.methods.base import PruningMethod

POSITIONS = ("keep", "reindex")


@dataclass(frozen=True)
class StagePlan:
    """One pruning point. ``layer``: first decoder layer (0-based) that receives the reduced sequence;
    ``score_layer``: the layer whose INPUT hidden states (and weights) give the scores, ``<= layer``."""

    layer: int
    score_layer: int


@dataclass(frozen=True)
class Recycled:
    """One image's choice at one stage when tokens are merged or recycled (positions among the image's slots).

    ``kept`` ``[k]`` sorted: tokens kept in place. ``extra`` ``[m]``: representatives (not kept) of the tokens
    appended after the kept ones, in this order. ``mixed`` ``[r]``: output tokens (``0..k-1`` the kept ones in
    order, ``k..k+m-1`` the extra ones) whose hidden state is replaced by ``weights[i] @ hidden[image slots]``
    (``weights`` ``[r, n]`` fp32); an extra token not in ``mixed`` is a copy of its representative.
    """

    kept: torch.Tensor
    extra: torch.Tensor
    mixed: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def merge_groups(cls, kept: torch.Tensor, extra: torch.Tensor, groups: list[tuple[int, torch.Tensor, torch.Tensor]],
                     n: int) -> Recycled:
        """From ``(output token, member positions, member weights)`` triples over ``n`` image slots."""
        weights = torch.zeros(len(groups), n, dtype=torch.float32)
        for i, (_, members, w) in enumerate(groups):
            weights[i].index_add_(0, members.cpu().long(), w.cpu().float())
        mixed = torch.tensor([t for t, _, _ in groups], dtype=torch.long)
        return cls(kept.cpu().long(), extra.cpu().long(), mixed, weights)


class RowSignals(Protocol):
    """What a decoder method may look at for one batch row at one stage. Slots index the row's CURRENT sequence
    (padding included, ``valid`` False there); every attention is recomputed for just the rows asked for
    (``patches/attention_rows.py``): softmax in fp32 over all keys, causal and padding masked."""

    valid: torch.Tensor   # [N] bool
    last: int             # slot of the last prompt token
    hidden: torch.Tensor  # [N, D] input of the pruning layer (output of layer ``plan.layer - 1``)

    def attention(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[H, R, N]`` attention of the score layer for query slots ``rows`` (default: the last prompt token)."""
        ...

    def text_after(self) -> torch.Tensor:
        """Slots of the valid non-visual tokens after the row's last visual token (question + template)."""
        ...

    def keys(self) -> torch.Tensor:
        """``[H_kv, N, d_h]`` post-RoPE keys of the score layer (its ``k_proj`` of the normed input, RoPE applied)."""
        ...

    batch_index: int          # the row's place in the batch
    source_row: int           # the caller's prompt row it repeats (``generate`` repeats rows for beams/samples)
    index: torch.Tensor       # [N] prompt index of every slot (an extra token: its representative's)
    embeddings: torch.Tensor  # [n, D] the row's LLM INPUT embeddings (layer 0), over the whole prompt, by prompt index
    visual_prompt: torch.Tensor  # [n] bool: visual tokens of the prompt (by prompt index)

    # Optional extras (patches/decoder_select.py ``Row``): ``token_index`` / ``image_local`` ``[N]`` (position in
    # the unpadded prompt / among the image's original tokens), ``accumulated`` ``[N]`` (see ``observe``),
    # ``attention_at(layer, rows)`` ``[H, R, N]`` as ``attention`` at a layer of ``DecoderMethod.attention_layers``,
    # ``keys()`` ``[H_kv, N, d_h]`` post-RoPE keys of the score layer, ``normed_hidden()`` ``[N, D]`` (final norm),
    # ``attention_no_rope(keys, rows)`` ``[H, R, K]``, ``coords`` ``[N, 2]`` (row, column) in the image or -1.


@dataclass
class DecoderMethod(PruningMethod):
    """Base of the decoder-stage methods."""

    stage: ClassVar[str] = "decoder"
    positions: ClassVar[str] = "keep"
    # False: a stage may keep a data-dependent number of an image's tokens (FEATHER's uniform grid, ToDRE's
    # all-or-nothing drop); ``counts`` is then the budget handed to ``select_stage`` (and ``k >= n`` skips the stage)
    exact_counts: ClassVar[bool] = True
    # The option that sets the pruning layers (named in the error when they do not exist on the model).
    layer_option: ClassVar[str] = "layers"

    def plan(self, n_layers: int) -> tuple[StagePlan, ...]:
        raise NotImplementedError

    def check_layers(self, n_layers: int, family: str | None = None) -> tuple[StagePlan, ...]:
        """The plan, validated against the model's depth: a clear error (method, family, layers asked, layers
        available, the option to set) at enable time, never a silent no-op or a move to another layer."""
        plan = self.plan(n_layers)
        last = -1
        for p in plan:
            if not (0 <= p.score_layer <= p.layer < n_layers and p.layer >= 1) or p.layer <= last:
                option = self.layer_option
                value = getattr(self, option, None)
                default = next((f.default for f in dataclasses.fields(self) if f.name == option), None)
                asked = "the paper's default" if value == default else f"{option}={value!r}"
                model = f"the {family!r} model's" if family else "the model's"
                scored = [q.score_layer for q in plan]
                raise ValueError(
                    f"{self.name}: pruning layers {[p.layer for p in plan]} (scored at {scored}; "
                    f"{asked}) do not exist in {model} {n_layers}-layer language model (layers 0..{n_layers - 1}, "
                    f"prunable 1..{n_layers - 1}); set {option}= to increasing layers that exist on this model"
                )
            last = p.layer
        return plan

    def counts(self, n: int, keep: Keep, n_layers: int) -> list[int]:
        """Kept visual tokens of one image (``n`` entering the LLM) after each stage of the plan."""
        raise NotImplementedError

    def stage_count(self, stage: int, n: int, current: int, keep: Keep, n_layers: int) -> int:
        """Budget of stage ``stage`` for an image of ``n`` tokens entering the LLM of which ``current`` are left
        (default: ``counts(n, ...)[stage]``; FEATHER's stage 2 is a share of the tokens stage 1 left)."""
        return self.counts(n, keep, n_layers)[stage]

    def attention_layers(self, plan: tuple[StagePlan, ...]) -> tuple[int, ...]:
        """Layers besides the score layers whose attention rows :meth:`select_stage` reads with the row's
        ``attention_at(layer, rows)``, given the plan as it runs on the model (default none; CATP: the layer before
        its first score layer). Each must come before the plan's first pruned layer (one slot layout)."""
        return ()

    def observed_layers(self, n_layers: int) -> tuple[int, ...]:
        """Layers whose attention and MLP sublayers :meth:`observe` sees during a selecting prefill (default none)."""
        return ()

    def observe(self, layer: int, part: str, x: torch.Tensor, out: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, M]`` per-slot increment of the row's ``accumulated`` signal from sublayer ``part`` (``"attn"`` or
        ``"mlp"``) of ``layer``: its input ``x`` (after the norm) and output ``out`` (before the residual add),
        ``[B, M, D]``; ``valid`` ``[B, M]`` marks real tokens. Accumulated slots follow every pruning."""
        raise NotImplementedError

    def sparse_ffn(self) -> bool:
        """True: the decode computes each decoder layer's FFN on per-prompt core neurons (``patches/sparse_ffn.py``
        calls :meth:`ffn_core` and :meth:`ffn_signal` during the pruning prefill). Default False: dense FFN."""
        return False

    def ffn_core(self, layer: int, act: torch.Tensor) -> torch.Tensor | None:
        """Sorted FFN neurons of ``layer`` that decoding a prompt computes, from the prefill's intermediate FFN
        activations ``act`` ``[M, I]`` of the prompt row's valid tokens at that layer; None: all (dense)."""
        return None

    def ffn_signal(self, layer: int, act: torch.Tensor, valid: torch.Tensor,
                   core: torch.Tensor | None) -> torch.Tensor | None:
        """``[M]`` per-slot increment of the row's ``accumulated`` signal from ``layer``'s FFN activations ``act``
        ``[M, I]`` (every slot, ``valid`` ``[M]`` marks real tokens) and :meth:`ffn_core`'s answer; None: nothing."""
        return None

    def scores(self, stage: int, row: RowSignals) -> torch.Tensor:
        """``[N]`` importance of every slot of the row (only visual slots are read)."""
        raise NotImplementedError

    def select_stage(
        self, stage: int, row: RowSignals, images: list[tuple[torch.Tensor, int]]
    ) -> list[torch.Tensor | Recycled]:
        """Per image ``(visual slots [n_i], k_i)``: kept positions among those slots (sorted, ``torch.long``), or a
        :class:`Recycled` (``k_i`` kept plus extra tokens). Default: top-``k_i`` of :meth:`scores` within each
        image, ties to the lowest index."""
        scores = self.scores(stage, row)
        return [top_k_indices(scores[slots], k) for slots, k in images]
