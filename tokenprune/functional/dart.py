"""DART (Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More,
EMNLP 2025): keep pivot tokens and, for each pivot, the visual tokens least similar to it."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k, top_k_indices


def dart_count(n: int, budget: int, image_pivots: int = 4, text_pivots: int = 4) -> int:
    """Visual tokens DART really keeps of ``n`` for a nominal ``budget`` (official ``max_num_trunction``):
    ``image_pivots + (image_pivots + text_pivots) * (budget // (image_pivots + text_pivots))`` -- 128 -> 132,
    192 -> 196, 64 -> 68 (official code ZichenWen1/DART); ``budget >= n`` keeps all ``n``."""
    if budget >= n:
        return n
    per_pivot = budget // (image_pivots + text_pivots)
    return max(1, min(n, min(image_pivots, n) + (image_pivots + text_pivots) * per_pivot))


def _top_desc(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores in descending order (ties to the lowest index), as ``topk`` lists them."""
    return torch.sort(scores.float(), descending=True, stable=True).indices[:k].tolist()


def dart(
    key_norms: torch.Tensor,
    states: torch.Tensor,
    visual: torch.Tensor,
    text: torch.Tensor,
    k: int,
    per_pivot: int,
    image_pivots: int = 4,
    text_pivots: int = 4,
    token_index: torch.Tensor | None = None,
    order: str = "official",
) -> torch.Tensor:
    """Kept positions within ``visual`` (sorted).

    ``key_norms`` ``[N]``: L1 norm of each token's post-RoPE keys (heads concatenated) at layer K-1; ``states``
    ``[N, D]``: layer K-1's output through the final norm; ``visual`` / ``text``: slots of the image and of the
    tokens after it. Pivots = the ``image_pivots`` visual and ``text_pivots`` text tokens with the largest key
    norms; each pivot in turn takes the ``per_pivot`` remaining visual tokens with the LOWEST cosine similarity to
    it. ``order="official"`` visits the pivots as the official code does (``list(set(...))`` of their prompt
    positions ``token_index``, a CPython hash order); ``"image-first"`` image pivots then text pivots, each by
    decreasing key norm. Text pivots are not kept (they are not visual). If fewer than ``k`` tokens were taken
    (e.g. fewer text tokens than text pivots), further rounds over the pivots fill up to exactly ``k``.
    """
    n = visual.numel()
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=visual.device)
    img = visual[_top_desc(key_norms[visual], min(image_pivots, n))].tolist()
    txt = text[_top_desc(key_norms[text], min(text_pivots, text.numel()))].tolist() if text.numel() else []
    if order == "official":
        index = (torch.arange(states.shape[0]) if token_index is None else token_index.cpu()).tolist()
        slot_of = {index[s]: s for s in img + txt}
        pivots = [slot_of[i] for i in list(set([index[s] for s in img] + [index[s] for s in txt]))]
    elif order == "image-first":
        pivots = img + txt
    else:
        raise ValueError(f"dart: order must be 'official' or 'image-first'; got {order!r}")
    x = states.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    local = {int(s): i for i, s in enumerate(visual.tolist())}
    kept = torch.zeros(n, dtype=torch.bool, device=visual.device)
    kept[[local[s] for s in img]] = True
    rounds = 0
    while int(kept.sum()) < k:
        quota = per_pivot if rounds == 0 else max(per_pivot, 1)
        rounds += 1
        for p in pivots:
            room = k - int(kept.sum())
            if room <= 0:
                break
            free = (~kept).nonzero().squeeze(1)
            sim = x[visual[free]] @ x[p]  # cosine similarity to the pivot
            take = min(quota, room, free.numel())
            if take:
                kept[free[top_k_indices(-sim, take)]] = True
    return kept.nonzero().squeeze(1)
