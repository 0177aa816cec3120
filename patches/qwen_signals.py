"""Signals of Qwen2-VL / Qwen2.5-VL vision towers, computed by hooks around one ``visual`` forward.

Qwen's ViT has no [CLS] token; what it can give (semantics in ``tokenprune/methods/base.py``):

* ``attention_received`` of block ``l``: recomputed from the block's attention input (``qkv`` + vision RoPE, fp32
  softmax), inside the attention segments the block really uses (frames for full-attention blocks, windows for
  Qwen2.5-VL's windowed blocks), in query chunks so that no full ``[H, S, S]`` map is ever held; per token: mean
  over heads and over the query rows of its segment (its frame in a full-attention block -- the blocks HiPrune and
  HoloV read -- or its window in a windowed one).
* ``vision_hidden`` of block ``l``: the block's output.

Both are then averaged over the 4 rows of each 2x2 merge unit and, for Qwen2.5-VL, un-permuted from window order to
raster order (``argsort(window_index)``), giving one value per merged (LLM) token, in the order of the placeholders.
``layer=None`` means the last block (the one the merger reads).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from tokenprune.methods import ATTENTION_RECEIVED, VISION_HIDDEN, SignalRequest

QWEN_SIGNALS = frozenset({ATTENTION_RECEIVED, VISION_HIDDEN})
_CHUNK_ELEMENTS = 1 << 24  # query rows per chunk x keys x heads held in fp32 at once (64 MiB)


class QwenProbe:
    """``with QwenProbe(visual, requests, grid_thw) as probe: visual(...)``, then ``probe.per_item()``."""

    def __init__(self, visual: torch.nn.Module, requests: list[SignalRequest], grid_thw: torch.Tensor):
        self.visual, self.grid_thw = visual, grid_thw
        self.requests = [r for r in requests if r.name in QWEN_SIGNALS]
        self.blocks = visual.blocks
        self.store: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _block_index(self, layer: int | None) -> int:
        n = len(self.blocks)
        index = n - 1 if layer is None else (layer if layer >= 0 else n + layer)
        if not 0 <= index < n:
            raise ValueError(f"vision layer {layer} does not exist: this Qwen ViT has {n} blocks")
        return index

    def __enter__(self) -> QwenProbe:
        for request in self.requests:
            block = self.blocks[self._block_index(request.layer)]
            if request.name == ATTENTION_RECEIVED:
                self._handles.append(block.attn.register_forward_pre_hook(self._received_hook(request.key),
                                                                          with_kwargs=True))
            else:
                self._handles.append(block.register_forward_hook(self._hidden_hook(request.key)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _hidden_hook(self, key: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self.store[key] = hidden.detach().float()  # [S, Dv] in the tower's (window) order

        return hook

    def _received_hook(self, key: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [S, Dv], after norm1
            cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            cos, sin = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[2]
            self.store[key] = _attention_received(module, hidden, cu_seqlens, cos, sin)

        return hook

    # --- results --------------------------------------------------------------------------------------------------
    def per_item(self) -> list[dict[str, torch.Tensor]]:
        """One dict per image/video of the call: ``{signal key: [N_merged] or [N_merged, Dv]}`` in raster order."""
        if not self.requests:
            return [{} for _ in self.grid_thw]
        merge = self.visual.spatial_merge_size
        unit = merge * merge
        reverse = None
        if hasattr(self.visual, "window_size"):  # Qwen2.5-VL: rows are in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                self.grid_thw, spatial_merge_size=merge, window_size=self.visual.window_size,
                patch_size=self.visual.patch_size,
            )
            reverse = torch.argsort(window_index)
        sizes = (self.grid_thw.prod(-1) // unit).tolist()
        items: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
        for request in self.requests:
            values = self.store[request.key]
            merged = values.reshape(values.shape[0] // unit, unit, *values.shape[1:]).mean(dim=1)
            if reverse is not None:
                merged = merged[reverse.to(merged.device)]
            for item, part in zip(items, torch.split(merged, sizes), strict=True):
                item[request.key] = part
        return items


def _attention_received(
    attn: torch.nn.Module, hidden: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``[S]``: per key row, the attention it receives, mean over heads and over the query rows of its segment."""
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    length = hidden.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotary(q, k, cos, sin)
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [H, S, d]
        received = torch.zeros(length, dtype=torch.float32, device=hidden.device)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            keys = k[:, start:end]
            rows = max(1, _CHUNK_ELEMENTS // (attn.num_heads * (end - start)))
            for lo in range(start, end, rows):
                scores = (q[:, lo:min(lo + rows, end)] @ keys.transpose(-1, -2)) * attn.scaling
                received[start:end] += torch.softmax(scores, dim=-1).sum(dim=(0, 1))
    sizes = torch.diff(cu_seqlens.to(torch.long)).to(hidden.device)
    return received / (attn.num_heads * sizes.repeat_interleave(sizes).float())
