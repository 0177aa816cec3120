"""CDPruner: conditional determinantal point process over instruction-weighted similarities."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k
from tokenprune.functional.diversity import keeps_matrix, similarities, unit_rows


def instruction_relevance(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[N]`` mean cosine similarity of each image embedding ``[N, D]`` to the text embeddings ``[M, D]`` (fp32)."""
    a = image.float() / image.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = text.float() / text.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).mean(dim=1)


def cdpruner(features: torch.Tensor, relevance: torch.Tensor, k: int, *, quirks: bool = True) -> torch.Tensor:
    """CDPruner (Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs, 2025).

    ``features`` ``[N, D]`` the tokens whose cosine similarity forms the kernel, ``relevance`` ``[N]`` the raw
    per-token relevance to the instruction (mean cosine to the text, :func:`instruction_relevance`). Relevance is
    min-max normalised (``+1e-6``), the kernel is ``L = diag(r) S diag(r)`` and ``k`` tokens are picked by the fast
    greedy MAP inference of Chen et al. (2018), ties to the lowest index. ``quirks=True`` negates the relevance
    first, as the official code does (``-cos``); ``quirks=False`` uses ``+cos``. A pick whose residual is <= 1e-12
    (kernel rank exhausted) no longer updates the others instead of producing NaN. ``[B, N, D]`` features with
    ``[B, N]`` relevance select in ``B`` images (or crops) at once -> ``[B, k]``, each row as alone.

    Cost: each pick takes its kernel row and its incremental Cholesky row against the ``i`` earlier ones
    (``i N``): ``k^2 N / 2`` plus the kernel rows. Where ``N <= 2 D`` (:func:`diversity.keeps_matrix`) the
    ``N x N`` cosine matrix (one compute-bound matmul, ``N^2 D``) provides them, as the official code; beyond, each
    row is one ``N D`` product (``k N D`` in all) and memory stays ``O(k N)`` beyond the fp32 unit rows.
    """
    if features.ndim not in (2, 3) or relevance.shape != features.shape[:-1]:
        raise ValueError(f"cdpruner: features [N, D] with relevance [N] (or [B, N, D] with [B, N]); got "
                         f"{tuple(features.shape)} and {tuple(relevance.shape)}")
    batched = features.ndim == 3
    feats, rel = (features, relevance) if batched else (features[None], relevance[None])
    b, n = feats.shape[:2]
    check_k(k, n)
    if k >= n:
        out = torch.arange(n, device=features.device)
        return out.expand(b, -1).clone() if batched else out
    rel = -rel.float() if quirks else rel.float()
    low, high = rel.min(dim=1, keepdim=True).values, rel.max(dim=1, keepdim=True).values
    spread = high - low
    rel = torch.where(spread > 0, (rel - low + 1e-6) / spread, torch.ones_like(rel))  # constant: plain DPP
    x = unit_rows(feats, 1e-12)
    rows = torch.arange(b, device=x.device)
    similarity = torch.bmm(x, x.mT) if keeps_matrix(n, x.shape[-1]) else None
    gains = rel * (torch.diagonal(similarity, dim1=1, dim2=2) if similarity is not None else (x * x).sum(-1)) * rel
    basis = torch.zeros(b, k, n, device=x.device)
    chosen = torch.empty(b, k, dtype=torch.long, device=x.device)
    for i in range(k):
        j = torch.argmax(gains, dim=1)  # [B]: first maximum, ties to the lowest index
        chosen[:, i] = j
        if i + 1 < k:
            cosines = similarity[rows, j] if similarity is not None else similarities(x, j)
            kernel_row = rel[rows, j, None] * cosines * rel  # L[j, :]
            residual = gains[rows, j]
            coeff = basis[rows, :i, j]  # [B, i]
            projection = torch.stack([coeff[r] @ basis[r, :i] for r in range(b)])  # per image: batched == alone
            e = (kernel_row - projection) / residual.sqrt()[:, None]
            e = torch.where((residual > 1e-12)[:, None], e, torch.zeros_like(e))  # rank exhausted: no update
            basis[:, i] = e
            gains = gains - e**2
        gains[rows, j] = -torch.inf
    out = torch.sort(chosen, dim=1).values
    return out if batched else out[0]
