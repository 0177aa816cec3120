"""One stage of a decoder-stage selection: per-row signals, the method's choice, the new padded layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenprune.patches.attention_rows import attention_rows, attention_rows_no_rope, layer_keys

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
    """:class:`~tokenprune.methods.decoder.RowSignals` of one batch row, computed lazily and cached.

    Optional extras (``None`` when the loop does not provide them): ``norm`` the language model's final norm
    (:meth:`normed_hidden`), ``token_index`` ``[N]`` each slot's position in the unpadded prompt, ``image_local``
    ``[N]`` each slot's index among its image's tokens entering the LLM (-1 for text), ``coords`` ``[N, 2]`` each
    slot's ``(row, column)`` within its image (-1 unknown: ``patches/decoder_grids.py``), ``accumulated`` ``[N]``
    a per-token sum the method collected with :meth:`~tokenprune.methods.decoder.DecoderMethod.observe`.
    """

    def __init__(self, layer: torch.nn.Module, inputs: tuple, b: int, h: torch.Tensor, valid: torch.Tensor,
                 visual: torch.Tensor, *, norm: torch.nn.Module | None = None,
                 token_index: torch.Tensor | None = None, image_local: torch.Tensor | None = None,
                 coords: torch.Tensor | None = None, accumulated: torch.Tensor | None = None,
                 rotary: torch.nn.Module | None = None):
        self._layer, self._b = layer, b
        self._norm, self._rotary = norm, rotary
        self.token_index, self.image_local, self.accumulated = token_index, image_local, accumulated
        self.coords = coords
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
                self._rows["keys"] = layer_keys(self._layer, self._h_in, cos, sin)[0]
        return self._rows["keys"]

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
    for b in range(batch):
        images = []
        for m in range(int(of[b].max()) + 1):
            slots = (of[b] == m).nonzero().squeeze(1)
            n_original = int((call.image_of[b] == m).sum())
            k = loop.method.stage_count(s, n_original, slots.numel(), loop.keep, loop.n_layers)
            images.append((slots, min(k, slots.numel())))
        if all(k >= slots.numel() for slots, k in images):
            continue
        row = Row(loop.layers[plan.score_layer], inputs, b, h, call.valid[b], of[b] >= 0, **_extras(loop, call, b))
        chosen = loop.method.select_stage(s, row, images)
        exact = loop.method.exact_counts
        for (slots, k), kept in zip(images, chosen, strict=True):
            bad = kept.numel() != k if exact else kept.numel() > slots.numel()
            if bad or (kept.numel() and (int(kept.max()) >= slots.numel() or bool((kept[1:] <= kept[:-1]).any()))):
                raise RuntimeError(f"{loop.method.name}: stage {s} returned {kept.numel()} of {slots.numel()} "
                                   f"slots (expected {k if exact else 'at most ' + str(slots.numel())} sorted, "
                                   f"unique valid indices)")
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


def _extras(loop: Any, call: Any, b: int) -> dict[str, Any]:
    """The optional :class:`Row` signals of row ``b`` in the call's current layout."""
    n = call.n
    unpadded = call.mask2d[b, :n].long().cumsum(0) - 1
    of = call.image_of[b]
    starts = {}
    for m in range(int(of.max()) + 1):
        starts[m] = int((of == m).nonzero().min())
    start = torch.tensor([starts.get(int(m), 0) for m in of.tolist()], device=of.device)
    local = torch.where(of >= 0, torch.arange(of.shape[0], device=of.device) - start, -1)
    index = call.index[b]
    accum, coords = getattr(call, "accum", None), getattr(call, "coords", None)
    return {
        "norm": getattr(loop.lm, "norm", None),
        "token_index": unpadded.gather(0, index).masked_fill(~call.valid[b], -1),
        "image_local": local.gather(0, index).masked_fill(~call.valid[b], -1),
        "coords": None if coords is None else coords[b].gather(0, index[:, None].expand(-1, 2)),
        "accumulated": None if accum is None else accum[b],
        "rotary": loop.lm.rotary_emb if loop.model.config.model_type in ("llava", "llava_next") else None,
    }
