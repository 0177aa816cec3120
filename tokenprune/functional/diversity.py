"""Diversity selectors."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` for the rows of ``features`` ``[N, D]``, computed in fp32 -> ``[N, N]``."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    return 1.0 - x @ x.T


def divprune(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune (DivPrune: Diversity-based Visual Token Pruning for LMMs, Alvar et al., CVPR 2025).

    Greedy max-min diversity in cosine distance over the visual tokens ``[N, D]`` (the official code uses the
    projected tokens, i.e. the LLM's input space). The first pick is the token farthest from its nearest
    neighbour (second-smallest entry of its distance column, the smallest being itself); each next pick
    maximises the distance to the nearest already selected token; ``argmax`` ties go to the lowest index.

    Deliberate deviation: selected tokens are excluded from later picks (as the official Qwen port does). The
    official LLaVA loop has no exclusion and, once every remaining token duplicates a selected one, can
    re-pick an index and silently keep fewer than ``k`` tokens; whenever it picks ``k`` distinct tokens the
    two selections are identical.
    """
    n = features.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=features.device)
    dist = cosine_distance(features)
    if n == 1:
        first = 0
    else:
        # per column: second smallest = nearest other token (topk(2), not a full column sort: O(N^2), not O(N^2 log N))
        nearest_other = torch.topk(dist, 2, dim=0, largest=False).values[1]
        first = int(torch.argmax(nearest_other))
    selected = [first]
    min_dist = dist[first].clone()  # running min over the selected rows: O(kN) instead of the official O(k^2 N)
    min_dist[first] = -torch.inf
    for _ in range(k - 1):
        pick = int(torch.argmax(min_dist))
        selected.append(pick)
        min_dist = torch.minimum(min_dist, dist[pick])
        min_dist[selected] = -torch.inf
    return torch.sort(torch.tensor(selected, dtype=torch.long, device=features.device)).values


def kcenter(features: torch.Tensor, k: int, pivot: int = 0, *, rule: str = "kcenter") -> torch.Tensor:
    """ToDRE stage 1 (Effective Visual Token Pruning via Token Diversity and Task Relevance, 2025).

    Starting from the ``pivot`` token (ToDRE: the patch with the highest [CLS] attention of the last vision layer),
    ``rule="kcenter"`` (paper v1) greedily adds the token farthest, in cosine distance, from its nearest chosen
    token; ``rule="maxsum"`` (paper v2, Algorithm 1) adds the token with the smallest summed cosine similarity to
    the chosen ones. Ties to the lowest index; kept indices ascending.
    """
    n = features.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=features.device)
    if rule not in ("kcenter", "maxsum"):
        raise ValueError(f"kcenter rule must be 'kcenter' or 'maxsum'; got {rule!r}")
    dist = cosine_distance(features)
    selected = [pivot]
    score = dist[pivot].clone() if rule == "kcenter" else -(1.0 - dist[pivot])
    score[pivot] = -torch.inf
    for _ in range(k - 1):
        pick = int(torch.argmax(score))
        selected.append(pick)
        score = torch.minimum(score, dist[pick]) if rule == "kcenter" else score - (1.0 - dist[pick])
        score[selected] = -torch.inf
    return torch.sort(torch.tensor(selected, dtype=torch.long, device=features.device)).values
