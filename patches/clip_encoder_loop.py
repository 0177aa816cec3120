"""Prune INSIDE a CLIP vision tower, layer by layer (``stage = "vision-encoder"`` methods: FlowCut on LLaVA-1.5).

:func:`encode_pruned` runs the tower's embeddings, pre-layernorm and encoder layers itself, one image at a time, up
to and including the feature layer. Each layer that may prune runs unchanged while forward hooks keep its attention
input (``layer_norm1`` output) and the key / value projections it computes; from them, in fp32 (the [CLS] query
from the module's own ``q_proj``) -- never from the kernel, which stays eager, sdpa or flash-attention -- come the
head-mean [CLS] row, the [CLS]-value semantic row and the L1 norms of the head-mean value vectors; the method keeps
some of the layer's OUTPUT patches ([CLS] always stays in front) and the hidden states, cumulative scores and
original-index map are gathered. The next layer therefore processes fewer tokens: a real encoder speed-up.

One image at a time: every image gets its own prune counts (the official code takes the max over the batch), so
an image pruned alone or in a batch keeps the same tokens and features.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.compute_dtype import compute_dtype
from tokenprune.methods import CLS_ATTENTION
from tokenprune.patches.clip_signals import attention_signals


def flow_signals(attention: torch.nn.Module, hidden: torch.Tensor, k: torch.Tensor | None = None,
                 v: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """FlowCut's inputs for the patches of one image from a CLIP attention module's input ``hidden`` ``[1, T, D]``
    ([CLS] at 0), fp32, each ``[T - 1]``: the head-mean [CLS] attention row (softmax over all T keys, patch
    columns), the head-mean of ``softmax_j(v_cls . v_j)`` per head (unscaled, over all T tokens, patch part) and
    the L1 norm of each patch's head-mean value vector. ``k`` / ``v`` ``[1, T, D]``: the module's own key / value
    projections of ``hidden`` when its forward computed them, else recomputed."""
    length, heads, head_dim = hidden.shape[1], attention.num_heads, attention.head_dim
    cls_row = attention_signals(attention, hidden, frozenset({CLS_ATTENTION}), k=k)[CLS_ATTENTION][0]  # [H, T]
    with torch.no_grad():
        v = (attention.v_proj(hidden) if v is None else v)[0].float().view(length, heads, head_dim).transpose(0, 1)
        semantic = torch.softmax(v[:, :1] @ v.transpose(-1, -2), dim=-1)[:, 0]  # [H, T]
        value_l1 = v.mean(dim=0).abs().sum(dim=-1)  # [T]
    return cls_row.mean(dim=0)[1:], semantic.mean(dim=0)[1:], value_l1[1:]


def _scored_forward(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``layer(hidden)`` and :func:`flow_signals` of it, from the attention input and the key / value projections
    the layer's forward computes anyway (kept by forward hooks for the one call, then removed)."""
    attention, seen = layer.self_attn, {}

    def keep(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            seen[name] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]) if name == "x" else output
        return hook

    handles = [module.register_forward_hook(keep(name), with_kwargs=True)
               for name, module in (("x", attention), ("k", attention.k_proj), ("v", attention.v_proj))]
    try:
        out = layer(hidden, None)
    finally:
        for handle in handles:
            handle.remove()
    return out, flow_signals(attention, seen["x"], k=seen["k"], v=seen["v"])


def encode_pruned(
    tower: torch.nn.Module, method: Any, pixel_values: torch.Tensor, feature_layer: int, budgets: list[int],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image ``(hidden [k_i, Dv], kept [k_i])``: the feature layer's output at the kept patches ([CLS] dropped,
    pre-projector) and their ORIGINAL patch indices, ascending. ``budgets[i]`` patches survive image ``i``;
    ``method.encoder_step`` (FlowCut: :func:`tokenprune.functional.flowcut_step`) decides after every layer
    ``0..feature_layer - 1`` with ``remaining = feature_layer - idx - 1`` layers left before the feature layer."""
    inner = getattr(tower, "vision_model", tower)
    layers = inner.encoder.layers
    dtype = compute_dtype(inner.embeddings)  # what CLIPVisionEmbeddings casts pixels to (never a quantized Linear)
    out = []
    with torch.no_grad():
        for b, k in enumerate(budgets):
            hidden = inner.pre_layrnorm(inner.embeddings(pixel_values[b:b + 1].to(dtype)))  # [1, T, Dv]
            index = torch.arange(hidden.shape[1] - 1, device=hidden.device)  # original index of each patch
            target, cumulative = k + 1, None
            for idx in range(feature_layer + 1):
                layer, remaining = layers[idx], feature_layer - idx - 1
                scoring = remaining >= 0 and hidden.shape[1] > target
                if not scoring:
                    hidden = layer(hidden, None)
                    continue
                hidden, signals = _scored_forward(layer, hidden)
                kept, cumulative = method.encoder_step(*signals, cumulative, hidden.shape[1], target, remaining)
                kept = kept.to(hidden.device)
                cumulative, index = cumulative[kept], index[kept]
                hidden = torch.cat([hidden[:, :1], hidden[:, 1 + kept]], dim=1)
            out.append((hidden[0, 1:], index.cpu()))
    return out
