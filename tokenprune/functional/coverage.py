"""MMTok: multimodal coverage maximisation (greedy facility location over text and vision items)."""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.float() / a.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b.float() / b.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


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
    """
    n = vision.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=vision.device)
    vs = vision if vision_sim is None else vision_sim
    items = [alpha * torch.softmax(_cosine(vs, vs) / vv_temp, dim=-1) / n]
    if text.shape[0]:
        items.insert(0, torch.softmax(_cosine(text, vision) / tv_temp, dim=-1) / text.shape[0])
    cover = torch.cat(items)  # [M + N, N]
    best = torch.zeros(cover.shape[0], device=cover.device)
    taken = torch.zeros(n, dtype=torch.bool, device=cover.device)
    for _ in range(k):
        gain = (cover - best[:, None]).clamp_min(0).sum(dim=0)
        gain[taken] = -torch.inf
        pick = int(torch.argmax(gain))
        taken[pick] = True
        best = torch.maximum(best, cover[:, pick])
    return taken.nonzero().squeeze(1)
