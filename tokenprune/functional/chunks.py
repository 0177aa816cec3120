"""HoloV: a holistic budget spread over contiguous chunks of the token sequence."""

from __future__ import annotations

import math

import torch

from tokenprune.functional._ranking import check_k, top_k_indices


def holov_chunk_count(n: int, k: int) -> int:
    """The official Qwen2.5-VL rule ``max(1, int((1024 / 576) * n / k))`` (about 16 chunks at an 11 % budget)."""
    return max(1, int((1024 / 576) * n / k))


def _chunk_score(attn: torch.Tensor, feats: torch.Tensor, alpha_var: float) -> float:
    """Mean of ``1000 * attn + alpha_var * rescaled similarity variance`` over one chunk (raw attn if alone).
    ``feats`` in any float dtype: upcast here, one chunk at a time (never a whole-image fp32 copy)."""
    n = attn.shape[0]
    if n == 1:
        return float(attn[0])
    x = feats.float()
    norm = x.norm(dim=-1, keepdim=True) + 1e-6
    x = x / norm if x.data_ptr() == feats.data_ptr() else x.div_(norm)  # divide in place when the upcast copied
    sim = x @ x.T
    sim.fill_diagonal_(0.0)
    mean = sim.sum(dim=1, keepdim=True) / (n - 1)
    var = ((sim - mean) ** 2).sum(dim=1) / (n - 1)  # the zeroed diagonal entry is part of the sum (official)
    a = 1000.0 * attn
    var = var * a.abs().mean() / (var.abs().mean() + 1e-6)
    return float((a + alpha_var * var).mean())


def holov(
    attn: torch.Tensor, features: torch.Tensor, k: int, *, chunks: int = 16, alpha_var: float = 0.09
) -> tuple[torch.Tensor, int]:
    """HoloV (Holistic Visual Token Pruning for Efficient LVLMs, NeurIPS 2025).

    ``attn`` ``[N]`` per-token attention (LLaVA: head-mean [CLS] row; Qwen: attention received), ``features``
    ``[N, D]`` the projected tokens. The sequence is cut into ``chunks`` contiguous chunks (sizes ``N // P``, the
    first ``N % P`` one larger); each chunk is scored by attention plus similarity variance, the budget ``k`` is
    split in proportion to the scores (floor, leftover +1 to the largest shares), and each chunk keeps its top
    tokens by raw attention (a chunk with more budget than tokens is kept whole; the surplus is not re-spent).
    Returns ``(kept, n_pad)``: ``kept`` ascending, and how many zero rows the official code appends to reach ``k``.
    """
    n = attn.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=attn.device), 0
    a, x = attn.float(), features  # chunks upcast one at a time (_chunk_score): no fp32 copy of the image
    p = max(1, min(chunks, n))
    sizes = [n // p + (1 if c < n % p else 0) for c in range(p)]
    starts = [sum(sizes[:c]) for c in range(p)]
    scores = torch.tensor([_chunk_score(a[s:s + m], x[s:s + m], alpha_var) for s, m in zip(starts, sizes, strict=True)])
    weights = scores / (scores.sum() + 1e-6)
    alloc = [math.floor(float(w) * k) for w in weights]
    leftover = k - sum(alloc)
    for c in torch.sort(weights, descending=True, stable=True).indices[:leftover].tolist():
        alloc[c] += 1
    kept = []
    for s, m, budget in zip(starts, sizes, alloc, strict=True):
        if budget >= m:
            kept.append(torch.arange(s, s + m))
        elif budget > 0:
            kept.append(s + top_k_indices(a[s:s + m], budget).cpu())
    out = torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)
    return out.to(attn.device), max(0, k - out.numel())
