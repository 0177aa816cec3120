"""VFlowOpt (ICCV 2025): ViT-attention importance, ViT-output pruning with recycling into 2-D cells, and the LLM
stages that reuse the same map (official ``llava_qwen_training_free.py`` and the patched ``modeling_qwen2.py``).
One image (or crop) at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenprune.functional._ranking import top_k_indices


@dataclass(frozen=True)
class VFlowOptConfig:
    """One shipped configuration: global-token threshold ``t``, entropy weight ``alpha_v``, cell size ``m``,
    ViT keep ratio ``r_vit`` and LLM keep ratios ``llm_r`` (of the current count) at the two LLM layers."""

    t: float
    alpha_v: float
    m: float
    r_vit: float
    llm_r: tuple[float, float]


# The configurations the flow-guided search found (official lmms-eval model config), by budget: the budget is the
# layer-averaged share of visual tokens over the LLM (layers 9 and 18 of 28 in LLaVA-OneVision-7B).
CONFIGS = {
    0.10: VFlowOptConfig(39.265, 0.0, 17.387, 0.11662, (1.0, 0.6011)),
    0.25: VFlowOptConfig(34.760, 0.0, 15.581, 0.2651, (0.9833, 0.8773)),
    0.50: VFlowOptConfig(28.683, 0.0, 11.757, 0.7233, (0.7487, 0.487)),
}
_NO_PRUNING = VFlowOptConfig(28.683, 0.0, 11.757, 1.0, (1.0, 1.0))


def vflowopt_config(budget: float) -> VFlowOptConfig:
    """The shipped configuration at 0.10 / 0.25 / 0.50; between them (and towards "no pruning" at 1.0) every field
    is interpolated linearly; below 0.10 the ratios scale down proportionally."""
    if budget >= 1.0:
        return _NO_PRUNING
    points = sorted({**CONFIGS, 1.0: _NO_PRUNING}.items())
    if budget <= points[0][0]:
        c, f = points[0][1], budget / points[0][0]
        return VFlowOptConfig(c.t, c.alpha_v, c.m, c.r_vit * f, c.llm_r)
    for (b0, c0), (b1, c1) in zip(points[:-1], points[1:], strict=True):
        if b0 <= budget <= b1:
            w = (budget - b0) / (b1 - b0)

            def mix(x: float, y: float, w: float = w) -> float:
                return x + w * (y - x)

            llm_r = (mix(c0.llm_r[0], c1.llm_r[0]), mix(c0.llm_r[1], c1.llm_r[1]))
            return VFlowOptConfig(mix(c0.t, c1.t), mix(c0.alpha_v, c1.alpha_v), mix(c0.m, c1.m),
                                  mix(c0.r_vit, c1.r_vit), llm_r)
    raise AssertionError("unreachable")


def vflowopt_importance(
    attention: torch.Tensor, t: float, entropy: torch.Tensor | None = None, alpha_v: float = 0.0
) -> torch.Tensor:
    """Importance of each token from the head-mean ViT attention ``[N, N]`` (rows = queries): global tokens
    ``G = {j : received_j > t * mean(received)}`` with ``received`` the column mean; importance = mean of the rows of
    ``G`` (all rows when ``G`` is empty) ``+ alpha_v * softmax(entropy)`` (patch grey-level entropy; the shipped
    configs use ``alpha_v = 0``)."""
    a = attention.float()
    received = a.mean(dim=0)
    glob = received > t * received.mean()
    imp = a[glob].mean(dim=0) if bool(glob.any()) else a.mean(dim=0)
    if alpha_v:
        if entropy is None:
            raise ValueError("vflowopt: alpha_v > 0 needs the patch entropy")
        imp = imp + alpha_v * torch.softmax(entropy.float(), dim=0)
    return imp


def vflowopt_recycle(
    importance: torch.Tensor, grid: tuple[int, int], r_vit: float, m: float
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """ViT-output pruning with recycling: ``reduce = round(N (1 - r_vit))`` (Python's ``round``, half to even, as
    the official code) and ``n_merge = int(N / m^2)``; the
    ``reduce + n_merge`` least important tokens are removed and grouped by 2-D cell ``(row // m, col // m)`` of the
    ``grid``; each group becomes one token, the importance-weighted mean of its members, written into its most
    important member, which is kept. Returns ``(kept, groups)``: the kept tokens (ascending, representatives
    included) and per group ``(representative, members, weights)`` in representative order."""
    n = importance.shape[0]
    imp = importance.float()
    reduce = round(n * (1 - r_vit))
    removed_count = min(n, reduce + int(n / (m * m)))
    if removed_count <= 0:
        return torch.arange(n), []
    removed = torch.sort(imp, stable=True).indices[:removed_count]  # lowest first, ties to the lowest index
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    w = grid[1]
    cells = (removed // w).float().div(m).floor().long() * (n + 1) + (removed % w).float().div(m).floor().long()
    groups = []
    for cell in torch.unique(cells):
        members = torch.sort(removed[cells == cell]).values
        rep = int(members[top_k_indices(imp[members], 1)][0])
        keep[rep] = True
        groups.append((rep, members, imp[members] / imp[members].sum().clamp_min(1e-12)))
    groups.sort(key=lambda g: g[0])
    return keep.nonzero().squeeze(1), groups


def vflowopt_llm_counts(n: int, llm_r: tuple[float, ...]) -> list[int]:
    """Kept tokens after each LLM stage: stage ``s`` removes ``round(n_s (1 - r_s))`` (half to even, as the
    official code) of the CURRENT ``n_s``; at least one token stays (the official code can remove every one)."""
    out, cur = [], n
    for r in llm_r:
        cur = max(1, cur - round(cur * (1 - r)))
        out.append(cur)
    return out


def vflowopt_llm(importance: torch.Tensor, k: int) -> torch.Tensor:
    """LLM stage: the ``n - k`` tokens with the lowest ViT importance are removed, lowest first by a stable
    ascending sort as the official code, so on a tie at the cut the LOWER index is removed; returns the kept
    ``k`` ascending."""
    n = importance.shape[0]
    if k >= n:
        return torch.arange(n, device=importance.device)
    order = torch.sort(importance.float(), stable=True).indices  # ascending: the first n - k are removed
    return torch.sort(order[n - k:]).values
