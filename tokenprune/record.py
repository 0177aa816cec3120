"""What a pruned prefill did: per image, how many tokens there were and which were kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageRecord:
    """One image (or video) of a pruned prefill. ``kept`` indexes the image's own tokens in the order the model
    lays them out in the prompt (raster order for LLaVA-1.5 and Qwen; base tile then high-resolution grid for
    LLaVA-NeXT).

    Geometry, enough to draw the kept tokens over the picture (:mod:`tokenprune.viz`):

    * ``boxes`` ``[n, 4]`` float: ``(x0, y0, x1, y1)`` of each token as fractions of the picture named by ``view``;
      NaN rows for tokens with no place in the picture (LLaVA-NeXT's ``image_newline`` tokens).
    * ``view``: ``"center_crop"`` when the boxes are fractions of the square centre crop the CLIP processor takes
      (LLaVA-1.5), ``"image"`` when they are fractions of the original image (LLaVA-NeXT, Qwen), ``"tiles"`` when
      they are fractions of the tile given by ``segments`` (InternVL: the grid tiles row-major, then the thumbnail of
      the whole image; the drawing places the grid from the picture's aspect ratio).
    * ``segments`` ``[n]`` long: which view of the picture a token belongs to. LLaVA-NeXT: 0 = the base tile (the
      whole image at low resolution), 1 = the high-resolution crops (unpadded); Qwen video: the temporal index of the
      token's merged frame pair. ``None`` when all tokens belong to one view.
    * ``merged`` ``[n]`` long: for tokens that were not kept but were folded into a merged token (VisionZip's
      contextual tokens, recycled tokens), the index of that merged token (0..n_merged-1); -1 otherwise.
    """

    row: int                          # batch row of the prompt the image belongs to
    index_in_row: int                 # 0 for the first image of that prompt, 1 for the second, ...
    n: int                            # visual tokens before pruning
    kept: torch.Tensor                # [n_kept] long, sorted ascending
    grid: tuple[int, int] | None = None  # (h, w) patch grid when the tokens form one raster grid
    boxes: torch.Tensor | None = None
    view: str = "center_crop"
    segments: torch.Tensor | None = None
    merged: torch.Tensor | None = None
    n_merged: int = 0                 # merged tokens placed after the kept ones in the image's span
    kind: str = "image"               # "image" or "video"

    @property
    def n_kept(self) -> int:
        """Tokens of this image in the pruned prompt: the kept ones plus any merged tokens."""
        return int(self.kept.numel()) + self.n_merged

    def kept_mask(self) -> torch.Tensor:
        """``[n]`` bool, True where a token was kept (reshape to ``grid`` to draw it)."""
        mask = torch.zeros(self.n, dtype=torch.bool)
        mask[self.kept.cpu()] = True
        return mask


@dataclass(frozen=True)
class PruneRecord:
    """The last pruned prefill: ``handle.last``.

    ``tflops_unpruned``/``tflops_pruned``: estimated LLM prefill TFLOPs (:mod:`tokenprune.budget.flops`, "exact"
    GQA-aware formula, multiply-accumulates, text tokens included, padding excluded, summed over the batch rows)
    of the prompt without and with pruning; filled in by the adapter base class after every pruned prefill.
    """

    method: str
    images: tuple[ImageRecord, ...]
    seq_len_before: int               # padded prompt length given to the model
    seq_len_after: int                # padded prompt length after pruning (rows re-padded to the longest)
    # Per decoder layer l of the LLM: prompt tokens (padding excluded, summed over the batch rows) entering layer l,
    # and how many of them are visual tokens. Constant for vision-stage methods; after a decoder stage's first
    # pruned layer they drop. What a FLOPs / KV-cache estimate needs (docs/benchmarks.md).
    tokens_per_layer: tuple[int, ...] | None = None
    visual_per_layer: tuple[int, ...] | None = None
    tflops_unpruned: float | None = None
    tflops_pruned: float | None = None

    @property
    def flops_ratio(self) -> float | None:
        """Estimated pruned / unpruned LLM prefill FLOPs."""
        if self.tflops_unpruned is None or self.tflops_pruned is None or not self.tflops_unpruned:
            return None
        return self.tflops_pruned / self.tflops_unpruned

    @property
    def n_visual(self) -> int:
        return sum(im.n for im in self.images)

    @property
    def n_kept(self) -> int:
        return sum(im.n_kept for im in self.images)

    @property
    def average_visual(self) -> float | None:
        """Layer-averaged visual tokens (the "192 tokens" of PDrop/SparseVLM-style budgets), or None."""
        if not self.visual_per_layer:
            return None
        return sum(self.visual_per_layer) / len(self.visual_per_layer)

    def summary(self) -> str:
        text = (
            f"{self.method}: kept {self.n_kept}/{self.n_visual} visual tokens over {len(self.images)} image(s); "
            f"prompt length {self.seq_len_before} -> {self.seq_len_after}"
        )
        if self.visual_per_layer and len(set(self.visual_per_layer)) > 1:
            text += f"; visual tokens per layer {list(self.visual_per_layer)}"
        return text


def grid_boxes(grid: tuple[int, int] | None, n: int | None = None) -> torch.Tensor | None:
    """``[h*w, 4]`` boxes ``(x0, y0, x1, y1)`` of a raster patch grid, as fractions of the picture it covers."""
    if grid is None or (n is not None and grid[0] * grid[1] != n):
        return None
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return torch.stack([xs / w, ys / h, (xs + 1) / w, (ys + 1) / h], dim=1)
