"""One stage of a decoder-stage selection: per-row signals, the method's choice, the new padded layout.

Merged and recycled tokens (:class:`~tokenprune.methods.decoder_base.Recycled`): an extra token is a slot of the new
layout whose prompt ``index`` is its representative's (``extra`` True there), placed right after its image's kept
tokens; ``mixes`` say which new slots get a weighted sum of the previous layout's hidden states. Under REINDEX every
slot's new position is its predecessor's plus one, so ``removed`` (original position minus new position) and
``shift`` count dropped tokens minus extra ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.compaction import padding_side
from tokenprune.methods.decoder_base import Recycled
from tokenprune.patches.attention_rows import attention_rows, attention_rows_no_rope, layer_keys, pre_rope_keys
from tokenprune.patches.decoder_masks import visible


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
    extra: torch.Tensor | None = None  # [B, M] bool: merged/recycled extra tokens (``Recycled``), None if none
    # (row, new slots [r], previous slots [n], weights [r, n] fp32): new hidden = weights @ previous hidden
    mixes: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def apply_mixes(h: torch.Tensor, previous: torch.Tensor, mixes: list) -> torch.Tensor:
    """``h`` (the gathered new layout) with the mixed slots replaced by weighted sums of ``previous`` hidden states."""
    if not mixes:
        return h
    h = h.clone()
    for b, dst, src, weights in mixes:
        h[b, dst] = (weights.to(h.device) @ previous[b, src].float()).to(h.dtype)
    return h


def gather(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, L, ...]`` at ``slots`` ``[B, M]`` -> ``[B, M, ...]``."""
    return x.gather(1, slots.reshape(*slots.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


class Row:
    """:class:`~tokenprune.methods.decoder_base.RowSignals` of one batch row, computed lazily and cached.

    Optional extras (``None`` when the loop does not provide them): ``norm`` the language model's final norm
    (:meth:`normed_hidden`), ``token_index`` ``[N]`` each slot's position in the unpadded prompt, ``image_local``
    ``[N]`` each slot's index among its image's tokens entering the LLM (-1 for text), ``coords`` ``[N, 2]`` each
    slot's ``(row, column)`` within its image (-1 unknown: ``patches/decoder_grids.py``), ``accumulated`` ``[N]``
    a per-token sum the method collected with :meth:`~tokenprune.methods.decoder_base.DecoderMethod.observe`,
    ``visibility`` ``(window, blocks [N] or None)`` the score layer's own mask rule (per-layer masks: Gemma 3).
    """

    def __init__(self, layer: torch.nn.Module, inputs: tuple, b: int, h: torch.Tensor, valid: torch.Tensor,
                 visual: torch.Tensor, call: Any = None, *, norm: torch.nn.Module | None = None,
                 token_index: torch.Tensor | None = None, image_local: torch.Tensor | None = None,
                 coords: torch.Tensor | None = None, accumulated: torch.Tensor | None = None,
                 rotary: Any = None, visibility: tuple | None = None, layers: Any = None,
                 read_at: dict | None = None):
        self._layer, self._b, self._layers, self._read_at = layer, b, layers, read_at or {}
        self._norm, self._rotary = norm, rotary
        self.token_index, self.image_local, self.accumulated = token_index, image_local, accumulated
        self.coords, self._visibility = coords, visibility
        h_in, cos, sin = inputs
        self._h_in = h_in[b:b + 1]
        self._cos = cos[b:b + 1] if cos.shape[0] > 1 else cos
        self._sin = sin[b:b + 1] if sin.shape[0] > 1 else sin
        self.valid = valid
        self.hidden = h[b]
        self._visual = visual
        self.last = int(valid.nonzero().max())
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}
        self._call = call
        self.batch_index = b
        sources = getattr(call, "source_rows", None) or h.shape[0]
        self.source_row = b // (h.shape[0] // sources) if h.shape[0] % sources == 0 else b
        if call is not None:
            self.index = call.index[b]
            self.visual_prompt = call.image_of[b] >= 0

    def _allowed(self, rows: torch.Tensor) -> torch.Tensor | None:
        """``[1, R, N]`` keys the query slots ``rows`` see under the score layer's own rule, or None (causal)."""
        if self._visibility is None:
            return None
        window, blocks = self._visibility
        slots = torch.arange(self.valid.shape[0], device=rows.device)[None]
        coords = self.index[None].to(rows.device)
        query_blocks = None if blocks is None else blocks[rows][None]
        return visible(slots, coords, self.valid[None], None if blocks is None else blocks[None], rows[None],
                       coords[:, rows], query_blocks, window)

    @property
    def embeddings(self) -> torch.Tensor:
        return self._call.embeds[self._b]

    def attention(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.tensor([self.last]) if rows is None else rows.reshape(-1)
        key = tuple(rows.tolist())
        if key not in self._rows:
            rows = rows.to(self._h_in.device)
            out = attention_rows(self._layer, self._h_in, rows[None], self._cos, self._sin, self.valid[None],
                                 allowed=self._allowed(rows), keys=self._pre_rope_keys())
            self._rows[key] = out[0]
        return self._rows[key]

    def attention_at(self, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[H, R, N]`` as :meth:`attention`, at ``layer`` (one of the method's ``attention_layers``, whose input the
        loop kept; same slots as the score layer's)."""
        layer = self._read_at.get(layer, layer)
        inputs = getattr(self._call, "inputs", {}).get(layer)
        if inputs is None or self._layers is None or inputs[0].shape[1] != self._h_in.shape[1]:
            raise RuntimeError(f"the decoder loop kept no input of layer {layer} in this layout; a method lists the "
                               f"layers it reads in DecoderMethod.attention_layers")
        rows = torch.tensor([self.last]) if rows is None else rows.reshape(-1)
        key = ("at", layer, tuple(rows.tolist()))
        if key not in self._rows:
            h_in, cos, sin = inputs
            b = self._b
            cos = cos[b:b + 1] if cos.shape[0] > 1 else cos
            sin = sin[b:b + 1] if sin.shape[0] > 1 else sin
            out = attention_rows(self._layers[layer], h_in[b:b + 1], rows.to(h_in.device)[None], cos, sin,
                                 self.valid[None])
            self._rows[key] = out[0]
        return self._rows[key]

    def keys(self) -> torch.Tensor:
        """``[H_kv, N, d_h]`` post-RoPE keys of the score layer. Llama family (``rotary`` given): rotated at the
        positions of the unpadded prompt (``token_index``, what ``generate`` uses), so a left-padded ``forward``
        without ``position_ids`` gives the keys the row has alone; Qwen: the layer's own M-RoPE positions."""
        if "keys" not in self._rows:
            cos, sin = self._cos, self._sin
            with torch.no_grad():
                if self._rotary is not None and self.token_index is not None:
                    pos = self.token_index.clamp(min=0)[None].to(self._h_in.device)
                    cos, sin = self._rotary(self._h_in, pos)
                self._rows["keys"] = layer_keys(self._layer, self._h_in, cos, sin, keys=self._pre_rope_keys())[0]
        return self._rows["keys"]

    def _pre_rope_keys(self) -> torch.Tensor:
        """``[1, H_kv, N, d_h]`` keys of the score layer before RoPE, computed once for :meth:`attention` (every row
        set) and :meth:`keys` (one ``k_proj`` over the sequence per stage, not one per call)."""
        if "pre_rope_keys" not in self._rows:
            with torch.no_grad():
                self._rows["pre_rope_keys"] = pre_rope_keys(self._layer, self._h_in)
        return self._rows["pre_rope_keys"]

    def normed_hidden(self) -> torch.Tensor:
        """``[N, D]`` :attr:`hidden` through the language model's final norm (DART's similarity space)."""
        if self._norm is None:
            raise RuntimeError("this decoder loop provides no final norm")
        if "normed" not in self._rows:
            with torch.no_grad():
                self._rows["normed"] = self._norm(self.hidden)
        return self._rows["normed"]

    def attention_no_rope(self, keys: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[H, R, |keys|]`` fp32 attention of query slots ``rows`` (default: the last prompt token) over the key
        slots ``keys`` ONLY, without rotary embeddings (FEATHER's scoring)."""
        rows = torch.tensor([self.last]) if rows is None else rows.reshape(-1)
        key = ("no_rope", tuple(rows.tolist()), tuple(keys.tolist()))
        if key not in self._rows:
            dev = self._h_in.device
            self._rows[key] = attention_rows_no_rope(self._layer, self._h_in, rows.to(dev)[None], keys.to(dev)[None])[0]
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
    extras: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(batch)]  # per row: (anchor slot, extra slots)
    pending: list[tuple] = []  # (row, mixed output slots, their extra flags, image slots, weights)
    for b in range(batch):
        images = []
        for m in range(int(of[b].max()) + 1):
            slots = (of[b] == m).nonzero().squeeze(1)
            n_original = int((call.image_of[b] == m).sum())
            k = loop.method.stage_count(s, n_original, slots.numel(), loop.keep, loop.n_layers)
            images.append((slots, min(k, slots.numel())))
        if all(k >= slots.numel() for slots, k in images):
            continue
        row = Row(loop.layers[plan.score_layer], inputs, b, h, call.valid[b], of[b] >= 0, call,
                  **_extras(loop, call, b, plan.score_layer))
        chosen = loop.method.select_stage(s, row, images)
        exact = loop.method.exact_counts
        for (slots, k), choice in zip(images, chosen, strict=True):
            kept = choice.kept if isinstance(choice, Recycled) else choice
            bad = kept.numel() != k if exact else kept.numel() > slots.numel()
            if bad or (kept.numel() and (int(kept.max()) >= slots.numel() or bool((kept[1:] <= kept[:-1]).any()))):
                raise RuntimeError(f"{loop.method.name}: stage {s} returned {kept.numel()} of {slots.numel()} "
                                   f"slots (expected {k if exact else 'at most ' + str(slots.numel())} sorted, "
                                   f"unique valid indices)")
            kept = kept.to(slots.device)
            keep[b, slots] = False
            keep[b, slots[kept]] = True
            if isinstance(choice, Recycled):
                extra = choice.extra.to(slots.device)
                if extra.numel() and (bool(torch.isin(extra, kept).any()) or extra.unique().numel() != extra.numel()):
                    raise RuntimeError(f"{loop.method.name}: stage {s}: extra tokens must stand for distinct tokens "
                                       f"that were not kept")
                anchor = int(slots[kept].max()) if kept.numel() else int(slots.min()) - 1
                extras[b].append((anchor, slots[extra]))
                out = torch.cat([slots[kept], slots[extra]])  # previous slots of the output tokens, in order
                out_extra = torch.arange(out.numel(), device=out.device) >= kept.numel()
                mixed = choice.mixed.to(out.device)
                pending.append((b, out[mixed], out_extra[mixed], slots, choice.weights))
    dropped = call.valid & ~keep
    if not bool(dropped.any()):
        return None
    n_extra = torch.tensor([sum(e.numel() for _, e in row) for row in extras], device=h.device)
    new_len = int((keep.sum(1) + n_extra).max())
    left = padding_side(call.mask2d[:, : call.n].long()) == "left"
    slots = torch.zeros(batch, new_len, dtype=torch.long, device=h.device)
    valid = torch.zeros(batch, new_len, dtype=torch.bool, device=h.device)
    is_extra = torch.zeros(batch, new_len, dtype=torch.bool, device=h.device)
    for b in range(batch):
        idx, flag = _ordered(keep[b], extras[b])
        dst = slice(new_len - idx.numel(), new_len) if left else slice(0, idx.numel())
        slots[b, dst], valid[b, dst], is_extra[b, dst] = idx, True, flag
    before = dropped.long().cumsum(1) - dropped.long()  # dropped prompt tokens before each slot (exclusive)
    removed = (call.removed + before).gather(1, slots)
    if bool(is_extra.any()):
        removed = _removed_with_extras(call, removed, slots, valid, is_extra)
    old_extra = call.extra.gather(1, slots) if getattr(call, "extra", None) is not None else torch.zeros_like(valid)
    mixes = []
    for b, out, out_extra, image_slots, weights in pending:
        # new slot of each mixed output token: the first valid slot with its previous slot and extra flag
        match = (slots[b] == out[:, None]) & (is_extra[b] == out_extra[:, None]) & valid[b]  # [r, new_len]
        mixes.append((b, match.int().argmax(dim=1), image_slots, weights.float()))
    return Stage(
        layer=plan.layer, slots=slots, prev_len=length, index=call.index.gather(1, slots), valid=valid,
        removed=removed, shift=call.shift + dropped.long().sum(1) - n_extra,
        extra=(old_extra & valid) | is_extra if bool(is_extra.any() or old_extra.any()) else None, mixes=mixes,
    )


def _ordered(keep: torch.Tensor, extras: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous slots of one row's new layout in order (extra tokens right after their anchor slot) and the
    extra flags."""
    kept = keep.nonzero().squeeze(1)
    if not extras:
        return kept, torch.zeros_like(kept, dtype=torch.bool)
    width = max(e.numel() for _, e in extras) + 1
    keys = [kept * width]
    for anchor, e in extras:
        keys.append(anchor * width + torch.arange(1, e.numel() + 1, device=kept.device))
    order = torch.sort(torch.cat(keys), stable=True).indices
    idx = torch.cat([kept, *[e for _, e in extras]])[order]
    flag = torch.cat([torch.zeros_like(kept, dtype=torch.bool),
                      *[torch.ones_like(e, dtype=torch.bool) for _, e in extras]])[order]
    return idx, flag


def _removed_with_extras(call: Any, removed: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor,
                         is_extra: torch.Tensor) -> torch.Tensor:
    """REINDEX offsets when extra tokens were inserted: each extra token is numbered right after the slot before
    it, and every later slot moves up by one per extra token before it."""
    index = call.index.gather(1, slots)
    original = call.pos.gather(1, index) if call.pos is not None else index
    new_pos = original - removed + (is_extra & valid).long().cumsum(1) - (is_extra & valid).long()
    for b, j in (is_extra & valid).nonzero().tolist():
        prev = valid[b, :j].nonzero()
        new_pos[b, j] = (new_pos[b, int(prev[-1])] if prev.numel() else -1) + 1
    return original - new_pos


def _extras(loop: Any, call: Any, b: int, score_layer: int) -> dict[str, Any]:
    """The optional :class:`Row` signals of row ``b`` in the call's current layout."""
    n = call.n
    unpadded = call.mask2d[b, :n].long().cumsum(0) - 1
    of = call.image_of[b]
    slot = torch.arange(of.shape[0], device=of.device)
    image = of >= 0
    # first prompt index of every image (one scatter, no loop over tokens)
    starts = torch.full((int(of.max()) + 1 if bool(image.any()) else 1,), of.shape[0], device=of.device)
    starts = starts.scatter_reduce(0, of[image], slot[image], "amin")
    local = torch.where(image, slot - starts[of.clamp(min=0)], -1)
    index = call.index[b]
    accum, coords = getattr(call, "accum", None), getattr(call, "coords", None)
    return {
        "norm": getattr(loop.lm, "norm", None),
        "token_index": unpadded.gather(0, index).masked_fill(~call.valid[b], -1),
        "image_local": local.gather(0, index).masked_fill(~call.valid[b], -1),
        "coords": None if coords is None else coords[b].gather(0, index[:, None].expand(-1, 2)),
        "accumulated": None if accum is None else accum[b],
        "rotary": loop.rotary_for(score_layer) if loop.one_d_positions else None,
        "visibility": _visibility(loop, call, b, score_layer),
        "layers": loop.layers,
        "read_at": getattr(loop, "attention_layers", None),
    }


def _visibility(loop: Any, call: Any, b: int, score_layer: int) -> tuple | None:
    """Row ``b``'s ``(window, blocks)`` at ``score_layer`` (per-layer masks only; blocks over the current slots)."""
    if not loop.per_layer:
        return None
    blocks = None
    if call.blocks is not None:
        blocks = call.blocks[b].to(call.index.device).gather(0, call.index[b]).masked_fill(~call.valid[b], -1)
    return loop.windows[score_layer], blocks
