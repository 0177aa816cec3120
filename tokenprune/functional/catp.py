"""CATP's selection rules (Contextually Adaptive Token Pruning in multimodal in-context learning, AAAI 2026).

Paper only (no official code). Stage 1 runs before the LLM, one image at a time; stage 2 inside the LLM, at layer K
over the pool of the in-context images and at layer K+1 over the query image. Similarities: ``s_hat = (cos + 1) / 2``
in stage 1 (facility location needs non-negative similarities), the plain cosine in stage 2.

Worked examples (the paper's rules on small numbers; they are the unit tests):

* Stage 1: tokens ``x = [(1, 0), (.8, .6), (0, 1), (-.6, .8), (.6, -.8)]``, paired-text mean ``(.6, .8)``, keep 3.
  Alignment ``s_hat(x, v) = [.80, .98, .90, .64, .36]``. Greedy gains, round 1 ``[3.96, 4.386, 3.93, 3.048, 2.652]``
  -> token 1; round 2 ``[.96, -, 1.23, 1.048, .752]`` -> 2; round 3 ``[.96, -, -, .548, .752]`` -> 0: ``{0, 1, 2}``.
* Stage 2 (context pool): ``A_K = [.10, .02, .05, .08, .01, .03]``, ``A_{K-1} = [.04, .03, .01, .08, .00, .05]``,
  cosine to the query mean ``[.2, .9, .1, .35, .5, 0]``: ``S = [.18, .54, .10, .21, .31, 0]``, keep 3 -> ``{1, 3, 4}``.
"""

from __future__ import annotations

import torch

from tokenprune.functional._ranking import check_k, top_k_indices
from tokenprune.functional.diversity import unit_rows


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm in fp32 (a zero row stays zero: cosine 0 to everything)."""
    return unit_rows(x, 1e-12)


def _cosine_to(unit_rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[N]`` cosine of unit rows to ``v``, one row-wise reduction (a matrix-vector product may round its last
    rows differently, which would split exact ties between duplicate tokens)."""
    return (unit_rows * _unit(v)).sum(dim=-1)


def _mean_direction(text: torch.Tensor, what: str) -> torch.Tensor:
    if text.ndim == 1:
        text = text[None]
    if text.ndim != 2 or text.shape[0] == 0:
        raise ValueError(f"catp: {what} must be a non-empty [M, D] tensor (or [D]); got shape {tuple(text.shape)}")
    return text.float().mean(dim=0)


def catp_submodular(features: torch.Tensor, text: torch.Tensor, k: int, *, lambda1: float = 0.7) -> torch.Tensor:
    """Stage 1 for one image: the ``k`` of ``features`` ``[N, D]`` (projected visual tokens) that greedily maximise
    ``F(Y) = sum_x max_{y in Y} s_hat(y, x) + lambda1 * sum_{y in Y} s_hat(y, v)`` (facility location over the
    image's tokens plus alignment to ``v``, the mean of the paired text's embeddings ``text`` ``[M, D]``). Each step
    adds the token of largest marginal gain (ties: lowest index; a lazy priority queue picks the same)."""
    n = features.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    check_k(k, n)
    v = _mean_direction(text.to(features.device), "the paired text")
    if k >= n:
        return torch.arange(n, device=features.device)
    x = _unit(features)
    sim = (x @ x.T + 1.0) / 2.0                                   # [N, N] s_hat in [0, 1], fp32
    align = ((_cosine_to(x, v) + 1.0) / 2.0).double()             # [N]
    # marginal facility gain of every token, kept up to date: sum_x max(0, s_hat(i, x) - covered_x); only the
    # columns a pick covers better change (few after the first picks), so a step costs N x (changed columns)
    covered = torch.zeros(n, dtype=torch.float32, device=x.device)  # max_{y in Y} s_hat(y, x); 0 for Y empty
    facility = sim.double().sum(dim=1)
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    picks = []
    for _ in range(k):
        gain = (facility + lambda1 * align).masked_fill(chosen, float("-inf"))
        best = int(torch.argmax(gain))  # the first maximum: ties go to the lowest index
        picks.append(best)
        chosen[best] = True
        better = covered < sim[best]
        if bool(better.any()):
            rows = sim[better].double()  # [changed, N] = the changed columns (s_hat is symmetric; rows are contiguous)
            old, new = covered[better].double()[:, None], sim[best, better].double()[:, None]
            # max(0, s - old) - max(0, s - new) = clamp(s - old, 0, new - old) for new > old
            facility -= torch.minimum((rows - old).clamp_min(0), new - old).sum(dim=0)
            covered = torch.where(better, sim[best], covered)
    return torch.sort(torch.tensor(picks, dtype=torch.long, device=features.device)).values


def catp_context_scores(attn_k: torch.Tensor, attn_prev: torch.Tensor, hidden: torch.Tensor, query_mean: torch.Tensor,
                        *, lambda2: float = 0.6) -> torch.Tensor:
    """Stage 2 score of every in-context image token: ``max(0, A_K - A_{K-1}) + lambda2 * cos(h, q)``.

    ``attn_k`` / ``attn_prev`` ``[..., N]``: attention of the query's last token to the tokens at layers K and K-1
    (averaged over every leading dimension, e.g. heads); ``hidden`` ``[N, D]`` their hidden states at layer K;
    ``query_mean`` ``[D]`` the mean hidden state of the query sample at layer K. Returns ``[N]`` fp32."""
    a_k = attn_k.float().reshape(-1, attn_k.shape[-1]).mean(dim=0) if attn_k.ndim > 1 else attn_k.float()
    a_prev = attn_prev.float().reshape(-1, attn_prev.shape[-1]).mean(dim=0) if attn_prev.ndim > 1 else attn_prev.float()
    if a_k.shape != a_prev.shape or a_k.shape[0] != hidden.shape[0]:
        raise ValueError(f"catp: attention of layers K and K-1 and the hidden states must cover the same tokens; got "
                         f"{tuple(attn_k.shape)}, {tuple(attn_prev.shape)} and {tuple(hidden.shape)}")
    cos = _cosine_to(_unit(hidden), query_mean.to(hidden.device).reshape(-1))
    return (a_k - a_prev.to(a_k.device)).clamp_min(0) + lambda2 * cos.to(a_k.device)


def catp_context(attn_k: torch.Tensor, attn_prev: torch.Tensor, hidden: torch.Tensor, query_mean: torch.Tensor,
                 k: int, *, lambda2: float = 0.6) -> torch.Tensor:
    """Stage 2 at layer K: the ``k`` highest :func:`catp_context_scores` of the pool of ALL in-context image tokens
    (one pool, so each image's share adapts), sorted ascending, ties to the lowest index."""
    n = hidden.shape[0]
    scores = catp_context_scores(attn_k, attn_prev, hidden, query_mean, lambda2=lambda2)
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=hidden.device)
    check_k(k, n)
    return top_k_indices(scores, k).to(hidden.device)


def catp_query(hidden: torch.Tensor, context_mean: torch.Tensor, k: int) -> torch.Tensor:
    """Stage 2 at layer K+1: the ``k`` query-image tokens whose hidden states ``[N, D]`` are most similar (cosine) to
    ``context_mean`` ``[D]``, the mean hidden state of the kept in-context image tokens at that layer."""
    n = hidden.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=hidden.device)
    check_k(k, n)
    scores = _cosine_to(_unit(hidden), context_mean.to(hidden.device).reshape(-1))
    return top_k_indices(scores, k).to(hidden.device)
