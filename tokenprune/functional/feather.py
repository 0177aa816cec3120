"""FEATHER (Endo et al., Feather the Throttle: Revisiting Visual Token Pruning for Vision-Language Model
Acceleration, ICCV 2025): RoPE-free last-token attention plus a uniform grid, in two stages inside the LLM."""

from __future__ import annotations

from fractions import Fraction

import torch

from tokenprune.functional._ranking import top_k_indices


def feather_counts(n: int, rho: float | Fraction) -> tuple[int, int]:
    """``(top-k of stage 1, kept at stage 2)`` for ``n`` visual tokens that stage 1 cut to ``n`` -- i.e. stage 1
    takes ``int(n * rho)`` by score (plus the uniform grid), stage 2 keeps ``int(n_1 * (rho * rho))`` of the ``n_1``
    tokens left after stage 1; at least one. A float ``rho`` truncates the float products as the official code
    (``int(360 * 0.35) = 125``); a ``Fraction`` (a ratio from an int ``keep``) is exact."""
    if isinstance(rho, Fraction):
        return max(1, int(rho * n)), max(1, int(rho * rho * n))
    return max(1, int(n * rho)), max(1, int(n * (rho * rho)))


def raster_coords(h: int, w: int) -> torch.Tensor:
    """``[h * w, 2]`` ``(row, column)`` of a raster-ordered ``h x w`` grid."""
    i = torch.arange(h * w)
    return torch.stack([i // w, i % w], dim=1)


def feather_uniform(coords: torch.Tensor, stride: int, local: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (into the ``[n, 2]`` ``coords``) of the tokens on the uniform grid ``grid[::stride, ::stride]``: row and
    column both multiples of ``stride``. Tokens with unknown coordinates (-1: LLaVA-NeXT's packed layout) fall back
    to every ``stride**2``-th token by their index ``local`` within the image (the same density)."""
    on = (coords[:, 0] % stride == 0) & (coords[:, 1] % stride == 0) & (coords[:, 0] >= 0)
    unknown = coords[:, 0] < 0
    if bool(unknown.any()):
        local = torch.arange(coords.shape[0], device=coords.device) if local is None else local
        on |= unknown & (local % (stride * stride) == 0)
    return on.nonzero().squeeze(1)


def feather(scores: torch.Tensor, k: int, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``k`` of ``scores`` ``[n]`` (ties to the lowest index) united with the ``uniform`` indices, sorted.

    ``scores`` are FEATHER's: the last prompt token's attention to the image tokens with NO rotary embedding on q
    or k and the softmax over the image keys only, averaged over heads (official code markendo/FEATHER)."""
    kept = top_k_indices(scores, k)
    if uniform is not None and uniform.numel():
        kept = torch.unique(torch.cat([kept, uniform.to(kept.device)]))
    return kept
