"""The shared budget controller: turns the user's ``keep`` into a concrete token count.

``keep`` is either
  * a ratio, a ``float`` in (0, 1]: ``k = round_half_up(keep * n)``, computed on the decimal value written
    (``0.1 * 576 = 57.6 -> 58``, ``0.05 * 576 = 28.8 -> 29``, ``0.098 * 576 = 56.45 -> 56``: the counts the
    FasterVLM and DivPrune papers report), or
  * a count, an ``int`` >= 1: ``k = min(keep, n)``.

Either way at least one token is kept and ``k >= n`` keeps every token. The budget is per image (all of an
image's visual tokens form one pool). Note ``keep=1`` (int) keeps ONE token while ``keep=1.0`` keeps all.
This module is the only place where rounding happens.
"""

from __future__ import annotations

import math
from fractions import Fraction

Keep = float | int


def validate_keep(keep: object) -> Keep:
    """Return ``keep`` unchanged if it is a valid budget, else raise a ``TypeError``/``ValueError`` saying why."""
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
    validate_keep(keep)
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
