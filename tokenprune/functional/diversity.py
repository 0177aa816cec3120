"""Diversity selectors: DivPrune's greedy max-min and ToDRE's k-center / max-sum, batched over images or crops.

Cost (``B`` images of ``N`` tokens, ``D`` dims, ``k`` kept): the greedy needs only the distances from each newly
chosen token, one ``[N, D] x [D]`` product per pick -- ``k N D`` in all, memory ``O(N D)`` (the fp32 unit rows).
DivPrune's first pick (the token farthest from its nearest neighbour) needs every pair: ``N^2 D``, computed in
column blocks so that the extra memory stays ``O(N D)``; where the fp32 ``N x N`` matrix fits the memory bound of
two fp32 copies of the features (:func:`keeps_matrix`: ``N <= 2 D``, e.g. every LLaVA-OneVision image at ``D = 4096``)
it is kept and its rows serve the greedy
(no further products; the distances are then those of the one-matmul matrix the code used before). k-center does
the same: at ``k = N / 9`` one compute-bound ``N^2 D`` matmul beats ``k`` memory-bound ``N D`` products on a CPU
(measured: ``docs/selection_cost.md``), and beyond ``N = 2 D`` the per-pick products keep the memory linear.
"""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k


def keeps_matrix(n: int, d: int) -> bool:
    """Whether selectors keep the fp32 ``N x N`` similarity matrix: when it is no larger than two fp32 copies of the
    ``[N, D]`` features (``N^2 <= 2 N D``), the extra-memory bound of the selection-cost targets."""
    return n <= 2 * d


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


def similarities(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` dot products of every row of ``x`` ``[B, N, D]`` with row ``index[b]`` of the same image: one
    matrix-vector product per image (a batched one rounds differently from the single-image product, and a batch
    must select exactly as its images one by one). ``index`` stays on the device: no host synchronisation."""
    return torch.stack([torch.mv(x[b], x[b].index_select(0, index[b:b + 1])[0]) for b in range(x.shape[0])])


class _Distances:
    """Rows of the cosine-distance matrix of unit rows ``x`` ``[B, N, D]`` on demand: from the full matrix when it
    is kept (:func:`keeps_matrix`), else one matrix-vector product per requested row (``N D``)."""

    def __init__(self, x: torch.Tensor, full: torch.Tensor | None = None) -> None:
        self.x, self.full = x, full
        self.batch = torch.arange(x.shape[0], device=x.device)

    def row(self, index: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` distances from token ``index[b]`` of each image (``index`` ``[B]`` long, stays on device)."""
        if self.full is not None:
            return self.full[self.batch, index]
        return 1.0 - similarities(self.x, index)

    def similarity_row(self, index: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.row(index)


def _nearest_other(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per token, the second smallest entry of its distance column (the smallest is itself): ``[B, N]``; and the
    full ``[B, N, N]`` matrix when :func:`keeps_matrix` (else ``None``: column blocks of ``block`` tokens, never
    kept)."""
    n, d = x.shape[-2:]
    if keeps_matrix(n, d):
        dist = 1.0 - torch.bmm(x, x.mT)  # bmm: the same rounding batched or alone
        return torch.topk(dist, 2, dim=-2, largest=False).values[:, 1], dist
    parts = []
    for start in range(0, n, block):
        dist = 1.0 - torch.bmm(x, x[:, start:start + block].mT)  # [B, N, block]: columns start..start+block
        parts.append(torch.topk(dist, 2, dim=-2, largest=False).values[:, 1])
    return torch.cat(parts, dim=-1), None


def divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (DivPrune: Diversity-based Visual Token Pruning for LMMs, Alvar et al., CVPR 2025).

    Greedy max-min diversity in cosine distance over the visual tokens ``[N, D]`` (the official code uses the
    projected tokens, i.e. the LLM's input space). The first pick is the token farthest from its nearest
    neighbour (second-smallest entry of its distance column, the smallest being itself); each next pick
    maximises the distance to the nearest already selected token; ``argmax`` ties go to the lowest index.
    ``[B, N, D]`` selects in ``B`` images (or crops) of ``N`` tokens at once -> ``[B, k]``, each row as alone.

    Cost: ``N^2 D`` for the first pick (every pair, in column blocks), then ``k N D`` (module docstring); the
    official code keeps the ``N x N`` matrix and re-reduces the selected rows at every step (``k^2 N``).

    Deliberate deviation: selected tokens are excluded from later picks (as the official Qwen port does). The
    official LLaVA loop has no exclusion and, once every remaining token duplicates a selected one, can
    re-pick an index and silently keep fewer than ``k`` tokens; whenever it picks ``k`` distinct tokens the
    two selections are identical.
    """
    feats, batched = _batched(features, k)
    n = feats.shape[1]
    if k >= n:
        return _everything(feats, batched)
    x = unit_rows(feats)  # n >= 2 here (k >= 1)
    nearest_other, full = _nearest_other(x, block=max(64, x.shape[-1] // (8 * x.shape[0])))  # blocks <= N D / 8
    first = torch.argmax(nearest_other, dim=-1)
    return _greedy(_Distances(x, full), first, k, rule="kcenter", batched=batched)


def kcenter(features: torch.Tensor, k: int, pivot: int | torch.Tensor = 0, *, rule: str = "kcenter") -> torch.Tensor:
    """ToDRE stage 1 (Effective Visual Token Pruning via Token Diversity and Task Relevance, 2025).

    Starting from the ``pivot`` token (ToDRE: the patch with the highest [CLS] attention of the last vision layer),
    ``rule="kcenter"`` (paper v1) greedily adds the token farthest, in cosine distance, from its nearest chosen
    token; ``rule="maxsum"`` (paper v2, Algorithm 1) adds the token with the smallest summed cosine similarity to
    the chosen ones. Ties to the lowest index; kept indices ascending. ``[B, N, D]`` features with a ``[B]``
    ``pivot`` select in ``B`` images (or crops) at once -> ``[B, k]``. Cost ``k N D``, memory ``O(N D)``; where
    :func:`keeps_matrix` the ``N x N`` matrix is computed instead (``N^2 D`` in one matmul,
    which a CPU runs faster than ``k`` memory-bound matrix-vector products at ``k = N / 9``).
    """
    if rule not in ("kcenter", "maxsum"):
        raise ValueError(f"kcenter rule must be 'kcenter' or 'maxsum'; got {rule!r}")
    feats, batched = _batched(features, k)
    if k >= feats.shape[1]:
        return _everything(feats, batched)
    x = unit_rows(feats)
    first = torch.as_tensor(pivot, dtype=torch.long, device=x.device).reshape(-1).expand(x.shape[0])
    full = 1.0 - torch.bmm(x, x.mT) if keeps_matrix(*x.shape[1:]) else None  # see the module docstring
    return _greedy(_Distances(x, full), first, k, rule=rule, batched=batched)


def _greedy(dist: _Distances, first: torch.Tensor, k: int, *, rule: str, batched: bool) -> torch.Tensor:
    """Greedy diversity from ``first`` ``[B]``: ``kcenter`` keeps each token's distance to its nearest chosen
    token (running minimum), ``maxsum`` its negated similarity summed in pick order; chosen tokens at ``-inf``.
    No host synchronisation inside the loop (picks stay on the device)."""
    chosen = torch.empty(first.shape[0], k, dtype=torch.long, device=first.device)
    chosen[:, 0] = first
    score = dist.row(first) if rule == "kcenter" else -dist.similarity_row(first)
    score = score.scatter(1, first[:, None], -torch.inf)
    for i in range(1, k):
        pick = torch.argmax(score, dim=1)  # first maximum: ties to the lowest index
        chosen[:, i] = pick
        if i + 1 < k:
            score = torch.minimum(score, dist.row(pick)) if rule == "kcenter" else score - dist.similarity_row(pick)
            score.scatter_(1, pick[:, None], -torch.inf)
    out = torch.sort(chosen, dim=1).values
    return out if batched else out[0]
