"""Text-guided relevance of visual tokens: the attention of the last prompt token to each of them at one LLM layer
(LRS-VQA, Luo et al., ICCV 2025: the signal its Region Focus Module is distilled from; official code
VisionXLab/LRS-VQA, ``get_text_image_attn``: last text token, softmax over the local image keys, head mean).

The prefill stops at the chosen layer (a pre-hook captures that layer's input and rotary tables, then ends the
forward), and the one attention row is recomputed from q/k (:func:`tokenprune.patches.attention_rows.attention_rows`),
so ``eager``, ``sdpa`` and ``flash_attention_2`` give the same scores and the layers above are never run.
"""

from __future__ import annotations

from typing import Any

import torch

from tokenprune.patches.attention_rows import attention_rows


class _Reached(Exception):
    """Raised by the pre-hook to end the forward once the scoring layer's input is known."""


def _layer_input(model: Any, layer: int, inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden [1, L, D], cos, sin)``: the input of LLM decoder ``layer`` and its rotary tables for ``inputs``."""
    captured: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["cos_sin"] = kwargs["position_embeddings"]
        raise _Reached

    handle = model.model.language_model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    cos, sin = captured["cos_sin"]
    return captured["hidden"], cos, sin


def local_relevance(model: Any, inputs: Any, layer: int, local: torch.Tensor) -> torch.Tensor:
    """``[len(local)]`` fp32 relevance of the prompt slots ``local`` (the local tiles' visual tokens) for a
    one-row ``inputs``: the last prompt token's attention at LLM ``layer``, renormalised per head over ``local``
    (a softmax over those keys only, as the official code takes it), then averaged over heads."""
    layers = model.model.language_model.layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer must be in [0, {len(layers) - 1}] for this {len(layers)}-layer LLM; got {layer}")
    hidden, cos, sin = _layer_input(model, layer, inputs)
    n = hidden.shape[1]
    rows = torch.full((1, 1), n - 1, dtype=torch.long, device=hidden.device)
    valid = inputs.get("attention_mask")
    valid = torch.ones(1, n, dtype=torch.bool, device=hidden.device) if valid is None else valid.bool()
    probs = attention_rows(layers[layer], hidden, rows, cos, sin, valid)[0, :, 0]  # [H, L]
    probs = probs[:, local.to(probs.device)]  # [H, N_local]
    probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return probs.mean(dim=0)
