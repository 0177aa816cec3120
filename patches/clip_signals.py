"""Signals of a CLIP-style vision tower (LLaVA-1.5, LLaVA-NeXT), computed only for what a method declared.

``ClipProbe`` is a context manager around one forward of the tower. For every layer a request names it installs a
forward pre-hook on that layer's attention module (attention rows, keys) and/or a forward hook on the layer
(hidden states), recomputes just what was asked from the module's own projections in fp32, and removes every hook
on exit. The tower keeps its attention kernel (eager, sdpa or flash-attention): nothing is read from the kernel
and ``output_attentions`` is never switched on. Semantics of each signal: ``tokenprune/methods/base.py``.

    with ClipProbe(tower, method.requests(), feature_layer) as probe:
        out = get_image_features(...)
    per_image = probe.per_image(drop_cls=strategy == "default")   # [{signal_key: tensor}, ...] per batch row
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tokenprune.methods.base import (
    ATTENTION_MAP,
    ATTENTION_RECEIVED,
    CLS_ATTENTION,
    CLS_ATTENTION_WIDE,
    CLS_HIDDEN,
    VISION_HIDDEN,
    VISION_KEYS,
    SignalRequest,
)

ATTENTION_SIGNALS = frozenset({CLS_ATTENTION, ATTENTION_RECEIVED, ATTENTION_MAP, VISION_KEYS, CLS_ATTENTION_WIDE})
OUTPUT_SIGNALS = frozenset({VISION_HIDDEN, CLS_HIDDEN})
PROBE_SIGNALS = ATTENTION_SIGNALS | OUTPUT_SIGNALS


def encoder_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    """``encoder.layers`` of a ``CLIPVisionModel`` (or of its inner ``vision_model``); ``encoder.layer`` of a
    BEiT-style tower (InternViT)."""
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers if hasattr(inner.encoder, "layers") else inner.encoder.layer


def layer_attention(layer: torch.nn.Module) -> torch.nn.Module:
    """The self-attention module of an encoder layer (``self_attn``; InternViT: ``attention``)."""
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention


def resolve_layer(layer: int | None, feature_layer: int, n_layers: int) -> int:
    """0-based index of ``encoder.layers[layer]`` (``None`` = the feature layer); raises if out of range."""
    index = feature_layer if layer is None else (layer if layer >= 0 else n_layers + layer)
    if not 0 <= index < n_layers:
        raise ValueError(
            f"a signal was requested at vision layer {layer}, but the vision tower has {n_layers} layers "
            f"(valid: {-n_layers}..{n_layers - 1}); set the method's layer option accordingly"
        )
    return index


def attention_signals(module: torch.nn.Module, hidden: torch.Tensor, names: frozenset[str]) -> dict[str, torch.Tensor]:
    """The requested attention-derived signals of one CLIP attention module from its input ``[B, T, D]`` (after
    ``layer_norm1``), in fp32, batch dimension first and [CLS] still at position 0. A module with ``q_norm`` /
    ``k_norm`` (InternViT's QK-norm; Identity when off) has them applied to the projections, as its forward does."""
    batch, length, width = hidden.shape
    heads, head_dim = module.num_heads, module.head_dim
    q_norm, k_norm = getattr(module, "q_norm", torch.nn.Identity()), getattr(module, "k_norm", torch.nn.Identity())
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        k = k_norm(module.k_proj(hidden)).float()  # [B, T, D]
        k_heads = k.view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, T, d_h]
        if VISION_KEYS in names:
            out[VISION_KEYS] = k_heads
        if CLS_ATTENTION_WIDE in names:
            q_cls = q_norm(module.q_proj(hidden[:, :1])).float()  # [B, 1, D]: one full-width "head"
            out[CLS_ATTENTION_WIDE] = torch.softmax((q_cls @ k.transpose(-1, -2))[:, 0] * width**-0.5, dim=-1)
        if CLS_ATTENTION in names:
            q = q_norm(module.q_proj(hidden[:, :1])).float().view(batch, 1, heads, head_dim).transpose(1, 2)
            out[CLS_ATTENTION] = torch.softmax((q @ k_heads.transpose(-1, -2)) * module.scale, dim=-1)[:, :, 0]
        if names & {ATTENTION_RECEIVED, ATTENTION_MAP}:
            q_all = q_norm(module.q_proj(hidden)).float().view(batch, length, heads, head_dim).transpose(1, 2)
            maps = []
            for b in range(batch):  # one image at a time: [H, T, T] is the largest tensor alive
                probs = torch.softmax((q_all[b] @ k_heads[b].transpose(-1, -2)) * module.scale, dim=-1)
                maps.append(probs.mean(dim=0))  # [T, T] head mean
            full = torch.stack(maps)  # [B, T, T]
            if ATTENTION_RECEIVED in names:
                out[ATTENTION_RECEIVED] = full.mean(dim=1)  # [B, T]: mean over every query row
            if ATTENTION_MAP in names:
                out[ATTENTION_MAP] = full
    return out


class ClipProbe:
    """Computes the requested signals during one forward of a CLIP vision tower (see the module docstring)."""

    def __init__(self, tower: torch.nn.Module, requests: Iterable[SignalRequest], feature_layer: int):
        self.layers = encoder_layers(tower)
        self.requests = [r for r in requests if r.name in PROBE_SIGNALS]
        self.feature_layer = feature_layer
        self._by_layer: dict[int, set[str]] = {}
        for r in self.requests:
            index = resolve_layer(r.layer, feature_layer, len(self.layers))
            self._by_layer.setdefault(index, set()).add(r.name)
        self._store: dict[tuple[str, int], list[torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> ClipProbe:
        for index, names in self._by_layer.items():
            layer = self.layers[index]
            wanted = frozenset(names)
            if wanted & ATTENTION_SIGNALS:
                self._handles.append(layer_attention(layer).register_forward_pre_hook(
                    self._attention_hook(index, wanted & ATTENTION_SIGNALS), with_kwargs=True))
            if wanted & OUTPUT_SIGNALS:
                self._handles.append(layer.register_forward_hook(self._output_hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _attention_hook(self, index: int, names: frozenset[str]) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            for name, value in attention_signals(module, hidden, names).items():
                self._store.setdefault((name, index), []).append(value)

        return hook

    def _output_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # [B, T, D]
            self._store.setdefault(("hidden", index), []).append(hidden.detach())

        return hook

    def per_image(self, drop_cls: bool = True) -> list[dict[str, torch.Tensor]]:
        """One ``{signal_key: tensor}`` per row of the vision batch, image-token axes without [CLS] when
        ``drop_cls`` (the projector's ``"default"`` strategy), keyed like :class:`SignalRequest.key`."""
        start = 1 if drop_cls else 0
        rows: list[dict[str, torch.Tensor]] | None = None
        for r in self.requests:
            index = resolve_layer(r.layer, self.feature_layer, len(self.layers))
            source = ("hidden", index) if r.name in OUTPUT_SIGNALS else (r.name, index)
            if source not in self._store:
                raise RuntimeError(f"the vision tower did not run layer {index} inside the probe ({r.key})")
            value = torch.cat(self._store[source])
            if rows is None:
                rows = [{} for _ in range(value.shape[0])]
            for b, row in enumerate(rows):
                row[r.key] = _image_part(r.name, value[b], start)
        return rows or []


def _image_part(name: str, value: torch.Tensor, start: int) -> torch.Tensor:
    """The image-token part of one batch row's signal."""
    if name == CLS_HIDDEN:
        return value[0]
    if name == VISION_HIDDEN:
        return value[start:]
    if name == CLS_ATTENTION:
        return value[:, start:]  # [H, N]
    if name == VISION_KEYS:
        return value[:, start:]  # [H, N, d_h]
    if name == ATTENTION_MAP:
        return value[start:, start:]  # [N, N]
    return value[start:]  # ATTENTION_RECEIVED, CLS_ATTENTION_WIDE: [N]
