"""SparseVLM and AdaptInfer: text-guided visual-token sparsification inside the LLM, with token recycling
(SparseVLM v1.5, ICML 2025; AdaptInfer 2025). One image at a time; attention rows come from the adapter (softmax in fp32
over all keys of the layer)."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import top_k_indices

# Kept visual tokens after each of the three sparsification layers, for 576 visual tokens (LLaVA-1.5-7B), by the
# paper's budget: SparseVLM v1.5 code (``RETAIN_TOKN`` table) and AdaptInfer code (``sparse_token_dict``).
SPARSEVLM_TABLE = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}
ADAPTINFER_TABLE = {32: (40, 12, 0), 48: (80, 24, 2), 64: (133, 27, 3), 128: (290, 72, 18)}
TABLE_TOKENS = 576


def schedule_counts(table: dict[int, tuple[int, ...]], budget: float, n: int) -> list[int]:
    """Kept visual tokens per stage for ``budget`` (tokens of 576) and an image of ``n`` tokens.

    The official tables give the paper's budgets exactly; between two budgets the counts are interpolated linearly,
    above the largest one towards "keep all 576", below the smallest one proportionally towards zero. Counts are
    rescaled by ``n / 576`` (LLaVA-NeXT, Qwen), rounded half up, and lie in ``[1, n]`` (the official 0 of
    AdaptInfer's 32-token setting keeps one token here).
    """
    stages = len(next(iter(table.values())))
    points = sorted({0: (0,) * stages, **table, TABLE_TOKENS: (TABLE_TOKENS,) * stages}.items())
    budget = min(max(float(budget), 0.0), float(TABLE_TOKENS))
    for (b0, c0), (b1, c1) in zip(points[:-1], points[1:], strict=True):
        if b0 <= budget <= b1:
            t = (budget - b0) / (b1 - b0)
            counts = [a + t * (b - a) for a, b in zip(c0, c1, strict=True)]
            break
    return [max(1, min(n, int(c * n / TABLE_TOKENS + 0.5 + 1e-9))) for c in counts]


def sparsevlm_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters (§3.2): ``visual`` ``[V, D]`` and ``text`` ``[T, D]`` LLM input embeddings (text =
    every token after the image). ``p = mean_v softmax_t(visual @ text^T)``; raters = the text tokens with ``p``
    above its mean. Returns their indices into ``text`` (ascending)."""
    p = torch.softmax(visual.float() @ text.float().T, dim=-1).mean(dim=0)  # [T]
    return (p > p.mean()).nonzero().squeeze(1)


def dpc_knn(x: torch.Tensor, clusters: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-kNN, as SparseVLM's recycling uses it).

    ``x`` ``[M, D]``. Distances ``||x_i - x_j|| / sqrt(D)``; density ``exp(-mean squared distance to the k nearest
    points, itself included)`` (``k`` defaults to ``clusters``, as official); delta = distance to the nearest
    strictly denser point (the largest distance overall for the densest); centers = the ``clusters`` highest
    ``delta * density`` (ties to the lowest index; the official code adds random noise instead). Returns
    ``(centers [C] in score order, assign [M])``: every point goes to its nearest center, centers to themselves.
    """
    m = x.shape[0]
    clusters = min(clusters, m)
    k = min(clusters if k is None else k, m)
    xf = x.float()
    dist = torch.cdist(xf, xf) / xf.shape[1] ** 0.5  # [M, M]
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    denser = density[None, :] > density[:, None]  # [i, j]: j strictly denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    score = delta * density
    centers = torch.sort(score, descending=True, stable=True).indices[:clusters]
    assign = dist[:, centers].argmin(dim=-1)
    assign[centers] = torch.arange(clusters, device=x.device)
    return centers, assign


def sparsevlm_recycle(
    relevance: torch.Tensor, kept: torch.Tensor, hidden: torch.Tensor, ratio: float = 0.3
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SparseVLM v1.5 token recycling for one image: of the deleted tokens, the ``int(ratio * deleted) + 1`` most
    relevant are clustered by :func:`dpc_knn` on ``hidden`` (the sparsified layer's OUTPUT) into
    ``int(candidates / 10) + 1`` groups; each group becomes one token, the plain mean of its members.

    ``relevance`` ``[N]``, ``kept`` the kept positions, ``hidden`` ``[N, D]``. Returns ``(representatives [C],
    members)``: per recycled token (center order) its center and its member positions (ascending).
    """
    n = relevance.shape[0]
    deleted = torch.ones(n, dtype=torch.bool, device=relevance.device)
    deleted[kept] = False
    deleted = deleted.nonzero().squeeze(1)
    if deleted.numel() == 0:
        return deleted, []
    candidates = deleted[top_k_indices(relevance[deleted], int(deleted.numel() * ratio) + 1)]
    order = torch.sort(relevance[candidates].float(), descending=True, stable=True).indices
    candidates = candidates[order]  # official: top-k order (most relevant first)
    centers, assign = dpc_knn(hidden[candidates], int(candidates.numel() / 10) + 1)
    members = [torch.sort(candidates[assign == c]).values for c in range(centers.numel())]
    return candidates[centers], members


def adaptinfer_scores(text_text: torch.Tensor, text_visual: torch.Tensor) -> torch.Tensor:
    """AdaptInfer's dynamic text guidance (§12): per head, text-token weights ``w_j = sum_i Sym_ij`` with
    ``Sym = Att + Att^T - diag(Att)`` (attention received from plus paid to the other text tokens), then
    ``score_v = sum_h sum_j w_hj * text_visual[h, j, v]`` (heads summed, as official).

    ``text_text`` ``[H, T, T]``: attention among the text tokens after the image (rows = queries);
    ``text_visual`` ``[H, T, V]``: their attention to the image's visual tokens. Returns ``[V]``."""
    att = text_text.float()
    sym = att + att.transpose(-1, -2) - torch.diag_embed(torch.diagonal(att, dim1=-2, dim2=-1))
    weights = sym.sum(dim=-2)  # [H, T]
    return torch.einsum("ht,htv->v", weights, text_visual.float())


def adaptinfer(text_text: torch.Tensor, text_visual: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` visual tokens by :func:`adaptinfer_scores` (sorted ascending; ties to the lowest index)."""
    return top_k_indices(adaptinfer_scores(text_text, text_visual), k)
