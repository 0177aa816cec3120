"""Selection in several images or crops at once: contexts of equal size and budget go through one batched call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tokenprune.methods.base import SelectionContext


def select_grouped(
    contexts: Sequence[SelectionContext],
    select_one: Callable[[SelectionContext], Any],
    select_batch: Callable[[list[SelectionContext]], torch.Tensor],
) -> list[Any]:
    """One result per context, in order: contexts sharing ``(n, k)`` (two or more) are selected by one
    ``select_batch`` call (``[B, k]`` kept indices, row ``b`` for ``group[b]``); the others by ``select_one``. The
    batched selectors select each row exactly as alone (``tests/test_selector_scaling.py``)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, ctx in enumerate(contexts):
        groups.setdefault((ctx.n, ctx.k), []).append(i)
    out: list[Any] = [None] * len(contexts)
    for members in groups.values():
        if len(members) == 1 or contexts[members[0]].k >= contexts[members[0]].n:
            for i in members:
                out[i] = select_one(contexts[i])
            continue
        kept = select_batch([contexts[i] for i in members])
        for i, row in zip(members, kept, strict=True):
            out[i] = row
    return out
