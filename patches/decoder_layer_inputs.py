"""What the decoder loop (``patches/decoder_loop.py``) hands a decoder layer from a pruning stage on: the mask over the
kept slots, the rotary cos/sin of their positions and no ``position_ids``; and the language model's rotary module
and attention layers as a method reads them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from tokenprune.patches.decoder_call import LoopCall
from tokenprune.patches.decoder_masks import LayerMasks, build_mask
from tokenprune.patches.decoder_select import Stage, gather


def stage_override(loop: Any, stage: Stage, call: LoopCall, h: torch.Tensor) -> dict[str, Any]:
    """Mask, rotary cos/sin and position ids of the layers from ``stage.layer`` on, for this call."""
    n, batch = call.n, h.shape[0]
    prompt_valid = stage.valid & call.mask2d[:, :n].gather(1, stage.index)
    kv_valid = torch.cat([prompt_valid, call.mask2d[:, n:]], dim=1)
    q = call.q if call.mode == "decode" else kv_valid.shape[1]
    t = 0 if call.mode == "decode" else call.q - call.n  # replay: generated tokens after the prompt
    index = torch.cat([stage.index, torch.arange(n, n + t, device=h.device).expand(batch, -1)], dim=1)
    impl = loop.lm.config._attn_implementation
    if loop.per_layer:  # each layer's own mask and rotary tables (patches/decoder_masks.py)
        coords = torch.cat([stage.index, torch.arange(n, call.mask2d.shape[1], device=h.device)
                            .expand(batch, -1)], dim=1)
        blocks = None
        if call.blocks is not None and call.mode != "decode":  # decode: text queries, no block to see
            prompt = call.blocks.to(h.device).gather(1, stage.index).masked_fill(~prompt_valid, -1)
            blocks = torch.cat([prompt, torch.full((batch, t), -1, dtype=prompt.dtype, device=h.device)], dim=1)
        masks = LayerMasks(impl, h.dtype, coords, kv_valid, blocks, q)
        return {"masks": masks, "index": None if call.mode == "decode" else index, "tables": {},
                "position_ids": None}
    if loop.reindex:
        if call.mode == "decode":
            pos = call.pos - stage.shift[:, None]
        else:
            removed = torch.cat([stage.removed, stage.shift[:, None].expand(-1, t)], dim=1)
            pos = call.pos.gather(1, index) - removed
        emb = loop.lm.rotary_emb(h, pos)
    elif call.mode == "decode":
        emb = call.cos_sin
    else:
        emb = tuple(gather(x.expand(batch, -1, -1), index) for x in call.cos_sin)
    mask = build_mask(impl, kv_valid, q, h.dtype, call.kv_len)
    override = {"attention_mask": mask, "position_embeddings": emb, "position_ids": None}
    if loop.linear:  # what HF's create_recurrent_attention_mask gives: the queries' padding, None if there is none
        queries = kv_valid[:, -q:]
        override["recurrent_mask"] = None if q == 1 or bool(queries.all()) else queries
    return override


def layer_override(loop: Any, i: int, override: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The override of layer ``i``: a linear-attention layer takes the 2-D padding mask of its queries; with
    per-layer masks, the layer's own mask and its own rotary tables (``kwargs["_incoming"]``, what HF computed
    for the unpruned call) gathered at the kept slots' prompt index."""
    if "masks" in override:
        out = {"position_ids": None}
        out["attention_mask"] = override["masks"].for_layer(kwargs.get("past_key_values"), i, loop.windows[i])
        incoming, index = kwargs["_incoming"], override["index"]
        if index is not None and incoming is not None:
            key = id(incoming[0])
            if key not in override["tables"]:
                override["tables"][key] = tuple(gather(x.expand(index.shape[0], -1, -1), index) for x in incoming)
            out["position_embeddings"] = override["tables"][key]
        return out
    out = {k: v for k, v in override.items() if k != "recurrent_mask"}
    if i in loop.linear:
        out["attention_mask"] = override.get("recurrent_mask")
    return out


def read_layers(loop: Any) -> dict[int, int]:
    """The method's extra attention layers (``DecoderMethod.attention_layers``) -> the layer whose rows are read:
    itself, or on a hybrid LLM (Qwen3.5) the closest full-attention layer at or below it; all before the first
    pruned layer, so their rows share the first stage's slot layout."""
    first = min(p.layer for p in loop.plan)
    out = {}
    for i in loop.method.attention_layers(loop.plan):
        full = [j for j in range(min(i, first - 1), -1, -1) if j not in loop.linear]
        if not 0 <= i < first or not full:
            raise ValueError(
                f"{loop.method.name}: needs the attention rows of layer {i}, before its first pruned layer "
                f"{first}; this {loop.model.config.model_type!r} model has no full-attention layer there. Set "
                f"{loop.method.layer_option}= to a later layer"
            )
        out[i] = full[0]
    return out


def rotary_for(lm: torch.nn.Module, i: int) -> Callable:
    """The language model's rotary module as layer ``i`` uses it (``(x, position_ids) -> (cos, sin)``): Gemma 3's
    takes the layer type (local and global bases)."""
    rotary = lm.rotary_emb
    types = getattr(lm.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(rotary.forward).parameters:
        return functools.partial(rotary, layer_type=types[i])
    return rotary
