"""One stage of a decoder-stage selection: per-row signals, the method's choice, the new padded layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenprune.patches.attention_rows import attention_rows

from tokenprune.compaction import padding_side


@dataclass
class Stage:
    """One pruning point of a selection. Slots are positions in a padded layout; pad slots have ``valid`` False."""

    layer: int
    slots: torch.Tensor     # [B, M] kept slots of the previous layout (length ``prev_len``)
    prev_len: int
    index: torch.Tensor     # [B, M] prompt index of each slot
    valid: torch.Tensor     # [B, M] bool
    removed: torch.Tensor   # [B, M] prompt tokens removed before each slot (REINDEX offsets)
    shift: torch.Tensor     # [B] prompt tokens removed in the row


def gather(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, L, ...]`` at ``slots`` ``[B, M]`` -> ``[B, M, ...]``."""
    return x.gather(1, slots.reshape(*slots.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


class Row:
    """:class:`~tokenprune.methods.decoder.RowSignals` of one batch row, computed lazily and cached."""

    def __init__(self, layer: torch.nn.Module, inputs: tuple, b: int, h: torch.Tensor, valid: torch.Tensor,
                 visual: torch.Tensor):
        self._layer, self._b = layer, b
        h_in, cos, sin = inputs
        self._h_in = h_in[b:b + 1]
        self._cos = cos[b:b + 1] if cos.shape[0] > 1 else cos
        self._sin = sin[b:b + 1] if sin.shape[0] > 1 else sin
        self.valid = valid
        self.hidden = h[b]
        self._visual = visual
        self.last = int(valid.nonzero().max())
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def attention(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.tensor([self.last]) if rows is None else rows.reshape(-1)
        key = tuple(rows.tolist())
        if key not in self._rows:
            rows = rows.to(self._h_in.device)
            out = attention_rows(self._layer, self._h_in, rows[None], self._cos, self._sin, self.valid[None])
            self._rows[key] = out[0]
        return self._rows[key]

    def text_after(self) -> torch.Tensor:
        slots = torch.arange(self.valid.shape[0], device=self.valid.device)
        last_visual = int(self._visual.nonzero().max()) if bool(self._visual.any()) else -1
        return slots[self.valid & ~self._visual & (slots > last_visual)]


def select_stage(loop: Any, s: int, h: torch.Tensor, call: Any) -> Stage | None:
    """Run stage ``s`` of ``loop.plan`` on the hidden states ``h`` ``[B, M, D]`` entering its first pruned layer;
    ``None`` when no row loses a token (then nothing changes: ``keep=1.0`` stays bit-identical)."""
    plan = loop.plan[s]
    inputs = call.inputs[plan.score_layer]
    batch, length = call.index.shape
    of = call.image_of.gather(1, call.index).masked_fill(~call.valid, -1)  # [B, M] image number per slot
    keep = call.valid.clone()
    for b in range(batch):
        images = []
        for m in range(int(of[b].max()) + 1):
            slots = (of[b] == m).nonzero().squeeze(1)
            n_original = int((call.image_of[b] == m).sum())
            k = loop.method.counts(n_original, loop.keep, loop.n_layers)[s]
            images.append((slots, min(k, slots.numel())))
        if all(k >= slots.numel() for slots, k in images):
            continue
        row = Row(loop.layers[plan.score_layer], inputs, b, h, call.valid[b], of[b] >= 0)
        chosen = loop.method.select_stage(s, row, images)
        for (slots, k), kept in zip(images, chosen, strict=True):
            if kept.numel() != k or (kept.numel() and int(kept.max()) >= slots.numel()):
                raise RuntimeError(f"{loop.method.name}: stage {s} returned {kept.numel()} of {slots.numel()} "
                                   f"slots (expected {k} valid indices)")
            keep[b, slots] = False
            keep[b, slots[kept.to(slots.device)]] = True
    dropped = call.valid & ~keep
    if not bool(dropped.any()):
        return None
    counts = keep.sum(1)
    new_len = int(counts.max())
    left = padding_side(call.mask2d[:, : call.n].long()) == "left"
    slots = torch.zeros(batch, new_len, dtype=torch.long, device=h.device)
    valid = torch.zeros(batch, new_len, dtype=torch.bool, device=h.device)
    for b in range(batch):
        idx = keep[b].nonzero().squeeze(1)
        dst = slice(new_len - idx.numel(), new_len) if left else slice(0, idx.numel())
        slots[b, dst], valid[b, dst] = idx, True
    before = dropped.long().cumsum(1) - dropped.long()  # dropped prompt tokens before each slot (exclusive)
    return Stage(
        layer=plan.layer, slots=slots, prev_len=length, index=call.index.gather(1, slots), valid=valid,
        removed=(call.removed + before).gather(1, slots), shift=call.shift + dropped.long().sum(1),
    )
