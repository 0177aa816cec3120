"""What the decoder loop (``patches/decoder_loop.py``) keeps: the selection a prefill made (reused by the calls on its
cache), the state of the call in progress, and the record of a selecting call (``handle.last``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.patches.decoder_select import Stage
from tokenprune.patches.deepstack_carry import DeepStack


@dataclass
class PrefillSelection:
    """A decoder-stage selection made at prefill and reused by the decode and replay calls on its cache (not the
    vision-stage :class:`tokenprune.methods.Selection`, which is one method's answer for one unit)."""

    ids: torch.Tensor       # [B, n] prompt ids the selection was made on
    stages: list[Stage]     # (attached to the KV cache the prefill wrote: patches/pruned_cache.py)
    ffn: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # layer -> each row's core FFN neurons
    mask: torch.Tensor | None = None  # [B, n] the prompt's padding mask (per-layer masks: decode calls' fallback)


@dataclass
class LayerRecord:
    """What one ``select`` call did (the adapter turns it into ``handle.last``)."""

    images: list[tuple[int, int, int, torch.Tensor, int]]  # (row, index_in_row, n, kept local indices, n_merged)
    tokens_per_layer: tuple[int, ...]
    visual_per_layer: tuple[int, ...]
    seq_len_before: int
    seq_len_after: int


@dataclass
class LoopCall:
    """One language-model call in progress: ``mode`` ``"select"`` (a prefill that selects), ``"decode"`` (a call
    on the cache a selection wrote) or ``"replay"`` (a ``use_cache=False`` step re-running the stored selection)."""

    mode: str
    q: int
    n: int
    mask2d: torch.Tensor            # [B, past + q] bool, layer-0 key coordinates
    pos: torch.Tensor | None        # [B, q] position ids of the call (REINDEX only)
    sel: PrefillSelection
    image_of: torch.Tensor | None = None   # [B, n] image number of each prompt token within its row, -1 text
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    index: torch.Tensor | None = None      # current layout (select)
    valid: torch.Tensor | None = None
    removed: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    extra: torch.Tensor | None = None      # [B, M] bool: merged/recycled extra slots of the current layout
    embeds: torch.Tensor | None = None     # [B, n, D] the LLM's input embeddings (layer 0 input)
    override: dict[str, Any] | None = None
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    counts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    accum: torch.Tensor | None = None      # [B, M] per-slot sum collected by ``method.observe`` (select)
    coords: torch.Tensor | None = None     # [B, n, 2] (row, column) of each token within its image, -1 unknown
    kv_len: int | None = None              # a static cache's per-layer key length (max_cache_len), else None
    source_rows: int | None = None         # rows of the caller's prompt (generate repeats them for beams/samples)
    deepstack: DeepStack | None = None     # Qwen3-VL maps still to be added, in the current layout (select, replay)
    blocks: torch.Tensor | None = None     # [B, n] bidirectional image block of each prompt token, -1 text (per-layer)


def call_images(call: LoopCall) -> list[tuple[int, int, int, torch.Tensor, int]]:
    """Per image of a finished ``select`` call: ``(row, index_in_row, n, kept local indices, n_merged)``."""
    out = []
    for b in range(call.image_of.shape[0]):
        of = call.image_of[b]
        extra = call.extra[b] if call.extra is not None else torch.zeros_like(call.valid[b])
        final = call.index[b][call.valid[b] & ~extra]
        merged = call.index[b][call.valid[b] & extra]
        for m in range(int(of.max()) + 1):
            members = (of == m).nonzero().squeeze(1)
            kept = torch.isin(members, final).nonzero().squeeze(1)
            n_merged = int(torch.isin(members, merged).sum())
            out.append((b, m, int(members.numel()), kept.cpu(), n_merged))
    return out


def call_positions(given: Any, batch: int, q: int, past: int, device: torch.device) -> torch.Tensor:
    """``[B, q]`` 1-D position ids of a call (REINDEX): the given ones, else ``past..past + q - 1``."""
    if given is None:
        return (torch.arange(q, device=device) + past).expand(batch, -1)
    if given.ndim == 3:  # Qwen rows; REINDEX never runs there, kept for completeness
        given = given[0]
    return given.expand(batch, -1)
