"""CoreMatching's rules: core neurons of a prompt, each token's match with them, the core tokens.

CoreMatching: A Co-adaptive Sparse Inference Framework with Token and Neuron Pruning for Comprehensive Acceleration
of Vision-Language Models (Wang et al., ICML 2025; official code github.com/wangqinsi1/2025-ICML-CoreMatching).

``act`` ``[M, I]`` is the FFN's intermediate activation of ``M`` tokens in one layer (the input of ``down_proj``:
``act_fn(gate_proj(x)) * up_proj(x)`` for SwiGLU). A neuron is ACTIVATED by a token when its activation is > 0.

* Token-wise core neurons: the ``ceil(rho * P)`` largest activations of a token with ``P`` positive ones.
* Core neurons of the prompt (sentence-wise): among the neurons that are token-wise core for at least one token,
  the ``ceil(beta * U)`` (``U`` of them) that are token-wise core for the most tokens.
* Match of a token: how many core neurons it activates, ``|Gamma(x) n C|``.
* Core tokens: the tokens whose match is above the elbow of the sorted matches (the point of the descending curve
  farthest from the chord between its first and last point, "maximum geometric distance"); the official code keeps
  the scores strictly above the elbow's value.

Worked example (the unit tests check it). Four tokens, six neurons::

    act = [[3, 2, 1, 0, -1, 0],     positive 3 -> ceil(0.5*3) = 2 core: {0, 1}
           [0, 5, 4, 1,  0, 0],     positive 3 -> {1, 2}
           [1, 0, 0, 0,  2, 0],     positive 2 -> {4}
           [0, 1, 3, 0,  0, 0]]     positive 2 -> {2}

with ``rho=0.5``: frequencies ``f = [1, 2, 2, 0, 1, 0]``; union ``{0, 1, 2, 4}`` (U=4); ``beta=0.5`` keeps 2 neurons:
the two most frequent, ``{1, 2}``. Matches (activated core neurons): ``[2, 2, 0, 2]``.

Elbow: matches ``[1, 9, 0, 8, 2]`` sort to ``[9, 8, 2, 1, 0]``; the chord runs from (0, 9) to (4, 0); the distance
of a point (x, y) to it is proportional to ``|9x + 4y - 36|``: ``0, 5, 10, 5, 0`` -> the elbow is x=2 (value 2), and
the core tokens are the scores > 2: indices ``[1, 3]``. With ``k=1`` only the largest stays: ``[1]``.
"""

from __future__ import annotations

import math

import torch

from tokenprune.functional._ranking import check_k, top_k_indices


def _share(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` robust to float noise (0.2 * 15 is 3.0000000000000004)."""
    return min(n, max(0, math.ceil(fraction * n - 1e-9)))


def token_core_neurons(act: torch.Tensor, rho: float = 0.2) -> torch.Tensor:
    """``[M, I]`` bool: each token's core neurons, its ``ceil(rho * P)`` largest of ``P`` positive activations
    (ties to the lowest neuron index)."""
    a = act.float()
    positive = a > 0
    counts = [_share(rho, int(p)) for p in positive.sum(dim=1).tolist()]
    order = torch.sort(a.masked_fill(~positive, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(a.shape[1], device=a.device).expand_as(order))
    return rank < torch.tensor(counts, device=a.device, dtype=torch.long)[:, None]


def core_neurons(act: torch.Tensor, rho: float = 0.2, beta: float = 0.4) -> torch.Tensor:
    """Sorted ``torch.long`` indices of the prompt's core neurons from ``act`` ``[M, I]`` (the prompt's tokens):
    the ``ceil(beta * U)`` neurons that are token-wise core (:func:`token_core_neurons`) for the most tokens, among
    the ``U`` that are for at least one; ties to the lowest index. Empty when no activation is positive."""
    if act.ndim != 2:
        raise ValueError(f"core_neurons: act must be [tokens, neurons]; got shape {tuple(act.shape)}")
    freq = token_core_neurons(act, rho).sum(dim=0)  # [I]
    union = int((freq > 0).sum())
    n_core = _share(beta, union)
    if n_core == 0:
        return torch.zeros(0, dtype=torch.long, device=act.device)
    return top_k_indices(freq.float(), n_core)


def core_match(act: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """``[M]`` ``torch.long``: how many of the ``core`` neurons each token of ``act`` ``[M, I]`` activates (> 0)."""
    return (act[:, core].float() > 0).sum(dim=1)


def elbow_value(scores: torch.Tensor) -> float:
    """The value at the elbow of the descending curve of ``scores`` ``[N]`` (maximum distance to the chord from the
    first to the last point, in index x score units as the official code; first maximum). ``N <= 2`` or a flat
    curve: the smallest score minus one (everything is above it)."""
    s = torch.sort(scores.double().flatten(), descending=True).values
    n = s.shape[0]
    if n <= 2 or bool(s[0] == s[-1]):
        return float(s[-1]) - 1.0 if n else 0.0
    x = torch.arange(n, dtype=torch.float64)
    dx, dy = float(n - 1), float(s[-1] - s[0])
    distance = (dy * x - dx * (s - s[0])).abs() / math.hypot(dx, dy)
    return float(s[int(torch.argmax(distance))])


def corematching(match: torch.Tensor, k: int, adaptive: bool = True) -> torch.Tensor:
    """Core tokens of one image from their matches ``[N]``: the tokens above the elbow (:func:`elbow_value`; if
    none is, the elbow's ties: the released code would keep none), at most ``k`` of them (the largest matches, ties
    to the lowest index); ``adaptive=False``: exactly the top ``k``. Sorted ascending ``torch.long``; ``k >= N``
    returns ``arange(N)``."""
    n = match.shape[0]
    check_k(k, n)
    if k >= n:
        return torch.arange(n, device=match.device)
    if not adaptive:
        return top_k_indices(match, k)
    elbow = elbow_value(match)
    above = (match.double() > elbow).nonzero().squeeze(1)
    if above.numel() == 0:  # the elbow is the maximum (a straight curve): its ties, never an empty image
        above = (match.double() == elbow).nonzero().squeeze(1)
    if above.numel() > k:
        return above[top_k_indices(match[above], k)]
    return above
