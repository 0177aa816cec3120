"""Selection rules of the decoder-stage (in-LLM) methods, one image at a time (docs/methods/decoder.md).

Inputs are attention rows already recomputed by the adapter (softmax in fp32 over ALL keys of the layer, see
``patches/attention_rows.py``) restricted to one image's visual keys, or per-token hidden states/keys.
"""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k, top_k_indices


def fastv(attn_to_visual: torch.Tensor, k: int) -> torch.Tensor:
    """FastV (An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024): ``[..., N]`` attention from the query rows
    (officially the last prompt token, every head) to the visual keys; top-``k`` of the mean over all leading
    dimensions. The softmax must already be over all keys (not over the visual keys only: spec §2 pitfall 1)."""
    n = attn_to_visual.shape[-1]
    check_k(k, n)
    return top_k_indices(attn_to_visual.float().reshape(-1, n).mean(dim=0), k)


def pdrop_counts(n: int, ratio: float, stages: int) -> list[int]:
    """PyramidDrop (CVPR 2025) kept visual tokens after each of ``stages`` boundaries: ``int(n * ratio**s)`` of the
    ORIGINAL count (576 -> 288, 144, 72 for ratio 0.5), truncated as the official ``int`` (2880 * 0.35 =
    1007.99... -> 1007), at least one token."""
    return [max(1, min(n, int(n * ratio**s))) for s in range(1, stages + 1)]


def pdrop_ratio(average: float, layers: tuple[int, ...], n_layers: int) -> float:
    """The PyramidDrop ratio (lambda) whose schedule keeps ``average`` of the visual tokens on average over the
    ``n_layers`` decoder layers, with stage boundaries (first pruned layers) ``layers``.

    Layer average of ``1, r, r^2, ...`` weighted by each stage's layer count (continuous in ``r``, solved by
    bisection, rounded to 12 decimals so that the truncating counts get no bisection noise): ``layers=(8, 16,
    24)``, 32 layers, r=0.5 gives 0.46875 (270 of 576 tokens, the paper's count).
    """
    if not 0.0 < average <= 1.0:
        raise ValueError(f"a layer-average keep ratio must lie in (0, 1]; got {average!r}")
    bounds = [0, *layers, n_layers]
    spans = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def mean(r: float) -> float:
        return sum(span * r**s for s, span in enumerate(spans)) / n_layers

    if average >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    if mean(lo) > average:
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < average else (lo, mid)
    return round((lo + hi) / 2, 12)


def layer_average(counts: list[int], layers: tuple[int, ...], n: int, n_layers: int) -> float:
    """Layer-averaged visual token count of a stage schedule (``n`` before the first boundary)."""
    bounds = [0, *layers, n_layers]
    per_stage = [n, *counts]
    return sum((b - a) * c for a, b, c in zip(bounds[:-1], bounds[1:], per_stage, strict=True)) / n_layers
