"""One image's selection inside vLLM: budget, context, the method's ``select`` and a check of its answer."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tokenprune.integrations.vllm.options import VllmPruning
from tokenprune.methods import FEATURES, Selection, SelectionContext


def select_image(
    pruning: VllmPruning,
    n: int,
    signals: Mapping[str, torch.Tensor],
    grid: tuple[int, int] | None,
    cls_token: bool,
    allow_extra_rows: bool = False,
) -> Selection:
    """The selection of one image with ``n`` visual tokens: ``kept`` (``torch.long``, ascending, on the CPU) plus,
    for methods that add rows (HoloV's zero rows with ``quirks``), ``merged`` rows in the projected space, placed as
    ``merged[:lead]``, the kept tokens, ``merged[lead:]`` (:func:`image_rows`). Either way the image gets exactly
    ``pruning.kept(n)`` rows, the count its placeholders were given.

    vLLM batches images of different prompts together, so each image is selected as the first image of its
    prompt (``index_in_row=0``): seeded methods (random, k-center's pivot without [CLS]) match
    ``enable_pruning`` on one-image prompts.
    """
    k = pruning.kept(n)
    if k >= n:
        return Selection(torch.arange(n))
    ctx = SelectionContext(k=k, n=n, signals=dict(signals), grid=grid, cls_token=cls_token)
    out = pruning.method.select(ctx)
    selection = out if isinstance(out, Selection) else Selection(out)
    if selection.n_merged and (not allow_extra_rows or selection.space != FEATURES):
        raise ValueError(
            f"method {pruning.method.name!r} adds {selection.n_merged} merged row(s) in the {selection.space!r} "
            f"space, which the vLLM plugin cannot place on this model"
        )
    kept = selection.kept.detach().to("cpu", torch.long)
    if kept.ndim != 1 or kept.numel() + selection.n_merged != k or not bool((kept[1:] > kept[:-1]).all()):
        raise RuntimeError(
            f"{pruning.method.name} returned {kept.tolist()} (+{selection.n_merged} merged rows) for k={k}, n={n}; "
            f"expected ascending unique indices, {k} rows in all (vLLM reserved {k} placeholders for this image)"
        )
    return Selection(kept, selection.merged, lead=selection.lead, space=selection.space)


def image_rows(features: torch.Tensor, selection: Selection) -> torch.Tensor:
    """``[k, D]``: the image's rows in placeholder order (merged lead rows, kept tokens, other merged rows)."""
    rows = features[selection.kept.to(features.device)]
    if not selection.n_merged:
        return rows
    merged = selection.merged.to(features.device, features.dtype)
    return torch.cat([merged[: selection.lead], rows, merged[selection.lead:]])
