"""Content-blind baselines: random and uniform spatial sampling (the controls every pruning paper reports)."""

from __future__ import annotations

import math

import torch

from tokenprune.functional._ranking import check_k


def random(n: int, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` of ``n`` tokens drawn uniformly without replacement (reproducible with a seeded ``generator``)."""
    check_k(k, n)
    if k >= n:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=generator)[:k]).values


def _spread(m: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced positions in ``range(m)``, centred in their bins (strictly increasing for k <= m)."""
    return torch.tensor([math.floor((t + 0.5) * m / k) for t in range(k)], dtype=torch.long)


def uniform(grid: tuple[int, int] | None, k: int, *, n: int | None = None) -> torch.Tensor:
    """``k`` tokens spread evenly over an ``h x w`` raster grid of patches.

    A sub-grid of ``r x c`` cell centres is chosen with ``r/c`` close to ``h/w`` and ``r*c >= k``; if it has more
    than ``k`` cells, ``k`` of them are taken evenly in raster order. With ``grid=None`` the ``n`` tokens are
    treated as a line. Example: a 24x24 grid and ``k=64`` gives every third patch of every third row, starting
    at (1, 1).
    """
    if grid is None:
        if n is None:
            raise ValueError("uniform needs either the patch grid (h, w) or the token count n")
        check_k(k, n)
        return torch.arange(n) if k >= n else _spread(n, k)
    h, w = grid
    total = h * w
    check_k(k, total)
    if k >= total:
        return torch.arange(total)
    rows = max(1, min(h, round(math.sqrt(k * h / w))))
    cols = min(w, math.ceil(k / rows))
    rows = min(h, math.ceil(k / cols))
    cells = (_spread(h, rows)[:, None] * w + _spread(w, cols)[None, :]).reshape(-1)
    return cells if cells.numel() == k else cells[_spread(cells.numel(), k)]
