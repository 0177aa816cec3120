"""Recoverable Compression: outlier-adaptive visual + text-guided selection, then cluster recovery of the rest."""

from __future__ import annotations

import torch


def _nearest_dense(x: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the points ``rows`` of the 1-D ``x``: their ``k`` nearest other points ``[R, k]`` in the order a stable
    sort of each distance row gives (by distance, ties to the lowest index) and those distances, from whole
    distance rows: the ``k``-th distance splits each row into the points certainly in (closer) and the tied ones
    at that distance, of which the lowest-index ones fill up to ``k``; only the ``k`` chosen are sorted."""
    dist = (x[rows, None] - x[None, :]).abs()  # [R, N]
    dist[torch.arange(rows.numel(), device=x.device), rows] = torch.inf
    kth = torch.kthvalue(dist, k, dim=1, keepdim=True).values
    closer = dist < kth
    tied = dist == kth
    room = k - closer.sum(dim=1, keepdim=True)
    chosen = closer | (tied & (tied.cumsum(dim=1) <= room))  # exactly k per row
    index = chosen.nonzero()[:, 1].reshape(rows.numel(), k)  # ascending index within each row
    near = torch.gather(dist, 1, index)
    order = torch.sort(near, dim=1, stable=True).indices  # by distance; equal distances keep the index order
    return torch.gather(index, 1, order), torch.gather(near, 1, order)


def _nearest(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_nearest_dense` for every point, in ``O(N k)`` from the sorted values.

    Rounding is monotone, so on either side of a point (in sorted order) the fp64 distances grow outward: the
    ``k`` smallest distances lie in the window of ``k`` sorted neighbours on each side, and so does every point
    closer than the ``k``-th distance. The points AT that distance (ties, which go to the lowest index) form one
    run per side; when each run is a single value (duplicates, sorted by index), its lowest indices are its first
    ``k`` places, which join the window as candidates. The chosen ``k`` are the first of the candidates by
    (distance, index). A run of several values that round to the same distance falls back to whole rows."""
    n = x.numel()
    dev = x.device
    sv, perm = torch.sort(x, stable=True)  # equal values keep index order
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(n, device=dev)
    offsets = torch.cat([torch.arange(-k, 0, device=dev), torch.arange(1, k + 1, device=dev)])
    window = pos[:, None] + offsets  # [N, 2k] sorted positions around each point
    inside = (window >= 0) & (window < n)
    window = window.clamp(0, n - 1)
    d_win = (x[:, None] - sv[window]).abs().masked_fill(~inside, torch.inf)
    kth = torch.kthvalue(d_win, k, dim=1).values  # [N]
    closer_left = (d_win[:, :k] < kth[:, None]).sum(1)
    closer_right = (d_win[:, k:] < kth[:, None]).sum(1)

    def dist_at(p: torch.Tensor) -> torch.Tensor:  # distance of each point to the sorted position(s) p [N] or [N, m]
        return ((x if p.ndim == 1 else x[:, None]) - sv[p.clamp(0, n - 1)]).abs()

    zero = kth == 0
    # the tied run on the right starts right after the closer points; on the left it ends right before them
    start_r = torch.where(zero, torch.searchsorted(sv, x, side="left"), pos + 1 + closer_right)
    has_r = (start_r < n) & (dist_at(start_r) == kth)
    end_r = torch.searchsorted(sv, sv[start_r.clamp(max=n - 1)], side="right")
    end_l = pos - 1 - closer_left
    has_l = ~zero & (end_l >= 0) & (dist_at(end_l) == kth)
    start_l = torch.searchsorted(sv, sv[end_l.clamp(min=0)], side="left")
    single = ~has_r | (end_r >= n) | (dist_at(end_r) > kth)
    single &= ~has_l | (start_l <= 0) | (dist_at(start_l - 1) > kth)
    steps = torch.arange(k + 1, device=dev)
    runs = torch.cat([start_r[:, None] + steps, start_l[:, None] + steps], dim=1)  # [N, 2k + 2]
    in_run = torch.cat([has_r[:, None] & (runs[:, : k + 1] < end_r[:, None]),
                        has_l[:, None] & (runs[:, k + 1:] <= end_l[:, None])], dim=1)
    lo, hi = (pos - k)[:, None], (pos + k)[:, None]
    in_run &= ((runs < lo) | (runs > hi))  # not already a window candidate (the point itself included)
    candidates = torch.cat([window, runs.clamp(0, n - 1)], dim=1)
    valid = torch.cat([inside, in_run], dim=1)
    dist = torch.cat([d_win, dist_at(runs)], dim=1).masked_fill(~valid, torch.inf)
    index = perm[candidates].masked_fill(~valid, n)
    by_index = torch.sort(index, dim=1).indices
    index, dist = torch.gather(index, 1, by_index), torch.gather(dist, 1, by_index)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    index, near = torch.gather(index, 1, order), torch.gather(dist, 1, order)
    redo = (~single).nonzero().squeeze(1)
    if redo.numel():
        index[redo], near[redo] = _nearest_dense(x, redo, k)
    return index, near


def lof_outlier_fraction(values: torch.Tensor, n_neighbors: int) -> float:
    """Fraction of ``values`` (1-D) that scikit-learn's ``LocalOutlierFactor(n_neighbors, contamination='auto')``
    flags as outliers (local outlier factor > 1.5), computed exactly, brute force, in fp64. Neighbour ties go to the
    lowest index. The neighbours come from the sorted values (``O(N k)`` time and memory, :func:`_nearest`), not
    from the ``N x N`` distance matrix; neighbours, their order and every sum are those of the textbook form
    (:func:`tokenprune.bench.references.lof_outlier_fraction_naive`), so the result is bit-identical."""
    x = values.double().reshape(-1)
    n = x.numel()
    if n < 2:
        return 0.0
    k = min(n_neighbors, n - 1)
    order, near = _nearest(x, k)  # [n, k] nearest others, by distance then index
    k_distance = near[:, -1]
    reach = torch.maximum(near, k_distance[order])  # reach-dist(p, o) = max(k-distance(o), d(p, o))
    lrd = 1.0 / (reach.mean(dim=1) + 1e-10)
    lof = (lrd[order] / lrd[:, None]).mean(dim=1)
    return float((lof > 1.5).sum()) / n


def cluster_rows(keys: torch.Tensor, sim: torch.Tensor, x: torch.Tensor, attn: torch.Tensor, centers: torch.Tensor,
                 others: torch.Tensor, cluster_size: int, text_weight: float, block: int = 64, *,
                 key_of: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Recoverable's recovery step: each centre (in order) gathers the ``cluster_size`` candidates of highest key
    affinity + ``text_weight`` x text similarity among the other centres and the non-centres (the official
    candidate order: centres before it, centres after it, then the others; ties to the earlier candidate) and
    becomes its row plus their attention-weighted rows (:func:`tokenprune.bench.references.cluster_rows_naive`).
    ``keys`` fp64 (unit rows in the method), token ``t``'s key being ``keys[t]`` or ``keys[key_of[t]]``; ``x`` in
    any float dtype (the rows a centre merges are upcast to fp64 as gathered).

    The official affinities are one fp64 matrix-vector product per centre, each streaming all ``N x D_k`` keys.
    Here ``block`` centres share one matrix product, which sums in another order: its affinities differ from the
    per-centre ones by at most ``_rounding_bound`` (``D_k`` unit products in fp64, about ``1e-13``). A centre's
    top ``cluster_size + 1`` affinities from the product are used when every gap between them exceeds twice that
    bound (then the per-centre products give the same members in the same order); otherwise, e.g. duplicated keys,
    that centre's affinities are the per-centre product itself. Same members, same order, same rows."""
    pool = torch.cat([centers, others])  # centre i sits at place i
    pool_keys, pool_sim = keys[pool if key_of is None else key_of[pool]], text_weight * sim[pool]
    size = min(cluster_size, pool.numel() - 1)
    norm = float(pool_keys.norm(dim=1).max()) if pool.numel() else 0.0
    margin = 2 * _rounding_bound(pool_keys.shape[1], norm * norm, float(pool_sim.abs().max()) if pool.numel() else 0.0)
    rows = []
    for start in range(0, centers.numel(), block):
        batch = pool_keys[start:start + block] @ pool_keys.T + pool_sim  # [b, P]
        for i in range(start, min(start + block, centers.numel())):
            affinity = batch[i - start]
            affinity[i] = -torch.inf  # the centre itself is no candidate
            top = torch.topk(affinity, min(size + 1, pool.numel()))
            gaps = top.values[:-1] - top.values[1:]  # descending: >= 0 (-inf - -inf is nan: not certain)
            if bool((gaps > margin).all()):
                members = pool[top.indices[:size]]
            else:  # a near tie: the official per-centre product decides (stable sort: ties to the earlier candidate)
                affinity = pool_keys @ pool_keys[i] + pool_sim  # pool_keys[i] is keys[centers[i]]
                affinity[i] = -torch.inf
                members = pool[_top(affinity, size)]
            rows.append(x[centers[i]].double() + x[members].double().mul_(attn[members, None]).sum(dim=0))
    return rows


def _rounding_bound(width: int, scale: float, offset: float) -> float:
    """Bound on how far two fp64 evaluations of ``u . v + s`` can differ for rows ``u, v`` of ``width`` with
    ``|u| |v| <= scale`` and ``|s| <= offset`` when only the order of the dot product's sum changes: each is within
    ``width * eps * scale`` of the exact dot (Higham's bound, ``sum |u_j v_j| <= |u| |v|``), plus one rounding of
    the sum; doubled for safety."""
    eps = torch.finfo(torch.float64).eps
    return 2 * (width * eps * 1.01 * scale + eps * (scale + offset))


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
    attn, sim = cls_attn.double(), text_sim.double().clone()
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
    k = keys.double()  # one fp64 copy, divided in place (a copy of the caller's tensor if it was fp64 already)
    norm = k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k / norm if k.data_ptr() == keys.data_ptr() else k.div_(norm)
    key_of = None
    if quirks:  # the official code gathers the rest tokens' keys by rest-list position p: key of patch p, not rest[p]
        key_of = torch.zeros(n, dtype=torch.long, device=k.device)
        key_of[rest] = torch.arange(rest.numel(), device=k.device)
    rows = cluster_rows(k, sim, hidden, attn, centers, others, cluster_size, text_weight, key_of=key_of)
    if others.numel():  # the official code appends it even when empty (a zero row); we do not
        rows.append(hidden[others].double().mul_(attn[others, None]).sum(dim=0))
    return main, torch.stack(rows).float()

