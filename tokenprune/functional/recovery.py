"""Recoverable Compression: outlier-adaptive visual + text-guided selection, then cluster recovery of the rest."""

from __future__ import annotations

import torch


def lof_outlier_fraction(values: torch.Tensor, n_neighbors: int) -> float:
    """Fraction of ``values`` (1-D) that scikit-learn's ``LocalOutlierFactor(n_neighbors, contamination='auto')``
    flags as outliers (local outlier factor > 1.5), computed exactly, brute force, in fp64. Neighbour ties go to the
    lowest index."""
    x = values.double().reshape(-1)
    n = x.numel()
    if n < 2:
        return 0.0
    k = min(n_neighbors, n - 1)
    dist = (x[:, None] - x[None, :]).abs()
    dist.fill_diagonal_(torch.inf)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]  # [n, k] nearest others
    near = torch.gather(dist, 1, order)
    k_distance = near[:, -1]
    reach = torch.maximum(near, k_distance[order])  # reach-dist(p, o) = max(k-distance(o), d(p, o))
    lrd = 1.0 / (reach.mean(dim=1) + 1e-10)
    lof = (lrd[order] / lrd[:, None]).mean(dim=1)
    return float((lof > 1.5).sum()) / n


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores in descending order (ties: lowest index)."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def recoverable(
    cls_attn: torch.Tensor,
    text_sim: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    *,
    neighbors: int = 20,
    rest_neighbors: int = 10,
    cluster_size: int = 32,
    text_weight: float = 50.0,
    quirks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recoverable Compression (Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text
    Information, AAAI 2025).

    ``cls_attn`` ``[N]`` [CLS] attention of the last vision layer (one full-width head), ``text_sim`` ``[N]``
    image-text similarity, ``hidden`` ``[N, D]`` the tokens to keep/merge (pre-projector), ``keys`` ``[N, Dk]`` the
    last layer's keys. Counts are data-dependent: LOF outlier fractions decide how many tokens the visual filter and
    the text recovery keep (main set), and how many cluster centres recover the rest. ``quirks=True`` takes the
    centre count as ``int(D * r)`` (the official code multiplies by the feature width, not the token count) and
    gives the rest token at rest-list position ``p`` the key of patch ``p`` (the official ``torch.gather`` of the
    keys by rest-list positions), which changes the merged rows, never the kept indices.
    Returns ``(main, merged)``: main indices ascending and ``[c + 1, D]`` fp32 rows = updated centres (descending
    attention) + one attention-weighted sum of the non-centres (dropped when there are no centres).
    """
    n = cls_attn.shape[0]
    attn, sim, x = cls_attn.double(), text_sim.double().clone(), hidden.double()
    visual = _top(attn, int(n * lof_outlier_fraction(attn, neighbors)))
    sim[visual] = sim.min()
    textual = _top(sim, int((n - visual.numel()) * lof_outlier_fraction(sim, neighbors)))
    main = torch.unique(torch.cat([visual, textual]))
    if main.numel() == 0:
        main = _top(attn, 1)  # never leave an image without a token (the official code can)
    rest_mask = torch.ones(n, dtype=torch.bool, device=attn.device)
    rest_mask[main] = False
    rest = rest_mask.nonzero().squeeze(1)
    if rest.numel() == 0:
        return main, hidden.new_zeros((0, hidden.shape[1]), dtype=torch.float32)
    width = hidden.shape[1] if quirks else rest.numel()
    n_centers = min(rest.numel(), int(width * lof_outlier_fraction(attn[rest], rest_neighbors)))
    if n_centers == 0:
        return main, hidden.new_zeros((0, hidden.shape[1]), dtype=torch.float32)
    centers = rest[_top(attn[rest], n_centers)]
    others = rest[~torch.isin(rest, centers)]
    k = keys.double() / keys.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if quirks:  # the official code gathers the rest tokens' keys by rest-list position p: key of patch p, not rest[p]
        k = k.clone()
        k[rest] = k[: rest.numel()].clone()
    rows = []
    for i in range(n_centers):
        cands = torch.cat([centers[:i], centers[i + 1:], others])  # the official candidate order
        affinity = k[cands] @ k[centers[i]] + text_weight * sim[cands]
        members = cands[_top(affinity, min(cluster_size, cands.numel()))]
        rows.append(x[centers[i]] + (attn[members, None] * x[members]).sum(dim=0))
    if others.numel():  # the official code appends it even when empty (a zero row); we do not
        rows.append((attn[others, None] * x[others]).sum(dim=0))
    return main, torch.stack(rows).float()

