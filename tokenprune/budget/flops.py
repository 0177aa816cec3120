"""Analytic prefill/decode FLOPs and KV-cache bytes of the LLM of a VLM, from its shape alone (no weights).

Counting convention (the papers'): multiply-accumulates are counted once, so "FLOPs" here are MACs -- double them
for hardware FLOPs. Only the LLM's decoder layers are counted (no vision tower, embedding or LM head), and
attention is counted over the full ``n x n`` score matrix (no causal halving), as every paper does. Per decoder
layer with ``n`` tokens, hidden size ``d`` and FFN intermediate size ``m``:

* ``"fastv"`` -- FastV (An Image is Worth 1/2 Tokens After Layer 2, Chen et al., ECCV 2024):
  ``4nd^2 + 2n^2d + 2ndm`` (a 2-matrix FFN).
* ``"pdrop"`` -- PyramidDrop (Xing et al., CVPR 2025) and SparseVLM (Zhang et al., ICML 2025):
  ``4nd^2 + 2n^2d + 3ndm`` (SwiGLU has 3 matrices).
* ``"exact"`` -- GQA-aware: ``2nd(H d_h) + 2nd(H_kv d_h) + 2n^2(H d_h) + 3ndm`` (Q/O, K/V, QK^T + AV, SwiGLU).
  Equals ``"pdrop"`` for multi-head attention with ``H d_h = d`` (LLaVA's Vicuna); smaller for Qwen2-VL's GQA.
  Qwen3.5's gated attention adds its output gate (a second ``q_proj`` half): ``3nd(H d_h)`` for Q, gate and O.

Hybrid stacks (Qwen3.5: ``layer_types``, Gated DeltaNet linear attention in three layers of four) count their
``"linear_attention"`` layers as such under every formula, linear in ``n``: the projections ``n d (2 H_k d_k + 2 H_v
d_v + 2 H_v)`` (q/k/v, output gate z, decay a and beta b) and ``n H_v d_v d`` (out), the depthwise causal conv
``n (2 H_k d_k + H_v d_v) w``, the delta-rule recurrence ``3 n H_v d_k d_v`` (read, update and query of a
``d_k x d_v`` state per value head and token), and the FFN. They keep a fixed-size state, no KV cache.

A prefill is described by the tokens each layer processes (``tokens_per_layer``): ``[n] * L`` for an unpruned
or vision-stage-pruned prompt, ``[576] * 2 + [288] * 30`` for FastV K=2 R=50%. Which tokens to count (image only
as PyramidDrop does, or system + image + question) is the caller's choice; absolute TFLOPs are comparable across
papers only under one convention (``docs/benchmarks.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FORMULAS = ("fastv", "pdrop", "exact")
FORMULA_ALIASES = {"f2": "fastv", "f3": "pdrop", "sparsevlm": "pdrop", "pyramiddrop": "pdrop", "gqa": "exact"}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an LLM that FLOPs and KV bytes depend on. ``visual_tokens``: visual tokens of one image at
    the family's default resolution (informational; ``None`` when it depends on the image, as for Qwen2-VL)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    visual_tokens: int | None = None
    # Hybrid stacks (Qwen3.5): one "full_attention"/"linear_attention" entry per layer (None: all full attention);
    # the Gated DeltaNet shape (key heads, value heads, key head dim, value head dim, conv width); gated attention.
    layer_types: tuple[str, ...] | None = None
    linear_attention: tuple[int, int, int, int, int] | None = None
    gated_attention: bool = False

    def __post_init__(self) -> None:
        for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{self.name}: {f} must be a positive int; got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads={self.num_heads} is not a multiple of {self.num_kv_heads}")
        if self.layer_types is not None:
            unknown = set(self.layer_types) - {"full_attention", "linear_attention"}
            if len(self.layer_types) != self.num_layers or unknown:
                raise ValueError(f"{self.name}: layer_types must give 'full_attention' or 'linear_attention' for each "
                                 f"of the {self.num_layers} layers; got {self.layer_types!r}")
            if "linear_attention" in self.layer_types and self.linear_attention is None:
                raise ValueError(f"{self.name}: linear-attention layers need linear_attention=(key heads, value "
                                 f"heads, key head dim, value head dim, conv width)")

    def is_linear(self, layer: int) -> bool:
        """Is decoder layer ``layer`` a linear-attention (Gated DeltaNet) layer?"""
        return self.layer_types is not None and self.layer_types[layer] == "linear_attention"

    @property
    def d_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def with_layers(self, num_layers: int) -> ModelShape:
        """The same shape with fewer (or more) decoder layers: what a ``--layers N`` benchmark model runs (a hybrid
        stack repeats its layer pattern)."""
        types = None if self.layer_types is None else tuple(
            self.layer_types[i % len(self.layer_types)] for i in range(num_layers))
        return dataclasses.replace(self, name=f"{self.name} ({num_layers} layers)", num_layers=num_layers,
                                   layer_types=types)

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelShape:
        """The shape of a transformers config (a VLM config: its text config is used)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        types = getattr(text, "layer_types", None)
        hybrid = types is not None and "linear_attention" in types
        linear = (text.linear_num_key_heads, text.linear_num_value_heads, text.linear_key_head_dim,
                  text.linear_value_head_dim, text.linear_conv_kernel_dim) if hybrid else None
        return cls(
            name=name or getattr(config, "model_type", "model"), hidden_size=text.hidden_size,
            intermediate_size=active_intermediate_size(text), num_layers=text.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or None,
            layer_types=tuple(types) if hybrid else None, linear_attention=linear,
            gated_attention=str(getattr(text, "model_type", "")).startswith("qwen3_5"),  # q_proj: query + gate
        )


def active_intermediate_size(text: Any) -> int:
    """The FFN width one token goes through: ``intermediate_size``, or for a mixture of experts (Qwen3-VL-MoE,
    Qwen3.5-MoE) the ACTIVE experts' ``num_experts_per_tok * moe_intermediate_size`` plus the shared expert's
    ``shared_expert_intermediate_size`` where there is one (the router's ``d x num_experts`` is not counted)."""
    per_expert, active = getattr(text, "moe_intermediate_size", None), getattr(text, "num_experts_per_tok", None)
    if not per_expert or not active:
        return text.intermediate_size
    return active * per_expert + (getattr(text, "shared_expert_intermediate_size", None) or 0)


_VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32}
_VICUNA_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_layers": 40, "num_heads": 40, "num_kv_heads": 40}
_QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_layers": 28, "num_heads": 28, "num_kv_heads": 4}

PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("llava-1.5-7b", **_VICUNA_7B, visual_tokens=576),
        ModelShape("llava-1.5-13b", **_VICUNA_13B, visual_tokens=576),
        ModelShape("llava-next-7b", **_VICUNA_7B, visual_tokens=2880),   # anyres max: base + 4 crops of 576
        ModelShape("llava-next-13b", **_VICUNA_13B, visual_tokens=2880),
        ModelShape("qwen2-vl-2b", 1536, 8960, 28, 12, 2, head_dim=128),
        ModelShape("qwen2-vl-7b", **_QWEN2_7B, head_dim=128),
        ModelShape("qwen2.5-vl-3b", 2048, 11008, 36, 16, 2, head_dim=128),
        ModelShape("qwen2.5-vl-7b", **_QWEN2_7B, head_dim=128),
        # Qwen3-VL-8B-Instruct's config.json: the Qwen3-8B LLM (d 4096, FFN 12288, 36 layers, 32 heads, 8 KV, d_h 128)
        ModelShape("qwen3-vl-8b", 4096, 12288, 36, 32, 8, head_dim=128),
        # Qwen3-VL-30B-A3B-Instruct's config.json: d 2048, 48 layers, 32 heads, 4 KV, d_h 128; 128 experts of FFN
        # width 768, 8 active per token -> 8 x 768 = 6144 counted (active experts only)
        ModelShape("qwen3-vl-30b-a3b", 2048, 8 * 768, 48, 32, 4, head_dim=128),
        # google/gemma-3-12b-it and -27b-it config.json (text_config): d 3840, FFN 15360 (GeGLU), 48 layers, 16 heads,
        # 8 KV, d_h 256; d 5376, FFN 21504, 62 layers, 32 heads, 16 KV, d_h 128. 256 tokens per image (crop). The
        # sliding-window layers (window 1024) are counted with full n x n attention, the papers' convention: exact
        # for prompts up to 1024 tokens.
        ModelShape("gemma-3-12b", 3840, 15360, 48, 16, 8, head_dim=256, visual_tokens=256),
        ModelShape("gemma-3-27b", 5376, 21504, 62, 32, 16, head_dim=128, visual_tokens=256),
        # Qwen3.5-35B-A3B (the defaults of transformers 5.23's Qwen3_5MoeTextConfig, documented there as that
        # checkpoint's): d 2048, 40 layers, full attention in every 4th (16 heads, 2 KV, d_h 256, gated), Gated
        # DeltaNet in the others (16 key heads, 32 value heads, d_k = d_v = 128, conv 4); 256 experts of width 512,
        # 8 active, plus a shared expert of 512 -> 8 x 512 + 512 = 4608 counted
        ModelShape("qwen3.5-35b-a3b", 2048, 8 * 512 + 512, 40, 16, 2, head_dim=256,
                   layer_types=tuple("full_attention" if i % 4 == 3 else "linear_attention" for i in range(40)),
                   linear_attention=(16, 32, 128, 128, 4), gated_attention=True),
    )
}

# llava-hf/llava-onevision-qwen2-7b-ov-hf's config.json: the Qwen2-7B LLM (d 3584, FFN 18944, 28 layers, 28 heads,
# 4 KV, d_h 128); anyres_max_9 on 384-px SigLIP tiles of 27 x 27: at most 729 (base) + 9 x 729 = 7,290 visual tokens
# before the newline tokens (the OneVision paper's maximum)
PRESETS["llava-onevision-7b"] = ModelShape("llava-onevision-7b", **_QWEN2_7B, head_dim=128, visual_tokens=7290)


# InternVL3-8B(-hf)'s config.json: the Qwen2.5-7B LLM (d 3584, FFN 18944, 28 layers, 28 heads, 4 KV, d_h 128);
# visual tokens at the processor's max_patches=12 tiles plus the thumbnail, 256 tokens each: 13 x 256 = 3328.
PRESETS["internvl3-8b"] = ModelShape("internvl3-8b", **_QWEN2_7B, head_dim=128, visual_tokens=13 * 256)


def preset(name: str) -> ModelShape:
    key = name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def resolve_formula(formula: str) -> str:
    key = FORMULA_ALIASES.get(formula.lower(), formula.lower())
    if key not in FORMULAS:
        raise ValueError(f"unknown FLOPs formula {formula!r}; use one of {', '.join(FORMULAS)} "
                         f"(aliases: {', '.join(f'{a}={b}' for a, b in FORMULA_ALIASES.items())})")
    return key


def expand(tokens_per_layer: int | Sequence[int], num_layers: int) -> list[int]:
    """An int means the same count in every layer; a list must have one entry per layer."""
    if isinstance(tokens_per_layer, int):
        tokens = [tokens_per_layer] * num_layers
    else:
        tokens = [int(t) for t in tokens_per_layer]
    if len(tokens) != num_layers:
        raise ValueError(f"got token counts for {len(tokens)} layers, but the model has {num_layers} layers")
    if any(t < 0 for t in tokens):
        raise ValueError(f"token counts must be >= 0; got {tokens}")
    return tokens


def parse_schedule(text: str, num_layers: int | None = None) -> list[int]:
    """``"576x2,288x30"`` -> ``[576, 576, 288, ...]`` (``x`` or ``*``); a bare ``"576"`` fills every layer."""
    parts = [p.strip() for p in text.replace("*", "x").split(",") if p.strip()]
    if len(parts) == 1 and "x" not in parts[0] and num_layers is not None:
        parts = [f"{parts[0]}x{num_layers}"]
    tokens: list[int] = []
    for part in parts:
        count, _, repeat = part.partition("x")
        try:
            tokens += [int(count)] * (int(repeat) if repeat else 1)
        except ValueError:
            raise ValueError(f"cannot read {part!r} in {text!r}; write e.g. 576x2,288x30 (tokens x layers)") from None
    return tokens if num_layers is None else expand(tokens, num_layers)


def layer_flops(shape: ModelShape, n: int, formula: str = "exact", layer: int | None = None) -> int:
    """FLOPs (MACs) of one decoder layer's prefill over ``n`` tokens (``layer``: its index, which decides whether a
    hybrid stack's layer is linear attention; None: a full-attention layer)."""
    formula = resolve_formula(formula)
    d, m = shape.hidden_size, shape.intermediate_size
    if layer is not None and shape.is_linear(layer):
        return linear_layer_flops(shape, n)
    if formula == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    if formula == "pdrop":
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m
    q_width, kv_width = shape.num_heads * shape.d_head, shape.num_kv_heads * shape.d_head
    q_mats = 3 if shape.gated_attention else 2  # Q and O, plus the output gate
    return q_mats * n * d * q_width + 2 * n * d * kv_width + 2 * n * n * q_width + 3 * n * d * m


def linear_layer_flops(shape: ModelShape, n: int) -> int:
    """FLOPs (MACs) of a Gated DeltaNet layer over ``n`` tokens (module docstring): linear in ``n``."""
    key_heads, value_heads, d_k, d_v, conv = shape.linear_attention
    d, keys, values = shape.hidden_size, key_heads * d_k, value_heads * d_v
    projections = n * d * (2 * keys + 2 * values + 2 * value_heads) + n * values * d
    conv_and_state = n * (2 * keys + values) * conv + 3 * n * value_heads * d_k * d_v
    return projections + conv_and_state + 3 * n * d * shape.intermediate_size


def prefill_flops(shape: ModelShape, tokens_per_layer: int | Sequence[int], formula: str = "exact") -> int:
    """FLOPs (MACs) of the LLM prefill where layer ``l`` processes ``tokens_per_layer[l]`` tokens."""
    return sum(layer_flops(shape, n, formula, i) for i, n in enumerate(expand(tokens_per_layer, shape.num_layers)))


def ffn_flops(shape: ModelShape, n: int, formula: str = "exact") -> int:
    """FLOPs (MACs) of one decoder layer's FFN over ``n`` tokens (the ``2ndm``/``3ndm`` term of ``layer_flops``)."""
    return (2 if resolve_formula(formula) == "fastv" else 3) * n * shape.hidden_size * shape.intermediate_size


def decode_flops(shape: ModelShape, cached_per_layer: int | Sequence[int], formula: str = "exact",
                 ffn_share: float = 1.0) -> int:
    """FLOPs (MACs) of generating ONE token against a KV cache of ``cached_per_layer[l]`` tokens per layer.

    Per layer: the projections and FFN of one token plus ``2 d (c_l + 1)`` for its attention over the cache and
    itself (ToDRE's decode formula, arXiv 2505.18757). Decoding is memory-bound: this understates its latency.
    ``ffn_share``: the share of FFN neurons the decode computes (CoreMatching's core neurons, ``neuron_keep``);
    the FFN term shrinks by ``1 - ffn_share``.
    """
    if not 0 < ffn_share <= 1:
        raise ValueError(f"ffn_share must be a share of the FFN neurons in (0, 1]; got {ffn_share!r}")
    width = shape.hidden_size if resolve_formula(formula) != "exact" else shape.num_heads * shape.d_head
    one = layer_flops(shape, 1, formula)  # projections, FFN and attention of the token to itself
    skipped = round(ffn_flops(shape, 1, formula) * (1 - ffn_share))  # FFN neurons the decode does not compute
    total = 0
    for i, c in enumerate(expand(cached_per_layer, shape.num_layers)):
        if shape.is_linear(i):  # linear attention: a fixed-size state, no per-token cache to attend over
            total += layer_flops(shape, 1, formula, i) - skipped
        else:
            total += one - skipped + 2 * c * width
    return total


def kv_bytes_per_token(shape: ModelShape, bytes_per_value: int = 2) -> int:
    """KV-cache bytes of one token over all (full-attention) layers: ``2 (K, V) * H_kv * d_h * bytes * L``."""
    attention = sum(not shape.is_linear(i) for i in range(shape.num_layers))
    return 2 * shape.num_kv_heads * shape.d_head * bytes_per_value * attention


def kv_bytes(shape: ModelShape, tokens_per_layer: int | Sequence[int], bytes_per_value: int = 2) -> int:
    """KV-cache bytes when layer ``l`` caches ``tokens_per_layer[l]`` tokens (fp16/bf16: ``bytes_per_value=2``).
    Linear-attention layers hold a fixed-size state, not a per-token cache: not counted."""
    per_layer = 2 * shape.num_kv_heads * shape.d_head * bytes_per_value
    tokens = expand(tokens_per_layer, shape.num_layers)
    return per_layer * sum(t for i, t in enumerate(tokens) if not shape.is_linear(i))


def dtype_bytes(dtype: Any) -> int:
    """Bytes per value of a dtype name (``"fp16"``) or a ``torch.dtype``."""
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
        return DTYPE_BYTES[dtype.lower()]
    return int(dtype.itemsize)
