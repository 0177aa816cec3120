"""One image's selection inside vLLM: budget, context, the method and the placement of its answer.

The method runs through the same unit code as ``enable_pruning`` (:func:`tokenprune.patches.units.select_image`),
so kept indices, merged tokens and their placement are those of the Hugging Face path: LLaVA lays the image out as
the official codes do (leading merged rows, the kept tokens, the other merged rows; re-indexed positions), Qwen puts
each merged token in the slot of the first token it absorbed (original positions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from tokenprune.integrations.vllm.options import VllmPruning
from tokenprune.methods import Selection, SelectionContext
from tokenprune.patches.units import ImageSelection, Unit
from tokenprune.patches.units import select_image as select_units


class _PaddingInDroppedSlots:
    """A method whose merged rows come without ``assign`` (HoloV's official zero rows) seen through a view that
    gives each such row the slot of one of the LAST dropped tokens, so that a family keeping original positions
    (Qwen) can place it. ``enable_pruning`` refuses such images on Qwen; vLLM must answer every admitted request."""

    def __init__(self, method) -> None:
        self.method, self.name = method, method.name

    def select_many(self, contexts: Sequence[SelectionContext]) -> list:
        out = []
        for ctx, answer in zip(contexts, self.method.select_many(contexts), strict=True):
            if isinstance(answer, Selection) and answer.n_merged and answer.assign is None:
                kept = torch.as_tensor(answer.kept).cpu()
                dropped = torch.ones(ctx.n, dtype=torch.bool)
                dropped[kept] = False
                slots = dropped.nonzero()[:, 0][-answer.n_merged:]
                assign = torch.full((ctx.n,), -1, dtype=torch.long)
                assign[slots] = torch.arange(answer.n_merged)
                answer = Selection(kept, answer.merged, assign, lead=answer.lead, space=answer.space)
            out.append(answer)
        return out


def select_image(
    pruning: VllmPruning,
    features: torch.Tensor,
    signals: Mapping[str, torch.Tensor],
    grid: tuple[int, int] | None,
    cls_token: bool,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ImageSelection:
    """The selection of one image with ``features`` ``[n, D]`` and the method's ``signals``: ``slots`` (ascending
    image-level indices) filled with ``features`` rows; exactly ``pruning.kept(n)`` rows, the count its
    placeholders were given. ``cls_token`` picks the layout: with [CLS] (LLaVA) the official span layout, merged
    rows projected by ``project``; without (Qwen) merged rows in slots.

    vLLM batches images of different prompts together, so each image is selected as the first image of its
    prompt (``index_in_row=0``): seeded methods (random, k-center's pivot without [CLS]) match
    ``enable_pruning`` on one-image prompts.
    """
    n = features.shape[0]
    k = pruning.kept(n)
    if k >= n:
        every = torch.arange(n)
        return ImageSelection(every, features, every)
    method = pruning.method if cls_token else _PaddingInDroppedSlots(pruning.method)
    chosen = select_units(
        method, features, [Unit(torch.arange(n), grid)], [k], [dict(signals)], image_index=0, row=0,
        index_in_row=0, cls_token=cls_token, project=project, placement="span" if cls_token else "slots",
    )
    if chosen.features.shape[0] != k:
        raise RuntimeError(
            f"{pruning.method.name} gave {chosen.features.shape[0]} rows ({chosen.kept.numel()} kept + "
            f"{chosen.n_merged} merged) for k={k}, n={n}; vLLM reserved {k} placeholders for this image"
        )
    return chosen
