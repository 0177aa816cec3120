"""Diversity selectors: DivPrune's greedy max-min and ToDRE's k-center / max-sum, batched over images or crops.

Cost (``B`` images of ``N`` tokens, ``D`` dims, ``k`` kept): the greedy reads one row of the similarity matrix per
pick -- ``k N D`` in all, the rows computed a block at a time by compute-bound matrix products
(:mod:`tokenprune.functional.similarity_rows`), memory ``O(N D)``. DivPrune's first pick (the token farthest from
its nearest neighbour) needs every pair in the worst case, ``N^2 D``; rows of probe tokens and distance bounds
skip the pairs that cannot decide it (:func:`_first_pick`); up to 1,024 tokens (an fp32 matrix of at most
4 MiB) the whole matrix is one product whose rows serve the greedy
(:class:`~tokenprune.functional.similarity_rows.SimilarityRows`). Images of a batch select one after the other
(each its own products: the result of each equals the image alone).
"""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k
from tokenprune.functional.similarity_rows import SimilarityRows


def unit_rows(features: torch.Tensor, eps: float = torch.finfo(torch.float32).tiny) -> torch.Tensor:
    """fp32 rows of ``features`` ``[..., N, D]`` scaled to unit norm (norms clamped at ``eps``: zero rows stay
    zero). One fp32 copy of the features (divided in place when the upcast already copied them)."""
    x = features.float()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return x / norm if x.data_ptr() == features.data_ptr() else x.div_(norm)


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` for the rows of ``features`` ``[..., N, D]``, computed in fp32 -> ``[..., N, N]``."""
    x = unit_rows(features)
    return 1.0 - x @ x.mT


def _batched(features: torch.Tensor, k: int) -> tuple[torch.Tensor, bool]:
    if features.ndim not in (2, 3):
        raise ValueError(f"features must be [N, D] (one image) or [B, N, D] (B images or crops of N tokens each); "
                         f"got shape {tuple(features.shape)}")
    check_k(k, features.shape[-2])
    return (features if features.ndim == 3 else features[None]), features.ndim == 3


def _everything(x: torch.Tensor, batched: bool) -> torch.Tensor:
    out = torch.arange(x.shape[1], device=x.device)
    return out.expand(x.shape[0], -1).clone() if batched else out


def _nearest_similarity(rows: torch.Tensor) -> torch.Tensor:
    """Second largest entry of each row of ``[m, N]`` similarity rows (the largest being the token itself)."""
    return torch.topk(rows, 2, dim=1).values[:, 1]


def _first_pick(x: torch.Tensor, rows: SimilarityRows, block: int = 256) -> int:
    """DivPrune's first pick for one image (unit rows ``x`` ``[N, D]``, ``N >= 2``): the token whose nearest other
    token is farthest, ``argmax_j (1 - v_j)`` with ``v_j`` the second largest similarity in column ``j`` (ties: lowest
    index). The textbook reads every pair (``N^2 D``); this reads the pairs that can decide it.

    ``x x^T`` is symmetric (``s_ij`` and ``s_ji`` are the same products summed in the same order), so column ``j`` is
    row ``j``, and rows of a product of at least 16 rows round as the full matrix's (:mod:`similarity_rows`). The
    rows of ``N / 8`` probe tokens give their exact ``v`` and, for every other token ``j``, a lower bound of ``v_j``:
    the second largest of the known entries of row ``j`` (its probe similarities and ``s_jj >= 1/2`` for a unit
    row). ``1 - v`` rounds monotonically, so ``1 - bound`` bounds token ``j``'s distance from above; rows are then
    computed, highest bound first, for every token whose bound reaches the best exact distance so far -- the others
    cannot be picked. Worst case (equidistant tokens) every row, the textbook's cost."""
    n = x.shape[0]
    if rows.full is not None:  # small: the whole matrix
        return int(torch.argmax(1.0 - _nearest_similarity(rows.full)))
    probes = torch.arange(0, n, max(1, n // max(16, n // 8)), device=x.device)  # N / 8, at least 16
    probe_rows = x.index_select(0, probes) @ x.T  # [m, N]
    exact = torch.full((n,), torch.nan, device=x.device)
    exact[probes] = 1.0 - _nearest_similarity(probe_rows)
    top = torch.topk(probe_rows, 2, dim=0).values  # [2, N]: largest probe similarities of every token
    rows.keep(probes, probe_rows)  # as far as the greedy's store holds them; the product itself goes now
    del probe_rows
    own = torch.where(torch.linalg.vector_norm(x, dim=-1) > 0.95, 0.5, -torch.inf)  # s_jj >= 1/2: a unit row
    bound = 1.0 - torch.maximum(torch.minimum(own, top[0]), top[1])  # >= 1 - v_j
    bound[probes] = -torch.inf  # exact there
    best = exact.nan_to_num(-torch.inf).max()
    while True:
        open_ = (bound >= best).nonzero().flatten()
        if open_.numel() == 0:
            break
        if open_.numel() >= 16:
            wanted = open_[torch.topk(bound[open_], min(block, open_.numel())).indices]
        else:  # a product of at least 16 rows: the next highest bounds fill it (far from their probes: greedy picks)
            wanted = torch.topk(bound, min(16, int(torch.isfinite(bound).sum()))).indices
        real = wanted.numel()
        if real < 16:  # fewer than 16 tokens without a row: pad with the first wanted token
            wanted = torch.cat([wanted, wanted[:1].expand(16 - real)])
        sims = x.index_select(0, wanted) @ x.T  # [w, N]: new probes, which tighten every bound
        rows.keep(wanted[:real], sims[:real])  # far from their neighbours: likely picks of the greedy
        exact[wanted] = 1.0 - _nearest_similarity(sims)
        top = torch.topk(torch.cat([top, sims[:real]]), 2, dim=0).values  # each probe once
        bound = torch.minimum(bound, 1.0 - torch.maximum(torch.minimum(own, top[0]), top[1]))
        bound[wanted] = -torch.inf
        best = torch.maximum(best, exact[wanted].max())
    return int(torch.argmax(exact.nan_to_num(-torch.inf)))


def divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (DivPrune: Diversity-based Visual Token Pruning for LMMs, Alvar et al., CVPR 2025).

    Greedy max-min diversity in cosine distance over the visual tokens ``[N, D]`` (the official code uses the
    projected tokens, i.e. the LLM's input space). The first pick is the token farthest from its nearest
    neighbour (second-smallest entry of its distance column, the smallest being itself); each next pick
    maximises the distance to the nearest already selected token; ``argmax`` ties go to the lowest index.
    ``[B, N, D]`` selects in ``B`` images (or crops) of ``N`` tokens at once -> ``[B, k]``, each row as alone.

    Cost: the first pick reads the rows that can decide it (:func:`_first_pick`: probe rows and distance bounds;
    every pair, ``N^2 D``, in the worst case and as the whole matrix up to 1,024 tokens), then the greedy reads
    ``k`` rows, computed in blocks (:class:`~tokenprune.functional.similarity_rows.SimilarityRows`, about
    ``k N D``) and seeded with the first pick's; the official code builds the matrix and re-reduces the selected
    rows at every step (``k^2 N``).

    Deliberate deviation: selected tokens are excluded from later picks (as the official Qwen port does). The
    official LLaVA loop has no exclusion and, once every remaining token duplicates a selected one, can
    re-pick an index and silently keep fewer than ``k`` tokens; whenever it picks ``k`` distinct tokens the
    two selections are identical.
    """
    feats, batched = _batched(features, k)
    n = feats.shape[1]
    if k >= n:
        return _everything(feats, batched)
    out = []
    for x in unit_rows(feats):  # n >= 2 here (k >= 1)
        rows = SimilarityRows(x)  # the rows the first pick computes serve the greedy
        out.append(_greedy(rows, _first_pick(x, rows), k, rule="kcenter"))
    return torch.stack(out) if batched else out[0]


def kcenter(features: torch.Tensor, k: int, pivot: int | torch.Tensor = 0, *, rule: str = "kcenter") -> torch.Tensor:
    """ToDRE stage 1 (Effective Visual Token Pruning via Token Diversity and Task Relevance, 2025).

    Starting from the ``pivot`` token (ToDRE: the patch with the highest [CLS] attention of the last vision layer),
    ``rule="kcenter"`` (paper v1) greedily adds the token farthest, in cosine distance, from its nearest chosen
    token; ``rule="maxsum"`` (paper v2, Algorithm 1) adds the token with the smallest summed cosine similarity to
    the chosen ones. Ties to the lowest index; kept indices ascending. ``[B, N, D]`` features with a ``[B]``
    ``pivot`` select in ``B`` images (or crops) at once -> ``[B, k]``. Cost about ``k N D`` (the chosen tokens'
    rows, computed in blocks: :class:`~tokenprune.functional.similarity_rows.SimilarityRows`), memory ``O(N D)``.
    """
    if rule not in ("kcenter", "maxsum"):
        raise ValueError(f"kcenter rule must be 'kcenter' or 'maxsum'; got {rule!r}")
    feats, batched = _batched(features, k)
    if k >= feats.shape[1]:
        return _everything(feats, batched)
    pivots = torch.as_tensor(pivot, dtype=torch.long).reshape(-1).expand(feats.shape[0]).tolist()
    out = [_greedy(SimilarityRows(x), first, k, rule=rule) for x, first in zip(unit_rows(feats), pivots, strict=True)]
    return torch.stack(out) if batched else out[0]


def _greedy(rows: SimilarityRows, first: int, k: int, *, rule: str) -> torch.Tensor:
    """Greedy diversity from ``first`` over one image: ``kcenter`` keeps each token's distance ``1 - s`` to its
    nearest chosen token (running minimum, in place), ``maxsum`` its negated similarity summed in pick order (the
    similarity as ``1 - (1 - s)``, the textbook's rounding); chosen tokens at ``-inf``. Sorted kept indices."""
    chosen = [first]
    distance = 1.0 - rows.take(first)
    score = distance if rule == "kcenter" else -(1.0 - distance)
    score[first] = -torch.inf
    for i in range(1, k):
        pick = int(torch.argmax(score))  # first maximum: ties to the lowest index
        chosen.append(pick)
        if i + 1 < k:
            distance = 1.0 - rows.take(pick, score)
            if rule == "kcenter":
                torch.minimum(score, distance, out=score)
            else:
                score.sub_(1.0 - distance)
            score[pick] = -torch.inf
    return torch.sort(torch.tensor(chosen, dtype=torch.long, device=score.device)).values
