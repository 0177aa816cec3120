"""What a pruned prefill did: per image, how many tokens there were and which were kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageRecord:
    """One image of a pruned prefill. ``kept`` indexes the image's own tokens (raster order for LLaVA-1.5)."""

    row: int                          # batch row of the prompt the image belongs to
    index_in_row: int                 # 0 for the first image of that prompt, 1 for the second, ...
    n: int                            # visual tokens before pruning
    kept: torch.Tensor                # [n_kept] long, sorted ascending
    grid: tuple[int, int] | None = None  # (h, w) patch grid when the tokens form one raster grid

    @property
    def n_kept(self) -> int:
        return int(self.kept.numel())

    def kept_mask(self) -> torch.Tensor:
        """``[n]`` bool, True where a token was kept (reshape to ``grid`` to draw it)."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[self.kept.cpu()] = True
        return mask


@dataclass(frozen=True)
class PruneRecord:
    """The last pruned prefill: ``handle.last``."""

    method: str
    images: tuple[ImageRecord, ...]
    seq_len_before: int               # padded prompt length given to the model
    seq_len_after: int                # padded prompt length after pruning (rows re-padded to the longest)

    @property
    def n_visual(self) -> int:
        return sum(im.n for im in self.images)

    @property
    def n_kept(self) -> int:
        return sum(im.n_kept for im in self.images)

    def summary(self) -> str:
        return (
            f"{self.method}: kept {self.n_kept}/{self.n_visual} visual tokens over {len(self.images)} image(s); "
            f"prompt length {self.seq_len_before} -> {self.seq_len_after}"
        )
