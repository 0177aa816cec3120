"""Attention rows without attention weights (docs/composition.md).

The rows a decoder-stage method needs (the last prompt token, or the text rows) are recomputed for just those rows
from the layer's INPUT hidden states: the layer's own ``input_layernorm``, ``q_proj``/``k_proj`` (with bias on
Qwen), the per-head ``q_norm``/``k_norm`` where the layer has them (Qwen3-VL, Qwen3.5), the query half of a gated
``q_proj`` (Qwen3.5: query and output gate interleaved per head), the same rotary cos/sin the layer receives (M-RoPE
already recomposed by HF; partial rotary: the first ``cos.shape[-1]`` dims), GQA key repetition, the causal and
padding masks, and a softmax in fp32 over ALL keys. The attention kernel is never asked for weights, so the
selection is the same under ``eager``, ``sdpa`` and ``flash_attention_2``.
"""

from __future__ import annotations

import math

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, N, d_h]``, ``cos``/``sin`` ``[B, N, d_r]`` (what HF's ``apply_rotary_pos_emb`` does; ``d_r <
    d_h``: partial rotary, the last ``d_h - d_r`` dims pass unrotated)."""
    rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1]:]
    rot = rot * cos[:, None] + _rotate_half(rot) * sin[:, None]
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def _queries(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d_h]`` queries of ``x`` ``[B, N, D]`` (normed input): the query half of a gated ``q_proj``, then
    ``q_norm`` where the layer has one."""
    b, n, _ = x.shape
    out = attn.q_proj(x)
    if out.shape[-1] == 2 * attn.config.num_attention_heads * attn.head_dim:  # gated: [q_h, gate_h] per head
        q = out.view(b, n, -1, 2 * attn.head_dim)[..., : attn.head_dim]
    else:
        q = out.view(b, n, -1, attn.head_dim)
    norm = getattr(attn, "q_norm", None)
    return (norm(q) if norm is not None else q).transpose(1, 2)


def _keys(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, H_kv, N, d_h]`` keys of ``x`` ``[B, N, D]`` (normed input), ``k_norm`` applied where there is one."""
    k = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim)
    norm = getattr(attn, "k_norm", None)
    return (norm(k) if norm is not None else k).transpose(1, 2)


def scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``(q @ k^T) * scale`` in fp32 (``q`` ``[..., R, d_h]``, ``k`` ``[..., N, d_h]``). A power-of-two scale
    (``head_dim ** -0.5`` for ``head_dim`` 64 or 256) is applied to ``q`` before the product instead: exact in
    floating point, so the scores are bit-identical, and one pass over ``[R, d_h]`` instead of ``[R, N]``."""
    q, k = q.float(), k.float()
    if math.frexp(scale)[0] == 0.5:
        return (q * scale) @ k.transpose(-1, -2)
    return (q @ k.transpose(-1, -2)) * scale


def pre_rope_keys(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Keys ``[B, H_kv, N, d_h]`` of the layer's input ``hidden`` ``[B, N, D]`` before RoPE (``k_norm`` applied):
    what :func:`layer_keys` and :func:`attention_rows` rotate, computed once when a method reads both."""
    return _keys(layer.self_attn, layer.input_layernorm(hidden))


def layer_keys(layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               keys: torch.Tensor | None = None) -> torch.Tensor:
    """Post-RoPE keys ``[B, H_kv, N, d_h]`` the layer computes from its input ``hidden`` ``[B, N, D]`` (``keys``:
    its :func:`pre_rope_keys`, when already computed)."""
    b = hidden.shape[0]
    k = pre_rope_keys(layer, hidden) if keys is None else keys
    return _rope(k, cos.expand(b, -1, -1), sin.expand(b, -1, -1))


@torch.no_grad()
def attention_rows(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    valid: torch.Tensor,
    allowed: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, H, R, N]`` fp32 attention probabilities of query slots ``rows`` ``[B, R]`` over all ``N`` key slots.

    ``hidden`` ``[B, N, D]`` is the layer's input; slots are in sequence order, so key ``j`` is visible to row ``i``
    iff ``j <= i`` (causal) and ``valid[b, j]`` (padding), unless ``allowed`` ``[B, R, N]`` gives the layer's own
    rule (sliding window, bidirectional image blocks: ``patches/decoder_masks.py``). ``cos``/``sin`` ``[B or 1, N,
    d_h]``. Logit soft-capping (``attn_logit_softcapping``) is applied where the layer has it, before the mask.
    ``keys``: the layer's :func:`pre_rope_keys` of ``hidden`` when already computed (else computed here).
    """
    attn = layer.self_attn
    b, n, _ = hidden.shape
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    x = layer.input_layernorm(hidden)
    x_rows = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))  # [B, R, D]
    q = _queries(attn, x_rows)  # [B, H, R, d_h]
    gather = rows[..., None].expand(-1, -1, cos.shape[-1])
    q = _rope(q, cos.gather(1, gather), sin.gather(1, gather))
    k = _repeat_kv(_rope(_keys(attn, x) if keys is None else keys, cos, sin), q.shape[1])  # [B, H, N, d_h]
    scores = scaled_scores(q, k, float(attn.scaling))  # [B, H, R, N], a fresh tensor: modified in place
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if allowed is None:
        slots = torch.arange(n, device=hidden.device)
        allowed = (slots[None, None, :] <= rows[..., None]) & valid[:, None, :].bool()  # [B, R, N]
    scores.masked_fill_(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # a query row whose own slot is padding sees no key (all -inf: NaN); a valid row always sees itself (causal,
    # sliding window and image blocks alike)
    return probs if bool(valid.bool().gather(1, rows).all()) else probs.nan_to_num_(0.0)


def _repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, H_kv, N, d_h]`` keys repeated for ``heads`` query heads (GQA; as they are when ``H_kv == heads``)."""
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


@torch.no_grad()
def attention_rows_no_rope(
    layer: torch.nn.Module, hidden: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """``[B, H, R, K]`` fp32 attention of query slots ``rows`` ``[B, R]`` over the key slots ``keys`` ``[B, K]``
    ONLY, with neither rotary embeddings nor a causal mask (FEATHER, ICCV 2025: the last prompt token's attention
    to the image tokens without RoPE, softmax over the image keys). ``hidden`` ``[B, N, D]`` is the layer's input."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    pick = lambda idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    q = _queries(attn, pick(rows))  # [B, H, R, d_h]
    k = _repeat_kv(_keys(attn, pick(keys)), q.shape[1])  # [B, H, K, d_h]
    return torch.softmax(scaled_scores(q, k, float(attn.scaling)), dim=-1)
