"""Removing tokens from a padded batch: compact each row and re-pad the rows to a common length."""

from __future__ import annotations

import torch


def padding_side(attention_mask: torch.Tensor | None) -> str:
    """``"right"`` if the mask shows right padding only, else ``"left"`` (what generation needs)."""
    if attention_mask is None or attention_mask.ndim != 2:
        return "left"
    right = bool((attention_mask[:, -1] == 0).any())
    left = bool((attention_mask[:, 0] == 0).any())
    return "right" if right and not left else "left"


def compact(
    keep: torch.Tensor, tensors: dict[str, tuple[torch.Tensor, int]], side: str = "left"
) -> dict[str, torch.Tensor]:
    """Keep the tokens where ``keep`` (``[B, L]`` bool) is True in every per-token tensor.

    ``tensors`` maps a name to ``(tensor, pad_value)``; a tensor is ``[..., B, L]`` (e.g. ``[3, B, L]`` position
    ids). Rows that end up shorter than the longest are padded on ``side`` with ``pad_value``. The old padding on
    ``side`` (zeros of ``tensors["attention_mask"]`` before a row's first token, or after its last) is dropped too:
    a row without images, or with fewer, does not keep the whole batch at its unpruned length.
    """
    if "attention_mask" in tensors:
        keep = keep & ~edge_padding(tensors["attention_mask"][0], side)
    counts = keep.sum(dim=1)
    length = int(counts.max()) if keep.numel() else 0
    out = {}
    for name, (tensor, pad) in tensors.items():
        new = tensor.new_full((*tensor.shape[:-1], length), pad)
        for b in range(keep.shape[0]):
            idx = keep[b].nonzero().squeeze(1)
            n = idx.numel()
            dst = slice(length - n, length) if side == "left" else slice(0, n)
            new[..., b, dst] = tensor[..., b, idx]
        out[name] = new
    return out


def edge_padding(attention_mask: torch.Tensor, side: str) -> torch.Tensor:
    """``[B, L]`` bool: the padding on ``side`` of each row (mask zeros before its first attended token for
    ``"left"``, after its last for ``"right"``); zeros inside a row are not padding and stay."""
    attended = (attention_mask != 0).long()
    if side == "left":
        return attended.cumsum(dim=1) == 0
    return attended.flip(1).cumsum(dim=1).flip(1) == 0


def reindex_positions(position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Contiguous re-indexing: each kept token's position minus the tokens removed before it in its row."""
    removed_before = (~keep).long().cumsum(dim=-1)
    return position_ids - removed_before
