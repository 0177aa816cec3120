"""Prune INSIDE a CLIP vision tower, layer by layer (``stage = "vision-encoder"`` methods: FlowCut on LLaVA-1.5).

:func:`encode_pruned` runs the tower's embeddings, pre-layernorm and encoder layers itself, one image at a time, up
to and including the feature layer. Before each layer that may prune it recomputes from the layer's attention input
(``layer_norm1`` output), in fp32 from the module's own ``q_proj/k_proj/v_proj`` -- never from the kernel, which
stays eager, sdpa or flash-attention -- the head-mean [CLS] row, the [CLS]-value semantic row and the L1 norms of
the head-mean value vectors; the layer runs unchanged; the method keeps some of the layer's OUTPUT patches ([CLS]
always stays in front) and the hidden states, cumulative scores and original-index map are gathered. The next
layer therefore processes fewer tokens: a real encoder speed-up.

One image at a time: every image gets its own prune counts (the official code takes the max over the batch), so
an image pruned alone or in a batch keeps the same tokens and features.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.compute_dtype import compute_dtype
from tokenprune.methods import CLS_ATTENTION
from tokenprune.patches.clip_signals import attention_signals


def flow_signals(attention: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """FlowCut's inputs for the patches of one image from a CLIP attention module's input ``hidden`` ``[1, T, D]``
    ([CLS] at 0), fp32, each ``[T - 1]``: the head-mean [CLS] attention row (softmax over all T keys, patch
    columns), the head-mean of ``softmax_j(v_cls . v_j)`` per head (unscaled, over all T tokens, patch part) and
    the L1 norm of each patch's head-mean value vector."""
    length, heads, head_dim = hidden.shape[1], attention.num_heads, attention.head_dim
    cls_row = attention_signals(attention, hidden, frozenset({CLS_ATTENTION}))[CLS_ATTENTION][0]  # [H, T]
    with torch.no_grad():
        v = attention.v_proj(hidden[0]).float().view(length, heads, head_dim).transpose(0, 1)  # [H, T, d_h]
        semantic = torch.softmax(v[:, :1] @ v.transpose(-1, -2), dim=-1)[:, 0]  # [H, T]
        value_l1 = v.mean(dim=0).abs().sum(dim=-1)  # [T]
    return cls_row.mean(dim=0)[1:], semantic.mean(dim=0)[1:], value_l1[1:]


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
                if scoring:
                    signals = flow_signals(layer.self_attn, layer.layer_norm1(hidden))
                hidden = layer(hidden, None)
                if not scoring:
                    continue
                kept, cumulative = method.encoder_step(*signals, cumulative, hidden.shape[1], target, remaining)
                kept = kept.to(hidden.device)
                cumulative, index = cumulative[kept], index[kept]
                hidden = torch.cat([hidden[:, :1], hidden[:, 1 + kept]], dim=1)
            out.append((hidden[0, 1:], index.cpu()))
    return out
