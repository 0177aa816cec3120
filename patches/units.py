"""Selection units: run a method on one image, crop or frame and map its answer back to the image's tokens.

An image's visual tokens (as laid out in the prompt) are split into one or more *units* -- the whole image, each
LLaVA-NeXT crop under a per-crop budget, each video frame under a per-frame budget. The method selects within each
unit; this module checks the answer against the selector contract and turns it into the image-level slots that
stay in the prompt and the features that fill them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenprune.methods import FEATURES, PruningMethod, Selection, SelectionContext


@dataclass(frozen=True)
class Unit:
    """``index``: ``[n_u]`` long, the unit's tokens within the image's tokens; ``grid``: its ``(h, w)`` raster grid;
    ``video``: ``(frames, h, w)`` when the unit is a whole video (frame-major rasters)."""

    index: torch.Tensor
    grid: tuple[int, int] | None = None
    video: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class ImageSelection:
    """What survives of one image: placeholder ``slots`` (image-level indices, ascending) filled with ``features``.

    ``kept`` are the original tokens kept; ``n_merged`` merged tokens were added (``assign``: per image token, the
    merged token it was folded into, or -1; None when the method does not give one, as Recoverable, whose clusters
    overlap); where they sit depends on the placement (:func:`select_image`).
    """

    slots: torch.Tensor
    features: torch.Tensor
    kept: torch.Tensor
    n_merged: int = 0
    assign: torch.Tensor | None = None


def checked_indices(kept: torch.Tensor, n: int, name: str, allow_empty: bool = False) -> torch.Tensor:
    """Enforce the selector contract: long, 1-D, sorted ascending, unique, in range, non-empty (unless merged tokens
    carry the unit)."""
    kept = torch.as_tensor(kept)
    if allow_empty and kept.numel() == 0:
        return kept.long()
    ok = (
        kept.dtype == torch.long and kept.ndim == 1 and 0 < kept.numel() <= n
        and int(kept.min()) >= 0 and int(kept.max()) < n and bool((kept[1:] > kept[:-1]).all())
    )
    if not ok:
        raise RuntimeError(
            f"method {name!r} returned invalid kept indices (need a sorted, unique 1-D long tensor within "
            f"range({n})): {kept.tolist()[:20]}"
        )
    return kept


def select_image(
    method: PruningMethod,
    features: torch.Tensor,
    units: list[Unit],
    budgets: list[int],
    signals: list[dict[str, torch.Tensor]],
    *,
    image_index: int,
    row: int,
    index_in_row: int,
    cls_token: bool = True,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    placement: str = "slots",
) -> ImageSelection:
    """Select in every unit of one image (``features``: ``[n, D]``); ``signals[u]`` are unit ``u``'s signals.

    ``project`` maps merged tokens that a method built before the projector (``Selection.space``) into the LLM's
    input space; families without one (Qwen) reject such methods. ``placement``: ``"slots"`` puts each merged token
    in the placeholder slot of the first token it absorbed (families that keep original positions: Qwen);
    ``"span"`` lays each unit out as the official LLaVA codes do -- leading merged tokens ([CLS]), the kept tokens,
    the other merged tokens -- in the image's first placeholders (families that re-index positions).
    """
    n = features.shape[0]
    kept_parts, spans, merged_slots, merged_features = [], [], [], []
    assign = torch.full((n,), -1, dtype=torch.long)
    n_merged, unknown_assign = 0, False
    contexts = [
        SelectionContext(
            k=k, n=unit.index.numel(), signals=signals[u], grid=unit.grid, image_index=image_index, row=row,
            index_in_row=index_in_row, unit_index=u, cls_token=cls_token, video=unit.video,
        )
        for u, (unit, k) in enumerate(zip(units, budgets, strict=True))
    ]
    outs = method.select_many(contexts)  # units of equal size in one batched call where the method has one
    for unit, ctx, out in zip(units, contexts, outs, strict=True):
        index = unit.index.cpu()
        selection = out if isinstance(out, Selection) else Selection(out)
        has_merged = selection.n_merged > 0
        kept = checked_indices(selection.kept, ctx.n, method.name, allow_empty=has_merged).cpu()
        kept_parts.append(index[kept])
        kept_features = features[index[kept].to(features.device)]
        if not has_merged:
            spans.append(kept_features)
            continue
        merged = selection.merged
        if selection.space != FEATURES:
            if project is None:
                raise ValueError(
                    f"method {method.name!r} merges tokens in the {selection.space!r} space, which this model "
                    f"family cannot project into the LLM's input space; use it on LLaVA-1.5 / LLaVA-NeXT"
                )
            merged = project(merged)
        merged = merged.to(features.device, features.dtype)
        if selection.assign is None:  # optional: Recoverable's clusters overlap, no token has ONE merged token
            if placement == "slots":
                raise ValueError(
                    f"method {method.name!r} adds merged tokens without saying which tokens each one absorbed "
                    f"(Selection.assign); this model family keeps original positions and cannot place them"
                )
            unknown_assign = True
        else:
            unit_assign = torch.as_tensor(selection.assign).cpu()
            members = unit_assign >= 0
            assign[index[members]] = unit_assign[members] + n_merged
        n_merged += merged.shape[0]
        if selection.order is not None:  # the method's own layout of [kept, merged] (span placement)
            spans.append(torch.cat([kept_features, merged])[torch.as_tensor(selection.order).to(merged.device)])
        else:
            spans.append(torch.cat([merged[: selection.lead], kept_features, merged[selection.lead:]]))
        if placement == "slots":  # each merged token takes the slot (and so the position) of its first member
            for j in range(merged.shape[0]):
                group = (unit_assign == j).nonzero().squeeze(1)
                if group.numel() == 0:
                    raise ValueError(
                        f"method {method.name!r} adds a merged token with no source token (e.g. VisionZip's [CLS]); "
                        f"this model family keeps original positions and has no place for it"
                    )
                merged_slots.append(int(index[group].min()))
            merged_features.append(merged)
    kept_all = torch.cat(kept_parts).sort().values if kept_parts else torch.zeros(0, dtype=torch.long)
    if not n_merged:
        return ImageSelection(kept_all, features[kept_all.to(features.device)], kept_all)
    if placement == "span":  # LLaVA family: the span holds [lead merged, kept, merged] per unit, re-indexed
        span = torch.cat(spans)
        return ImageSelection(torch.arange(span.shape[0]), span, kept_all, n_merged, None if unknown_assign else assign)
    slots = torch.cat([kept_all, torch.tensor(merged_slots, dtype=torch.long)])
    order = slots.argsort()
    stacked = torch.cat([features[kept_all.to(features.device)], *merged_features])
    return ImageSelection(slots[order], stacked[order.to(features.device)], kept_all, n_merged, assign)
