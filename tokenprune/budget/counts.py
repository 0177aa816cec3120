"""The shared budget controller: turns the user's ``keep`` into a concrete token count.

``keep`` is either
  * a ratio, a ``float`` in (0, 1]: ``k = round_half_up(keep * n)``, computed on the decimal value written
    (``0.1 * 576 = 57.6 -> 58``, ``0.05 * 576 = 28.8 -> 29``, ``0.098 * 576 = 56.45 -> 56``: the counts the
    FasterVLM and DivPrune papers report), or
  * a count, an ``int`` >= 1: ``k = min(keep, n)``.

Either way at least one token is kept and ``k >= n`` keeps every token. The budget is per image (all of an
image's visual tokens form one pool). Note ``keep=1`` (int) keeps ONE token while ``keep=1.0`` keeps all.
A FLOPs target ``flops`` in (0, 1] instead of ``keep`` solves for the counts (:func:`flops_kept_counts`).
This module is the only place where rounding happens.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from fractions import Fraction

Keep = float | int


def plain_number(value: object) -> object:
    """``value`` as a plain ``int``/``float`` when it is a NumPy-style integer or real (``np.int64(64)``,
    ``np.float32(0.1)`` -> the decimal it prints as), so budgets from array sweeps work and configs stay
    JSON-serialisable; anything else (bools, fractions, tensors, strings) is returned unchanged for the caller to
    refuse."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Rational):
        try:
            return float(str(value))
        except ValueError:
            return float(value)
    return value


def validate_keep(keep: object) -> Keep:
    """Return ``keep`` as a plain ``int``/``float`` if it is a valid budget, else raise a ``TypeError``/``ValueError``
    saying why."""
    keep = plain_number(keep)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(
            f"keep must be a float ratio in (0, 1] or an int token count >= 1; got {keep!r} "
            f"({type(keep).__name__}). Example: keep=0.11 (11% of each image's tokens) or keep=64."
        )
    if isinstance(keep, float):
        if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
            hint = (
                f" To keep {int(keep)} tokens per image pass the int keep={int(keep)}."
                if math.isfinite(keep) and keep > 1 and keep == int(keep)
                else ""
            )
            raise ValueError(f"keep as a float is a ratio and must lie in (0, 1]; got {keep!r}.{hint}")
    elif keep < 1:
        raise ValueError(f"keep as an int is a token count and must be >= 1; got {keep}. For a ratio pass a float.")
    return keep


def kept_count(keep: Keep, n: int) -> int:
    """Number of tokens to keep out of ``n`` candidates (see the module docstring for the rule)."""
    keep = validate_keep(keep)
    if n <= 0:
        return 0
    if isinstance(keep, float):
        exact = Fraction(str(keep)) * n  # the decimal the user wrote, not its binary approximation
        k = math.floor(exact + Fraction(1, 2))
    else:
        k = keep
    return max(1, min(k, n))


# What one budget covers. None: the method's paper convention (``PruningMethod.crop_scope`` on LLaVA-NeXT, per frame
# on videos); "image": one budget per image or video; "crop": one per LLaVA-NeXT crop (base tile, each
# high-resolution tile) and per video frame.
SCOPES = ("image", "crop")


def validate_scope(scope: object) -> None:
    if scope is not None and scope not in SCOPES:
        raise ValueError(
            f"scope must be None (the method's paper convention), 'image' (one budget per image or video) or 'crop' "
            f"(one per LLaVA-NeXT crop and per video frame); got {scope!r}"
        )

# --- FLOPs-target budgets ----------------------------------------------------------------------------------------
# ``flops=0.25``: per prompt, keep the most visual tokens such that the LLM prefill FLOPs (tokenprune.budget.flops, the
# "exact" GQA-aware formula, text tokens included, padding excluded) are at most a quarter of the same prompt's
# unpruned prefill FLOPs.


def validate_flops(flops: object) -> float:
    """Return ``flops`` (a plain number) if it is a valid FLOPs target (a fraction in (0, 1]), else raise saying
    why."""
    flops = plain_number(flops)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)):
        raise TypeError(f"flops must be a fraction in (0, 1] of the unpruned prefill FLOPs; got {flops!r}")
    if not math.isfinite(flops) or not 0.0 < flops <= 1.0:
        raise ValueError(f"flops is a fraction of the unpruned prefill FLOPs and must lie in (0, 1]; got {flops!r}")
    return flops


def validate_budget(keep: object, flops: object) -> None:
    """Exactly one of ``keep`` (a ratio or token count) and ``flops`` (a FLOPs fraction) must be given."""
    if (keep is None) == (flops is None):
        raise TypeError(
            "give exactly one budget: keep= (a ratio in (0, 1] such as 0.11, or a token count such as 64) or "
            f"flops= (a fraction of the unpruned LLM prefill FLOPs, such as 0.25); got keep={keep!r}, flops={flops!r}"
        )
    if keep is not None:
        validate_keep(keep)
    else:
        validate_flops(flops)


def largest_within(cost: Callable[[int], int], lo: int, hi: int, limit: Fraction) -> int:
    """The largest ``k`` in ``[lo, hi]`` with ``cost(k) <= limit`` for a non-decreasing ``cost``; ``lo`` if none."""
    if cost(hi) <= limit:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Share ``total`` kept tokens over units of ``sizes`` in proportion (largest remainder, ties to the first
    unit), each unit getting at least one token and at most its size."""
    total = max(len(sizes), min(total, sum(sizes)))
    whole = sum(sizes)
    quotas = [Fraction(total * n, whole) for n in sizes]
    counts = [max(1, min(n, math.floor(q))) for n, q in zip(sizes, quotas, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    while sum(counts) < total:
        for i in order:
            if counts[i] < sizes[i] and sum(counts) < total:
                counts[i] += 1
    while sum(counts) > total:
        for i in reversed(order):
            if counts[i] > 1 and sum(counts) > total:
                counts[i] -= 1
    return counts


def flops_kept_counts(
    flops: float, sizes: list[int], text: int, cost: Callable[[int, int], int]
) -> tuple[list[int], bool]:
    """Counts for the selection units of ONE prompt under a FLOPs target.

    ``sizes`` are the prompt's units (images, crops, frames), ``text`` its other tokens (never pruned),
    ``cost(text, k)`` the prefill FLOPs with ``k`` visual tokens kept in total (non-decreasing in ``k``). The total
    is the largest ``k`` with ``cost(text, k) <= flops * cost(text, sum(sizes))``, shared by :func:`split_count`.
    Returns the counts and whether the target was met (one token per unit can already exceed a small target).
    """
    flops = validate_flops(flops)
    n = sum(sizes)
    if not sizes:
        return [], True
    limit = Fraction(str(flops)) * cost(text, n)
    total = largest_within(lambda k: cost(text, k), len(sizes), n, limit)
    return split_count(total, sizes), cost(text, total) <= limit
