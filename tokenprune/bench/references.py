"""Naive reference implementations of the greedy selectors, for the selection-cost micro-benchmark and the tests:
the textbook form of each paper's algorithm, every score recomputed from scratch at every step (no running minimum,
no incremental Cholesky, no lazy gains). Same output as :mod:`tokenprune.functional` (asserted on the benchmark's
inputs in the same run and by ``tests/test_bench.py`` on small random inputs), measured next to it.

To add one: write ``name_naive(...)`` on plain tensors, and register ``ctx -> kept indices`` in ``REFERENCES``
under the method's name (``ctx`` is the :class:`~tokenprune.methods.SelectionContext` the method gets).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenprune.methods import CLS_ATTENTION, FEATURES, TEXT_EMBEDDINGS, VISION_HIDDEN, SelectionContext


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_distance_naive(features: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of every pair of rows, fp32 ``[N, N]`` (the O(N^2 D) matrix every diversity method starts from)."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return 1.0 - x @ x.T


def divprune_naive(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune as the official LLaVA code loops (Alvar et al., CVPR 2025): at step ``i`` gather the ``i``
    selected rows of the distance matrix and take their column minimum again -- O(k^2 N) after the O(N^2 D)
    matrix -- with the first pick from ``topk(2, largest=False)`` per column. Selected tokens are excluded from
    later picks, as in :func:`tokenprune.functional.divprune`."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n)
    dist = cosine_distance_naive(features)
    selected = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1] if n > 1 else dist[0]
        else:
            scores = torch.index_select(dist, 0, selected[:i]).min(dim=0).values
            scores[selected[:i]] = -torch.inf
        selected[i] = torch.argmax(scores)
    return torch.sort(selected).values


def kcenter_naive(features: torch.Tensor, k: int, pivot: int = 0, rule: str = "kcenter") -> torch.Tensor:
    """ToDRE stage 1 (greedy k-center, or max-sum for ``rule="maxsum"``) from ``pivot``: at every step each token's
    distance to its nearest chosen token (or its summed similarity to all chosen ones) is recomputed over all
    chosen rows -- O(k^2 N) after the O(N^2 D) matrix; ties to the lowest index; chosen tokens excluded."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n)
    dist = cosine_distance_naive(features)
    selected = [pivot]
    while len(selected) < k:
        rows = dist[torch.tensor(selected)]
        if rule == "kcenter":
            score = rows.min(dim=0).values
        else:  # maxsum: smallest summed similarity, accumulated in pick order as Algorithm 1 writes it
            score = -(1.0 - rows[0])
            for row in rows[1:]:
                score = score - (1.0 - row)
        score[selected] = -torch.inf
        selected.append(int(torch.argmax(score)))
    return torch.sort(torch.tensor(selected, dtype=torch.long)).values


def cdpruner_naive(features: torch.Tensor, relevance: torch.Tensor, k: int, quirks: bool = True) -> torch.Tensor:
    """CDPruner's conditional DPP, greedy MAP the textbook way: at every step each token's gain is its conditional
    variance given the chosen set, ``L_jj - L_jS L_SS^-1 L_Sj``, from a fresh Cholesky factor of ``L_SS`` and a
    triangular solve against all N columns -- O(k^2 N) per step, O(k^3 N) in all, where Chen et al.'s fast greedy
    MAP (:func:`tokenprune.functional.cdpruner`) updates one basis row per step. Same kernel (min-max normalised
    relevance, negated with ``quirks``); a pick with residual <= 1e-12 joins the output but not ``S``."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n)
    rel = -relevance.float() if quirks else relevance.float()
    spread = rel.max() - rel.min()
    rel = (rel - rel.min() + 1e-6) / spread if float(spread) > 0 else torch.ones_like(rel)
    x = _unit(features)
    kernel = rel[:, None] * (x @ x.T) * rel[None, :]
    diag = torch.diagonal(kernel).clone()
    chosen: list[int] = []
    basis: list[int] = []  # the picks that condition the others (residual > 1e-12)
    for _ in range(k):
        gains = diag.clone()
        if basis:
            s = torch.tensor(basis)
            factor = torch.linalg.cholesky(kernel[s][:, s])
            solved = torch.linalg.solve_triangular(factor, kernel[s], upper=False)  # [|S|, N]
            gains = diag - (solved**2).sum(dim=0)
        gains[chosen] = -torch.inf
        j = int(torch.argmax(gains))
        chosen.append(j)
        if float(gains[j]) > 1e-12:
            basis.append(j)
    return torch.sort(torch.tensor(chosen, dtype=torch.long)).values


def mmtok_naive(vision: torch.Tensor, text: torch.Tensor, k: int, vision_sim: torch.Tensor | None = None, *,
                alpha: float = 0.5, tv_temp: float = 0.02, vv_temp: float = 0.2) -> torch.Tensor:
    """MMTok's greedy coverage as the paper writes it (MMTok, 2025): ``C = [P; alpha Q]``
    ``[M + N, N]``; at every step ``best`` is recomputed from the chosen columns and every token's gain
    ``sum_r max(C[r, j] - best_r, 0)`` over all ``M + N`` items -- O(k (M + N) N). First index on ties."""
    n = vision.shape[0]
    if k >= n:
        return torch.arange(n)
    vs = vision if vision_sim is None else vision_sim
    items = [alpha * torch.softmax(_unit(vs) @ _unit(vs).T / vv_temp, dim=-1) / n]
    if text.shape[0]:
        items.insert(0, torch.softmax(_unit(text) @ _unit(vision).T / tv_temp, dim=-1) / text.shape[0])
    cover = torch.cat(items)  # [M + N, N]
    chosen: list[int] = []
    for _ in range(k):
        best = cover[:, chosen].max(dim=1).values if chosen else torch.zeros(cover.shape[0])
        gain = (cover - best[:, None]).clamp_min(0).sum(dim=0)
        gain[chosen] = -torch.inf
        chosen.append(int(torch.argmax(gain)))
    return torch.sort(torch.tensor(chosen, dtype=torch.long)).values


def lof_outlier_fraction_naive(values: torch.Tensor, n_neighbors: int) -> float:
    """Recoverable Compression's LOF outlier fraction the textbook way: the full ``N x N`` fp64 distance matrix,
    every row sorted (stable: ties to the lowest index), the first ``n_neighbors`` taken -- O(N^2 log N) time and
    O(N^2) memory. :func:`tokenprune.functional.lof_outlier_fraction` gives the same value bit for bit."""
    x = values.double().reshape(-1)
    n = x.numel()
    if n < 2:
        return 0.0
    k = min(n_neighbors, n - 1)
    dist = (x[:, None] - x[None, :]).abs()
    dist.fill_diagonal_(torch.inf)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    near = torch.gather(dist, 1, order)
    reach = torch.maximum(near, near[:, -1][order])
    lrd = 1.0 / (reach.mean(dim=1) + 1e-10)
    lof = (lrd[order] / lrd[:, None]).mean(dim=1)
    return float((lof > 1.5).sum()) / n


def cluster_rows_naive(keys: torch.Tensor, sim: torch.Tensor, x: torch.Tensor, attn: torch.Tensor,
                       centers: torch.Tensor, others: torch.Tensor, cluster_size: int,
                       text_weight: float) -> list[torch.Tensor]:
    """Recoverable's recovery step as the official loop writes it: per centre, the candidate list (centres before
    it, centres after it, the others) and their keys gathered afresh, affinities, the top ``cluster_size``
    (stable: ties to the earlier candidate). :func:`tokenprune.functional.recovery.cluster_rows` is the same."""
    rows = []
    for i in range(centers.numel()):
        cands = torch.cat([centers[:i], centers[i + 1:], others])
        affinity = keys[cands] @ keys[centers[i]] + text_weight * sim[cands]
        members = cands[torch.sort(affinity, descending=True, stable=True).indices[:min(cluster_size, cands.numel())]]
        rows.append(x[centers[i]] + (attn[members, None] * x[members]).sum(dim=0))
    return rows


def _relevance(ctx: SelectionContext) -> torch.Tensor:
    feats, text = ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS)
    if not text.shape[0]:
        return feats.new_ones(ctx.n).float()
    return (_unit(feats) @ _unit(text).T).mean(dim=1)


def _pivot(ctx: SelectionContext) -> int:
    return int(torch.argmax(ctx.signal(CLS_ATTENTION, -1).float().mean(dim=0)))


# method name -> ctx -> kept indices, for the methods' default options (those the benchmark instantiates)
REFERENCES: dict[str, Callable[[SelectionContext], torch.Tensor]] = {
    "divprune": lambda ctx: divprune_naive(ctx.signal(FEATURES), ctx.k),
    "kcenter": lambda ctx: kcenter_naive(ctx.signal(FEATURES), ctx.k, _pivot(ctx)),
    "cdpruner": lambda ctx: cdpruner_naive(ctx.signal(FEATURES), _relevance(ctx), ctx.k),
    "mmtok": lambda ctx: mmtok_naive(ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS), ctx.k,
                                     ctx.signal(VISION_HIDDEN), tv_temp=0.02 if ctx.cls_token else 0.01),
}
