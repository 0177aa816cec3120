"""TransPrune (Li et al., TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model, CVPR
2026): visual tokens whose representations change most inside the LLM (Token Transition Variation) and that the
instruction attends to (Instruction-Guided Attention) are kept."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k, top_k_indices


def transprune_ttv(x: torch.Tensor, out: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Token Transition Variation of one sublayer: ``(|a| / |b|) * softmax_tokens(1 - cos(b, a))``.

    ``x`` ``[..., N, D]``: the sublayer's input after its norm (b); ``out`` ``[..., N, D]``: its output before the
    residual add (a). The softmax runs over the (``valid``) tokens of each sequence; padding gets 0."""
    b, a = x.float(), out.float()
    cos = torch.nn.functional.cosine_similarity(b, a, dim=-1, eps=1e-8)
    ratio = a.norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-8)
    logits = 1.0 - cos
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    w = ratio * torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return w if valid is None else w.masked_fill(~valid, 0.0)


def transprune_scores(ttv: torch.Tensor, iga: torch.Tensor) -> torch.Tensor:
    """``ttv / sum(ttv) + iga / sum(iga)`` over one image's current tokens (each L1-normalised, +1e-8)."""
    ttv, iga = ttv.float(), iga.float()
    return ttv / (ttv.sum() + 1e-8) + iga / (iga.sum() + 1e-8)


def transprune(ttv: torch.Tensor, iga: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` of :func:`transprune_scores` (``ttv``: accumulated TTV, ``iga``: instruction rows' head- and
    row-mean attention, softmax over all keys; both ``[n]`` over the image's current tokens), sorted."""
    check_k(k, ttv.shape[0])
    return top_k_indices(transprune_scores(ttv, iga), k)


def transprune_counts(n: int, ratios: tuple[float, ...], scale: float = 1.0) -> list[int]:
    """``int(n * min(1, scale * r))`` of the ORIGINAL ``n`` per stage, truncated as the official ``int`` (576 ->
    504 / 360 / 72; 2880 * 0.35 = 1007.99... -> 1007), at least one token (the official code can keep none)."""
    return [max(1, min(n, int(n * min(1.0, scale * r)))) for r in ratios]


def transprune_scale(average: float, ratios: tuple[float, ...], layers: tuple[int, ...], n_layers: int) -> float:
    """The factor ``c`` on the stage ratios whose schedule keeps ``average`` of the visual tokens on average over the
    decoder layers (bisection, rounded to 12 decimals so that the official schedule on 32 layers comes out as exactly
    ``c=1`` at 236.25 / 576 and the official ``int`` truncation of the counts is not fed bisection noise)."""
    bounds = [0, *layers, n_layers]
    spans = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def mean(c: float) -> float:
        fractions = [1.0, *(min(1.0, c * r) for r in ratios)]
        return sum(s * f for s, f in zip(spans, fractions, strict=True)) / n_layers

    top = 1.0 / min(ratios)
    if average >= mean(top):
        return top
    lo, hi = 0.0, top
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < average else (lo, mid)
    return round((lo + hi) / 2, 12)
