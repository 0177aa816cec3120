"""MMTok: multimodal coverage maximisation (greedy facility location over text and vision items)."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k
from tokenprune.functional.diversity import unit_rows


def _unit(x: torch.Tensor) -> torch.Tensor:
    return unit_rows(x, 1e-12)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _unit(a) @ _unit(b).T


def mmtok(
    vision: torch.Tensor,
    text: torch.Tensor,
    k: int,
    vision_sim: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    tv_temp: float = 0.02,
    vv_temp: float = 0.2,
) -> torch.Tensor:
    """MMTok (MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs, 2025).

    ``vision`` ``[N, D]`` the projected tokens (selection space and text-vision similarity), ``text`` ``[M, D]``
    text embeddings in the same space, ``vision_sim`` ``[N, Dc]`` the space of the vision-vision term (LLaVA: the
    pre-projector CLIP features; defaults to ``vision``). Coverage items are the text rows,
    ``softmax(cos / tv_temp) / M``, and the vision rows, ``alpha * softmax(cos / vv_temp) / N``; ``k`` tokens are
    picked greedily by marginal coverage gain (ties: lowest index). ``M = 0`` leaves the vision term only.

    The greedy is evaluated lazily (Minoux's accelerated greedy): coverage is submodular, so a token's gain can
    only shrink as tokens are picked, and a gain computed against an earlier ``best`` is an upper bound. Each step
    recomputes the exact gain of the candidates with the highest bounds (in blocks) until the top candidate's gain
    is current; that candidate is the plain greedy's argmax (ties to the lowest index as before), so the output is
    the greedy's. Gains are computed per candidate over a contiguous ``[N, M + N]`` copy of the coverage
    (``_greedy_coverage``); N = 2,880 costs a few dozen gains per step instead of all N.
    """
    n = vision.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=vision.device)
    return _greedy_coverage(coverage_items(vision, text, vision_sim, alpha=alpha, tv_temp=tv_temp, vv_temp=vv_temp), k)


def coverage_items(
    vision: torch.Tensor, text: torch.Tensor, vision_sim: torch.Tensor | None = None, *, alpha: float = 0.5,
    tv_temp: float = 0.02, vv_temp: float = 0.2, block: int = 256,
) -> torch.Tensor:
    """MMTok's coverage ``[N, M + N]``: token ``j`` covers text item ``r`` by ``softmax(cos / tv_temp)[r, j] / M`` and
    vision item ``r`` by ``alpha * softmax(cos / vv_temp)[r, j] / N`` (rows of the softmax = items).

    Built in place, the vision-vision items ``block`` rows at a time: the only ``N x N`` array is the coverage the
    greedy reads (the paper's facility-location objective has ``N`` vision items per token), never a second one."""
    n, m = vision.shape[0], text.shape[0]
    # the text items first: their fp32 unit rows of ``vision`` ([N, D]) are freed before the coverage exists
    text_items = torch.softmax(_cosine(text, vision) / tv_temp, dim=-1).div_(m) if m else None  # [M, N]
    vs = _unit(vision if vision_sim is None else vision_sim)
    cover = torch.empty(n, m + n, dtype=torch.float32, device=vision.device)
    if text_items is not None:
        cover[:, :m] = text_items.T
    del text_items
    for start in range(0, n, block):
        sims = (vs[start:start + block] @ vs.T).div_(vv_temp)
        rows = torch.softmax(sims, dim=-1)  # [block, N]: items start..
        del sims
        cover[:, m + start:m + start + rows.shape[0]] = rows.mul_(alpha).div_(n).T  # alpha * rows / n, in place
    return cover


def _greedy_coverage(cover: torch.Tensor, k: int, block: int = 32) -> torch.Tensor:
    """Greedy maximum coverage, lazily: ``cover`` ``[N, R]`` (token ``j`` covers item ``r`` by ``cover[j, r]``),
    ``k`` tokens maximising ``sum_r max_{j in S} cover[j, r]``; ties to the lowest index; sorted ascending.

    ``bound[j]`` is token ``j``'s gain against some earlier ``best`` (exact where ``fresh``): an upper bound of its
    gain now (gains only shrink; the float sum of element-wise smaller terms in the same order is not larger). The
    argmax of the bounds (first on ties) is picked as soon as its bound is fresh: no other token can gain more, and
    one that gains as much has a higher index. Otherwise the ``block`` highest bounds are refreshed.
    """
    n = cover.shape[0]
    best = torch.zeros(cover.shape[1], dtype=cover.dtype, device=cover.device)
    bound = cover.sum(dim=1)  # gains against best = 0 (coverage is a softmax share, never negative: no clamped copy)
    fresh = torch.ones(n, dtype=torch.bool, device=cover.device)
    taken = torch.zeros(n, dtype=torch.bool, device=cover.device)
    chosen: list[int] = []
    while len(chosen) < k:
        pick = int(torch.argmax(bound))
        if bool(fresh[pick]):
            chosen.append(pick)
            taken[pick] = True
            bound[pick] = -torch.inf
            best = torch.maximum(best, cover[pick])
            fresh.copy_(taken)  # every gain is stale; picked tokens stay out (-inf, never refreshed)
            continue
        top = torch.topk(bound, min(block, n - len(chosen))).indices
        stale = torch.cat([top.new_tensor([pick]), top[~fresh[top]]])  # the argmax itself always: progress
        gains = cover.index_select(0, stale)  # [s, R] copy: the gain formula runs in place on it
        bound[stale] = gains.sub_(best).clamp_min_(0).sum(dim=1)
        fresh[stale] = True
    return torch.sort(torch.tensor(chosen, dtype=torch.long, device=cover.device)).values

