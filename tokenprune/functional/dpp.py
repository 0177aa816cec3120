"""CDPruner: conditional determinantal point process over instruction-weighted similarities."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k


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
    (kernel rank exhausted) no longer updates the others instead of producing NaN.
    """
    n = features.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=features.device)
    rel = -relevance.float() if quirks else relevance.float()
    spread = rel.max() - rel.min()
    rel = (rel - rel.min() + 1e-6) / spread if float(spread) > 0 else torch.ones_like(rel)  # constant: plain DPP
    x = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    kernel = rel[:, None] * (x @ x.T) * rel[None, :]
    gains = torch.diagonal(kernel).clone()
    basis = torch.zeros(k, n, device=kernel.device)
    chosen = []
    for i in range(k):
        j = int(torch.argmax(gains))
        chosen.append(j)
        if float(gains[j]) > 1e-12:
            e = (kernel[j] - basis[:i, j] @ basis[:i]) / gains[j].sqrt()
            basis[i] = e
            gains = gains - e**2
        gains[chosen] = -torch.inf
    return torch.sort(torch.tensor(chosen, dtype=torch.long, device=features.device)).values
