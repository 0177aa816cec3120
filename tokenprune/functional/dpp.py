"""CDPruner: conditional determinantal point process over instruction-weighted similarities."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k
from tokenprune.functional.diversity import unit_rows
from tokenprune.functional.similarity_rows import SimilarityRows, diagonal


def instruction_relevance(image: torch.Tensor, text: torch.Tensor, *, unit: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]`` mean cosine similarity of each image embedding ``[N, D]`` to the text embeddings ``[M, D]`` (fp32).
    ``unit``: the image's fp32 unit rows ``unit_rows(image, 1e-12)`` if the caller has them (one fp32 copy of the
    image fewer: CDPruner's kernel reads the same rows)."""
    a = unit_rows(image, 1e-12) if unit is None else unit
    return (a @ unit_rows(text, 1e-12).T).mean(dim=1)


def cdpruner(features: torch.Tensor, relevance: torch.Tensor, k: int, *, quirks: bool = True,
             unit: torch.Tensor | None = None) -> torch.Tensor:
    """CDPruner (Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs, 2025).

    ``features`` ``[N, D]`` the tokens whose cosine similarity forms the kernel, ``relevance`` ``[N]`` the raw
    per-token relevance to the instruction (mean cosine to the text, :func:`instruction_relevance`). Relevance is
    min-max normalised (``+1e-6``), the kernel is ``L = diag(r) S diag(r)`` and ``k`` tokens are picked by the fast
    greedy MAP inference of Chen et al. (2018), ties to the lowest index. ``quirks=True`` negates the relevance
    first, as the official code does (``-cos``); ``quirks=False`` uses ``+cos``. A pick whose residual is <= 1e-12
    (kernel rank exhausted) no longer updates the others instead of producing NaN. ``[B, N, D]`` features with
    ``[B, N]`` relevance select in ``B`` images (or crops) at once -> ``[B, k]``, each row as alone. ``unit``: the
    features' fp32 unit rows (``unit_rows(features, 1e-12)``) when the caller already has them.

    Cost: each pick takes its kernel row and its incremental Cholesky row against the ``i`` earlier ones
    (``i N``): ``k^2 N / 2`` plus the kernel rows, computed a block at a time for the tokens with the highest
    gains (:class:`~tokenprune.functional.similarity_rows.SimilarityRows`, about ``k N D``) where the official
    code builds the whole ``N x N`` kernel (``N^2 D``); the diagonal comes from ``256``-wide blocks
    (``256 N D``). Memory ``O(k N)`` beyond the fp32 unit rows. The kernel's entries round as the full matrix's.
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
    x = unit_rows(feats, 1e-12) if unit is None else unit.reshape(feats.shape)
    chosen = torch.stack([_greedy_map(x[i], rel[i], k) for i in range(b)])
    out = torch.sort(chosen, dim=1).values
    return out if batched else out[0]


def _greedy_map(x: torch.Tensor, rel: torch.Tensor, k: int) -> torch.Tensor:
    """Fast greedy MAP (Chen et al., NeurIPS 2018) for one image: unit rows ``x`` ``[N, D]``, normalised relevance
    ``rel`` ``[N]``, kernel ``L = diag(rel) (x x^T) diag(rel)``; ``k`` picks in pick order ``[k]``."""
    rows = SimilarityRows(x)
    gains = rel * (diagonal(x) if rows.full is None else torch.diagonal(rows.full)) * rel
    basis = torch.zeros(k, x.shape[0], device=x.device)
    chosen = []
    for i in range(k):
        j = int(torch.argmax(gains))  # first maximum: ties to the lowest index
        chosen.append(j)
        if i + 1 < k:
            kernel_row = rel[j] * rows.take(j, gains) * rel  # L[j, :]
            residual = gains[j]
            e = (kernel_row - basis[:i, j] @ basis[:i]) / residual.sqrt()
            if float(residual) > 1e-12:  # else: rank exhausted, no update
                basis[i] = e
                gains -= e**2
        gains[j] = -torch.inf
    return torch.tensor(chosen, dtype=torch.long, device=x.device)
