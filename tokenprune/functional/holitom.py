"""HoliTom: holistic token merging for video LLMs (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large
Language Models", NeurIPS 2025, arXiv 2505.21334; official code github.com/cokeshao/HoliTom).

Outer-LLM (before the LLM, on the projected, pooled frame tokens ``[F, N, D]``):

1. **Global temporal segmentation** (:func:`static_windows`): ``sim[f, n]`` = cosine of token ``n`` between frames
   ``f`` and ``f+1``. A window ``[s, e]`` saves ``(e - s) * #{n : sim[s..e-1, n] > tau all}`` tokens (its static
   positions collapse to one token each); a dynamic programme over the frames picks the windows (length 1 to
   ``max_window``) that save the most, a longer window replacing a shorter choice only when strictly better.
2. **Temporal merging**: a static position of a window becomes the mean of its frames' tokens.
3. **Spatial merging** with the retain ratio raised by what step 1 saved, ``r' = min(r / ((T - saved) / T), 1)``
   (``T = F N``): each frame's dynamic tokens keep their ``ceil(L r')`` most attended (attention received in the
   last vision layer; with a contextual share ``d > 0`` part of them are DPC-kNN cluster centres instead), and a
   window's static tokens are clustered by DPC-kNN into ``round(S r')`` tokens (:func:`cluster_centers`,
   :func:`cluster_merge`: a centre absorbs its nearest non-centres as ``beta * centre + (1 - beta) * mean(members)``).
   The sequence per window is ``[static clusters, frame s tokens, ..., frame e tokens]`` (official "one_token"
   layout).

Inner-LLM (:func:`holitom_inner`, at decoder layer ``K``): the image tokens most attended by the last prompt token
(head mean, attention of layer ``K - 1``) stay, ``round(n (1 - r))`` of them; every other one is averaged into its
most cosine-similar kept token, one after the other in prompt order (``h_t <- (h_t + h_m) / 2``), so a kept token
with members ``m_1 < ... < m_j`` ends as ``2^-j h_t + sum_i 2^-(j-i+1) h_{m_i}``.

Worked examples (derived by hand from the official code, tested exactly in tests/test_holitom.py):

* Segmentation, 4 frames x 2 tokens, ``tau = 0.8``, similarities ``[[.9, .1], [.9, .9], [.1, .9]]``: windows save
  [0,1] 1, [1,2] 2, [2,3] 1, [0,2] 2 (token 0 over two steps), [1,3] 2 (token 1), [0,3] 0. DP: ``dp = [0, 1, 2, 2]``
  -- at frame 2 the window [1,2] (2) beats [0,1] + frame 2 (1) and [0,2] only ties; at frame 3 nothing beats
  ``dp[2]`` strictly -- so the segments are ``[(0, 0), (1, 2), (3, 3)]``, 2 tokens saved.
* Outer merge, 2 frames of 4 one-dimensional tokens ``[1, 2, 4, 11]`` then ``[1, 2, 4, -11]``, ``ratio = 0.25``:
  positions 0..2 are static over the one window [0, 1] (saved 3), ``r' = 0.25 / (5 / 8) = 0.4``; the static means
  ``[1, 2, 4]`` give ``round(3 * 0.4) = 1`` cluster (knn 1: equal densities, equal separations -> centre 0) =
  ``0.6 * 1 + 0.4 * mean(2, 4) = 1.8``; the dynamic position 3 keeps ``ceil(1 * 0.4) = 1`` token per frame.
  Sequence: ``[1.8, frame 0 token 3, frame 1 token 3]``.
* DPC-kNN on ``[1, 2, 4, 11]``, 2 centres, knn 2: densities ``e^-.5, e^-.5, e^-2, e^-24.5``, separations ``10, 10,
  2, 7`` -> centres 0 and 1; 4 and 11 join centre 1: merged ``[1, 0.6 * 2 + 0.4 * 7.5 = 4.2]``.
* Inner merge, kept token ``t`` with members ``a < b``: ``((h_t + h_a) / 2 + h_b) / 2 = h_t/4 + h_a/4 + h_b/2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as nnf

from tokenprune.functional._ranking import top_k_indices
from tokenprune.functional.sparsevlm import dpc_knn


def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """``[F - 1, N]`` fp32 cosine similarity of each token with the same token of the next frame (``[F, N, D]``)."""
    x = nnf.normalize(features.float(), p=2, dim=-1)
    return nnf.cosine_similarity(x[:-1], x[1:], dim=-1)


def static_windows(similarity: torch.Tensor, tau: float = 0.8, max_window: int = 1024) -> tuple[list[tuple[int, int]],
                                                                                                   int]:
    """Temporal segments ``[(start, end), ...]`` (inclusive, covering every frame in order) and the tokens they
    save, from :func:`frame_similarity` ``[F - 1, N]`` (official ``select_static_windows``)."""
    frames = similarity.shape[0] + 1
    above = (similarity > tau).long()  # [F-1, N]
    # static[s][e] = positions whose similarity stays above tau over every step of s..e (e > s)
    saved = [[0] * frames for _ in range(frames)]
    for s in range(frames - 1):
        run = torch.cumprod(above[s:], dim=0).sum(dim=1).tolist()  # run[j]: static over s..s+j+1
        for j, count in enumerate(run):
            saved[s][s + j + 1] = int(count) * (j + 1)
    best = [0] * frames
    start = [0] * frames
    for i in range(frames):
        value, first = (best[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            candidate = (best[j] if j >= 0 else 0) + saved[j + 1][i]
            if candidate > value:
                value, first = candidate, j + 1
        best[i], start[i] = value, first
    segments, i = [], frames - 1
    while i >= 0:
        segments.append((start[i], i))
        i = start[i] - 1
    return segments[::-1], best[-1]


def cluster_centers(x: torch.Tensor, centers: int, knn: int = 7) -> torch.Tensor:
    """DPC-kNN cluster centres of ``x`` ``[L, D]``, sorted ascending (official HoliTom sorts them):
    :func:`tokenprune.functional.sparsevlm.dpc_knn`, the same rule (exact ties to the lowest index; the official
    code breaks density ties with 1e-6 noise)."""
    return torch.sort(dpc_knn(x, centers, knn)[0]).values


def cluster_merge(x: torch.Tensor, centers: torch.Tensor, beta: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged tokens ``[c, D]`` (fp32) and each token's cluster ``[L]``: every non-centre joins its nearest centre
    (``cdist``; ties: the first centre); a cluster with members is ``beta * centre + (1 - beta) * mean(members)``,
    one without is its centre (official ``merge_tokens_by_clustering`` with its default BETA weighting)."""
    x = x.float()
    assign = torch.cdist(x[None], x[centers][None])[0].argmin(dim=-1)
    assign[centers] = torch.arange(centers.numel())
    merged = x[centers].clone()
    is_center = torch.zeros(x.shape[0], dtype=torch.bool)
    is_center[centers] = True
    for c in range(centers.numel()):
        members = (assign == c) & ~is_center
        if members.any():
            merged[c] = beta * x[centers[c]] + (1 - beta) * x[members].mean(dim=0)
    return merged, assign


@dataclass(frozen=True)
class OuterResult:
    """The outer stage's answer over the video's ``F * N`` tokens (frame-major).

    ``kept`` tokens pass unchanged (sorted); ``merged`` ``[m, D]`` fp32 are new tokens (static windows' clusters,
    contextual clusters); ``assign`` ``[F * N]``: the merged token each original token went into, or -1; ``order``
    ``[k + m]`` indexes ``cat([kept, merged])`` in the official sequence order; ``segments`` the temporal windows."""

    kept: torch.Tensor
    merged: torch.Tensor
    assign: torch.Tensor
    order: torch.Tensor
    segments: tuple[tuple[int, int], ...]
    ratio: float


def _retain(length: int, ratio: float, d: float) -> tuple[int, int]:
    total = math.ceil(length * ratio)
    dominant = round(total * (1 - d))
    return dominant, total - dominant


def holitom_outer(
    features: torch.Tensor, attention: torch.Tensor, ratio: float, *, tau: float = 0.8, beta: float = 0.6,
    d: float = 0.0, knn: int = 7, max_window: int = 1024,
) -> OuterResult:
    """HoliTom's outer-LLM merge of one video: ``features`` ``[F, N, D]`` (projected, pooled), ``attention``
    ``[F, N]`` (attention each token receives in the last vision layer), ``ratio`` the retain ratio in (0, 1]
    (1: every token kept unchanged, no merging)."""
    frames, n, dim = features.shape
    total = frames * n
    if ratio >= 1.0:
        every = torch.arange(total)
        return OuterResult(every, features.new_zeros(0, dim).float(), torch.full((total,), -1), every,
                           ((0, frames - 1),), 1.0)
    x = features.float()
    sim = frame_similarity(x) if frames > 1 else x.new_zeros(0, n)
    segments, saved = static_windows(sim, tau, max_window)
    r = min(ratio / ((total - saved) / total), 1)
    kept: list[torch.Tensor] = []
    merged: list[torch.Tensor] = []
    assign = torch.full((total,), -1, dtype=torch.long)
    sequence: list[tuple[str, int]] = []  # ("k", flat index) or ("m", merged index), in the official order

    def add_merged(token: torch.Tensor, members: torch.Tensor) -> None:
        assign[members] = len(merged)
        sequence.append(("m", len(merged)))
        merged.append(token)

    for s, e in segments:
        static = sim[s:e].gt(tau).all(dim=0) if e > s else torch.zeros(n, dtype=torch.bool)
        positions = static.nonzero().squeeze(1)
        if positions.numel():
            mean = x[s:e + 1, positions].mean(dim=0)  # [S, D] temporal merge
            count = round(positions.numel() * r)
            if count > 0:
                tokens, cluster = cluster_merge(mean, cluster_centers(mean, count, min(knn, count)), beta)
                for c in range(count):
                    spots = positions[cluster == c]
                    members = (torch.arange(s, e + 1)[:, None] * n + spots[None]).flatten()
                    add_merged(tokens[c], members)
        dynamic = (~static).nonzero().squeeze(1)
        dominant, contextual = _retain(dynamic.numel(), r, d)
        for f in range(s, e + 1):
            if dominant > 0:
                top = top_k_indices(attention[f, dynamic].float(), dominant)
                for j in dynamic[top].tolist():
                    kept.append(torch.tensor(f * n + j))
                    sequence.append(("k", f * n + j))
            if contextual > 0:
                rest = dynamic[torch.isin(dynamic, dynamic[top], invert=True)] if dominant > 0 else dynamic
                centers = cluster_centers(x[f, rest], contextual, min(knn, contextual))
                tokens, cluster = cluster_merge(x[f, rest], centers, beta)
                for c in range(contextual):
                    add_merged(tokens[c], f * n + rest[cluster == c])
    if not kept and not merged:  # degenerate budget: keep the most attended token of the first frame
        first = int(top_k_indices(attention[0].float(), 1)[0])
        kept, sequence = [torch.tensor(first)], [("k", first)]
    kept_index = torch.stack(kept).long() if kept else torch.zeros(0, dtype=torch.long)
    rank = {int(v): i for i, v in enumerate(kept_index.tolist())}  # kept tokens are appended in ascending order
    order = torch.tensor([rank[v] if kind == "k" else len(kept) + v for kind, v in sequence], dtype=torch.long)
    merged_tokens = torch.stack(merged) if merged else x.new_zeros(0, dim)
    return OuterResult(kept_index, merged_tokens, assign, order, tuple(segments), r)


def holitom_inner(attention: torch.Tensor, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HoliTom's inner-LLM merge of one image's ``n`` tokens: ``attention`` ``[n]`` (head mean, last prompt token),
    ``hidden`` ``[n, D]`` (input of the merging layer), ``k`` kept. Returns the kept tokens (sorted) and ``[k, n]``
    fp32 weights: row ``i`` gives kept token ``i``'s new hidden state as a mix of the ``n`` tokens (identity row
    when nothing merged into it)."""
    n = hidden.shape[0]
    ranked = torch.sort(attention.float(), descending=True, stable=True).indices[: min(k, n)]
    kept = torch.sort(ranked).values
    weights = torch.zeros(kept.numel(), n, dtype=torch.float32)
    weights[torch.arange(kept.numel()), kept] = 1.0
    if kept.numel() >= n:
        return kept, weights
    rest = torch.ones(n, dtype=torch.bool)
    rest[kept] = False
    others = rest.nonzero().squeeze(1)
    h = nnf.normalize(hidden.float(), dim=-1)
    target = ranked[(h[others] @ h[ranked].T).argmax(dim=-1)]  # ties: the most attended kept token
    row_of = {int(t): i for i, t in enumerate(kept.tolist())}
    for m, t in zip(others.tolist(), target.tolist(), strict=True):  # in prompt order, as the official loop
        row = row_of[t]
        weights[row] *= 0.5
        weights[row, m] += 0.5
    return kept, weights
