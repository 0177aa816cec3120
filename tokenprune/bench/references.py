"""Naive reference implementations of selectors, written the way the official code is, for the selection-cost
micro-benchmark: same output as :mod:`tokenprune.functional` (asserted in the run), measured in the same run.

To add one: write ``name(signals, k) -> kept indices`` over the same synthetic signals the method gets and
register it in ``REFERENCES`` under the method's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tokenprune.functional import cosine_distance
from tokenprune.methods import FEATURES


def divprune_naive(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune as the official LLaVA code loops (Alvar et al., CVPR 2025): at step ``i`` gather the ``i``
    selected rows of the distance matrix and take their column minimum again -- O(k^2 N) after the O(N^2 D)
    matrix -- with the first pick from ``topk(2, largest=False)`` per column. Selected tokens are excluded from
    later picks, as in :func:`tokenprune.functional.divprune`."""
    n = features.shape[0]
    if k >= n:
        return torch.arange(n)
    dist = cosine_distance(features)
    selected = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1] if n > 1 else dist[0]
        else:
            scores = torch.index_select(dist, 0, selected[:i]).min(dim=0).values
            scores[selected[:i]] = -torch.inf
        selected[i] = torch.argmax(scores)
    return torch.sort(selected).values


REFERENCES: dict[str, Callable[[Mapping[str, torch.Tensor], int], torch.Tensor]] = {
    "divprune": lambda signals, k: divprune_naive(signals[FEATURES], k),
}
