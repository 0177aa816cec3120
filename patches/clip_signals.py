"""Signals of a CLIP-style vision tower (LLaVA-1.5, LLaVA-NeXT), computed only for what a method declared.

``ClipProbe`` is a context manager around one forward of the tower. For every layer a request names it installs a
forward hook on that layer's attention module (attention rows, keys), forward hooks on the module's key (and, for
signals that read every query row, query) projections that keep what the tower computes anyway, and/or a forward
hook on the layer (hidden states); it computes just what was asked from those projections in fp32 and removes
every hook on exit. The tower keeps its attention kernel (eager, sdpa or flash-attention): nothing is read from the
kernel and ``output_attentions`` is never switched on. A projection that is not a module (vLLM's fused ``qkv_proj``
views) is recomputed from the attention input instead. Semantics of each signal: ``tokenprune/methods/base.py``.

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
from tokenprune.patches.attention_rows import scaled_scores

ATTENTION_SIGNALS = frozenset({CLS_ATTENTION, ATTENTION_RECEIVED, ATTENTION_MAP, VISION_KEYS, CLS_ATTENTION_WIDE})
OUTPUT_SIGNALS = frozenset({VISION_HIDDEN, CLS_HIDDEN})
PROBE_SIGNALS = ATTENTION_SIGNALS | OUTPUT_SIGNALS
FULL_QUERY_SIGNALS = frozenset({ATTENTION_RECEIVED, ATTENTION_MAP})  # read every query row: the tower's q is kept
_MAP_ROWS = 256  # query patches per chunk of a pooled attention map


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


def projection_modules(module: torch.nn.Module) -> tuple[Any, Any]:
    """``(query, key)``: the last module of each projection chain of an attention module, whose output is what
    the attention's forward uses (``q_norm``/``k_norm`` where the module has them, e.g. InternViT's QK-norm or its
    Identity, else ``q_proj``/``k_proj``)."""
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    return (module.q_proj if q_norm is None else q_norm), (module.k_proj if k_norm is None else k_norm)


def _projected(module: torch.nn.Module, hidden: torch.Tensor, part: str) -> torch.Tensor:
    """``q_norm(q_proj(hidden))`` (``part="q"``) or the keys, as the attention's forward computes them."""
    out = getattr(module, f"{part}_proj")(hidden)
    norm = getattr(module, f"{part}_norm", None)
    return out if norm is None else norm(out)


def pooled_attention_map(q: torch.Tensor, k: torch.Tensor, scale: float, groups: torch.Tensor) -> torch.Tensor:
    """``P A P^T`` of one image: the head-mean attention map among POOLED tokens, ``[t, t]``. ``q`` / ``k``
    ``[H, T, d_h]`` (fp32); ``groups`` ``[t, g]``: the patch indices each pooled token averages. Row ``i`` is the mean
    over heads and over token ``i``'s ``g`` query patches of the attention they give to each token's key patches
    (summed), so rows still sum to 1. Computed over ``_MAP_ROWS`` query patches at a time: the largest tensors are
    ``[H, _MAP_ROWS, T]`` blocks (scores, scaled scores, probabilities; SigLIP So400m at 896 px, 16 heads x 256 x
    4,096 fp32: 64 MiB each, ~200 MiB peak), never the ``[H, T, T]`` map (1 GiB a copy)."""
    t, g = groups.shape
    groups = groups.to(q.device)
    key_sum = torch.zeros(k.shape[1], t, device=q.device)  # [T, t]: 1 where a key patch belongs to a token
    key_sum[groups.reshape(-1), torch.arange(t, device=q.device).repeat_interleave(g)] = 1.0
    step = max(1, _MAP_ROWS // g)
    rows = []
    for first in range(0, t, step):
        members = groups[first:first + step]  # [c, g]
        probs = torch.softmax(scaled_scores(q[:, members.reshape(-1)], k, scale), dim=-1)  # [H, c*g, T]
        rows.append((probs.mean(dim=0) @ key_sum).view(members.shape[0], g, t).mean(dim=1))  # [c, t]
    return torch.cat(rows)


def attention_signals(module: torch.nn.Module, hidden: torch.Tensor, names: frozenset[str],
                      q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                      map_groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The requested attention-derived signals of one CLIP attention module from its input ``[B, T, D]`` (after
    ``layer_norm1``), in fp32, batch dimension first and [CLS] still at position 0. A module with ``q_norm`` /
    ``k_norm`` (InternViT's QK-norm; Identity when off) has them applied to the projections, as its forward does.
    ``q`` / ``k`` ``[B, T, D]``: the module's own query / key projections of ``hidden`` when the forward already
    computed them (the probe keeps them), else recomputed here. ``map_groups`` ``[t, g]``: ATTENTION_MAP among the
    pooled tokens these patch groups form (:func:`pooled_attention_map`), for a tower whose patches the projector
    average-pools (Gemma 3)."""
    batch, length, width = hidden.shape
    heads, head_dim = module.num_heads, module.head_dim
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        k = (_projected(module, hidden, "k") if k is None else k).float()  # [B, T, D]
        k_heads = k.view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, T, d_h]
        if VISION_KEYS in names:
            out[VISION_KEYS] = k_heads
        if CLS_ATTENTION_WIDE in names:
            q_cls = _projected(module, hidden[:, :1], "q").float()  # [B, 1, D]: one full-width "head"
            out[CLS_ATTENTION_WIDE] = torch.softmax((q_cls @ k.transpose(-1, -2))[:, 0] * width**-0.5, dim=-1)
        if CLS_ATTENTION in names:
            q_cls = _projected(module, hidden[:, :1], "q").float().view(batch, 1, heads, head_dim).transpose(1, 2)
            out[CLS_ATTENTION] = torch.softmax((q_cls @ k_heads.transpose(-1, -2)) * module.scale, dim=-1)[:, :, 0]
        if names & {ATTENTION_RECEIVED, ATTENTION_MAP}:
            q_all = (_projected(module, hidden, "q") if q is None else q).float()
            q_all = q_all.view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, T, d_h]
            if ATTENTION_MAP in names and map_groups is not None:
                out[ATTENTION_MAP] = torch.stack(
                    [pooled_attention_map(q_all[b], k_heads[b], module.scale, map_groups) for b in range(batch)])
                names = names - {ATTENTION_MAP}
            maps = []
            full = names & {ATTENTION_RECEIVED, ATTENTION_MAP}  # empty when only the pooled map was asked
            for b in range(batch if full else 0):  # one image at a time: [H, T, T] is the largest tensor alive
                probs = torch.softmax(scaled_scores(q_all[b], k_heads[b], module.scale), dim=-1)
                maps.append(probs.mean(dim=0))  # [T, T] head mean
            if ATTENTION_RECEIVED in names:
                out[ATTENTION_RECEIVED] = torch.stack([m.mean(dim=0) for m in maps])  # [B, T]: mean over query rows
            if ATTENTION_MAP in names:
                out[ATTENTION_MAP] = torch.stack(maps)  # [B, T, T]
    return out


class ClipProbe:
    """Computes the requested signals during one forward of a CLIP vision tower (see the module docstring)."""

    def __init__(self, tower: torch.nn.Module, requests: Iterable[SignalRequest], feature_layer: int,
                 map_groups: torch.Tensor | None = None):
        self.layers = encoder_layers(tower)
        self.map_groups = map_groups  # [t, g]: ATTENTION_MAP among pooled tokens (see attention_signals)
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
                attention = layer_attention(layer)
                kept: dict[str, torch.Tensor] = {}  # the projections this forward computed: "q", "k"
                for part, source in zip("qk", projection_modules(attention), strict=True):
                    if part == "q" and not wanted & FULL_QUERY_SIGNALS:
                        continue
                    if isinstance(source, torch.nn.Module):  # vLLM's fused views are not: recomputed instead
                        self._handles.append(source.register_forward_hook(self._keep_hook(kept, part)))
                self._handles.append(attention.register_forward_hook(
                    self._attention_hook(index, wanted & ATTENTION_SIGNALS, kept), with_kwargs=True))
            if wanted & OUTPUT_SIGNALS:
                self._handles.append(layer.register_forward_hook(self._output_hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _keep_hook(kept: dict[str, torch.Tensor], part: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            kept[part] = output

        return hook

    def _attention_hook(self, index: int, names: frozenset[str], kept: dict[str, torch.Tensor]) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            q, k = kept.pop("q", None), kept.pop("k", None)
            signals = attention_signals(module, hidden, names, q=q, k=k, map_groups=self.map_groups)
            for name, value in signals.items():
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
