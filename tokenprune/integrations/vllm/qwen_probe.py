"""Qwen2-VL / Qwen2.5-VL ViT signals inside vLLM, as ``enable_pruning`` computes them (``patches/qwen_signals.py``).

* ``attention_received`` of block ``l``: from the query and key the block hands its attention backend (after the
  vision RoPE; a forward pre-hook on the block's ``MMEncoderAttention``), in fp32, softmax within the segments the
  block attends in -- frames for full-attention blocks, windows for Qwen2.5-VL's windowed blocks -- rebuilt here from
  the image grids (never from the backend's own ``cu_seqlens``, which FlashInfer rescales), so the value is the same
  whatever attention backend the ViT uses. Per token: mean over heads (summed across tensor-parallel ranks) and
  over the query rows of its segment.
* ``vision_hidden`` of block ``l``: the block's output.

Both are averaged over each 2x2 merge unit and, for Qwen2.5-VL, put back from window order into raster order, giving
one value per merged (LLM) token in placeholder order. ``layer=None`` is the last block.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.methods import ATTENTION_RECEIVED, VISION_HIDDEN, SignalRequest

QWEN_VLLM_SIGNALS = frozenset({ATTENTION_RECEIVED, VISION_HIDDEN})
_CHUNK_ELEMENTS = 1 << 24  # query rows per chunk x keys x heads held in fp32 at once (64 MiB)


class VllmQwenProbe:
    """``with VllmQwenProbe(visual, requests, grid_thw) as probe: visual(...)``, then ``probe.per_item()``."""

    def __init__(self, visual: torch.nn.Module, requests: list[SignalRequest], grid_thw: list[list[int]]):
        self.visual, self.grid = visual, [list(map(int, g)) for g in grid_thw]
        self.requests = [r for r in requests if r.name in QWEN_VLLM_SIGNALS]
        self.windowed = hasattr(visual, "get_window_index_thw")  # Qwen2.5-VL
        self.store: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def block_index(self, layer: int | None) -> int:
        n = len(self.visual.blocks)
        index = n - 1 if layer is None else (layer if layer >= 0 else n + layer)
        if not 0 <= index < n:
            raise ValueError(f"vision layer {layer} does not exist: this Qwen ViT has {n} blocks")
        return index

    def __enter__(self) -> VllmQwenProbe:
        for request in self.requests:
            index = self.block_index(request.layer)
            block = self.visual.blocks[index]
            if request.name == ATTENTION_RECEIVED:
                hook = self._received_hook(request.key, block.attn, self._segments(index))
                self._handles.append(block.attn.attn.register_forward_pre_hook(hook, with_kwargs=True))
            else:  # vLLM's compile wrapper calls ``block.forward`` directly (no module hooks): wrap the method
                self._handles.append(_ForwardTap(block, self._hidden_hook(request.key)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    # --- segments and order ---------------------------------------------------------------------------------------
    def _segments(self, block: int) -> list[int]:
        """Boundaries (patch rows, from 0) of the attention segments of ``block`` over the whole call."""
        full = not self.windowed or block in self.visual.fullatt_block_indexes
        bounds, start = [0], 0
        for t, h, w in self.grid:
            if full:
                bounds += [start + (i + 1) * h * w for i in range(t)]
            else:
                _, ends = self.visual.get_window_index_thw(t, h, w)
                bounds += [start + int(e) for e in ends.tolist()]
            start += t * h * w
        return bounds

    def _raster_order(self, item: int) -> torch.Tensor | None:
        if not self.windowed:
            return None
        window_index, _ = self.visual.get_window_index_thw(*self.grid[item])
        return torch.argsort(window_index)

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _hidden_hook(self, key: str) -> Any:
        def hook(output: torch.Tensor) -> None:
            self.store[key] = output.detach().reshape(output.shape[0], -1).float()  # [S, Dv] in the tower's order
        return hook

    def _received_hook(self, key: str, owner: torch.nn.Module, bounds: list[int]) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            q = (kwargs["query"] if "query" in kwargs else args[0])[0]  # [S, heads on this rank, d]
            k = (kwargs["key"] if "key" in kwargs else args[1])[0]
            self.store[key] = _received(owner, module.scale, q, k, bounds)
        return hook

    # --- results --------------------------------------------------------------------------------------------------
    def per_item(self) -> list[dict[str, torch.Tensor]]:
        """One dict per image of the call: ``{signal key: [N_merged] or [N_merged, Dv]}`` in raster order."""
        unit = self.visual.spatial_merge_size ** 2
        sizes = [t * h * w // unit for t, h, w in self.grid]
        items: list[dict[str, torch.Tensor]] = [{} for _ in sizes]
        for request in self.requests:
            if request.key not in self.store:
                raise RuntimeError(f"the Qwen ViT did not run block {request.layer} inside the probe ({request.key})")
            values = self.store[request.key]
            merged = values.reshape(values.shape[0] // unit, unit, *values.shape[1:]).mean(dim=1)
            for i, (item, part) in enumerate(zip(items, torch.split(merged, sizes), strict=True)):
                order = self._raster_order(i)
                item[request.key] = part if order is None else part[order.to(part.device)]
        return items


class _ForwardTap:
    """Calls ``hook(output)`` after each ``module.forward`` until ``remove()`` (an instance attribute over the
    class's method, so it works where vLLM's ``support_torch_compile`` wrapper bypasses module hooks)."""

    def __init__(self, module: torch.nn.Module, hook: Any) -> None:
        self.module, original = module, module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            hook(output)
            return output

        module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _received(
    owner: torch.nn.Module, scale: float, q: torch.Tensor, k: torch.Tensor, bounds: list[int]
) -> torch.Tensor:
    """``[S]``: per key row, the attention it receives, mean over ALL heads and over the query rows of its segment."""
    from vllm.distributed import tensor_model_parallel_all_reduce

    length, heads = q.shape[0], q.shape[1]
    with torch.no_grad():
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [h, S, d]
        received = torch.zeros(length, dtype=torch.float32, device=q.device)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            keys = k[:, start:end]
            rows = max(1, _CHUNK_ELEMENTS // (heads * (end - start)))
            for lo in range(start, end, rows):
                scores = (q[:, lo:min(lo + rows, end)] @ keys.transpose(-1, -2)) * scale
                received[start:end] += torch.softmax(scores, dim=-1).sum(dim=(0, 1))
    tp = getattr(owner, "tp_size", 1)
    if tp > 1:  # heads are split across the tensor-parallel ranks
        received = tensor_model_parallel_all_reduce(received)
    sizes = torch.diff(torch.tensor(bounds, dtype=torch.long)).to(q.device)
    return received / (heads * tp * sizes.repeat_interleave(sizes).float())
