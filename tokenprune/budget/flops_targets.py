"""FLOPs-target budgets and prefill FLOPs estimates for the adapters (``enable_pruning(..., flops=0.25)``).

Convention: the LLM prefill FLOPs of one prompt row, :func:`tokenprune.budget.flops.prefill_flops` with the "exact"
GQA-aware formula on the text-model shape of ``model.config``; text tokens count (they are never pruned, so they
set a floor under every budget), padding does not, the vision tower does not (pruning does not change it).

Vision-stage methods: every LLM layer sees ``text + kept`` tokens. A decoder-stage method plugs in by defining
``layer_tokens(text, visual, kept, num_layers) -> list[int]``, the tokens each layer processes (FastV K=2:
``[text + visual] * 2 + [text + kept] * (num_layers - 2)``); budgets and estimates then follow its schedule.
"""

from __future__ import annotations

import dataclasses
import warnings
from fractions import Fraction
from typing import Any

import torch

from tokenprune.budget.counts import flops_kept_counts
from tokenprune.budget.flops import ModelShape, prefill_flops
from tokenprune.record import PruneRecord

FORMULA = "exact"


def prefill_cost(shape: ModelShape, method: Any, text: int, visual: int, kept: int) -> int:
    """Estimated LLM prefill FLOPs (MACs) of a prompt with ``text`` unprunable tokens and ``kept`` of its
    ``visual`` tokens, following ``method.layer_tokens`` when the method defines it."""
    schedule = getattr(method, "layer_tokens", None)
    tokens = schedule(text, visual, kept, shape.num_layers) if schedule is not None else text + kept
    return prefill_flops(shape, tokens, FORMULA)


def rows_of_units(
    sizes: list[int], input_ids: torch.Tensor, attention_mask: torch.Tensor | None, visual_ids: list[int]
) -> list[tuple[int, list[int]]]:
    """Per prompt row: ``(tokens outside every selection unit, indices of the row's units)``.

    Units come in prompt order; a unit belongs to the row holding its first visual placeholder (tokens whose id
    is in ``visual_ids``). Placeholders outside every unit (LLaVA-NeXT's newline tokens) are spread
    proportionally and count as unprunable text.
    """
    real = attention_mask.bool() if attention_mask is not None and attention_mask.ndim == 2 else None
    if real is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    ids = torch.tensor(visual_ids, device=input_ids.device)
    per_row = (torch.isin(input_ids, ids) & real).sum(dim=1).tolist()
    if sizes and not sum(per_row):
        raise ValueError(f"flops= budgets need the visual placeholders in input_ids (token ids {visual_ids}); none "
                         "were found")
    lengths = real.sum(dim=1).tolist()
    bounds = [sum(per_row[: r + 1]) for r in range(len(per_row))]
    rows: list[list[int]] = [[] for _ in per_row]
    start, total_units, total_visual = 0, max(sum(sizes), 1), sum(per_row)
    for i, n in enumerate(sizes):
        position = Fraction(start * total_visual, total_units)
        rows[next((r for r, b in enumerate(bounds) if position < b), len(rows) - 1)].append(i)
        start += n
    return [(length - sum(sizes[i] for i in units), units)
            for length, units in zip(lengths, rows, strict=True) if units]


def solve_counts(
    flops: float, sizes: list[int], kwargs: dict[str, Any], config: Any, method: Any
) -> list[int]:
    """Per-unit counts that bring each prompt row's estimated prefill FLOPs to at most ``flops`` times its
    unpruned prefill FLOPs, with the most tokens that allows (warns when one token per unit is already over)."""
    shape = ModelShape.from_config(config)
    visual_ids = [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
                  if i is not None]
    counts = [0] * len(sizes)
    for text, units in rows_of_units(sizes, kwargs["input_ids"], kwargs.get("attention_mask"), visual_ids):
        visual = sum(sizes[i] for i in units)
        row_counts, met = flops_kept_counts(
            flops, [sizes[i] for i in units], text, lambda t, k, v=visual: prefill_cost(shape, method, t, v, k)
        )
        if not met:
            warnings.warn(f"flops={flops}: one visual token per image already exceeds the target for a prompt with "
                          f"{text} text tokens; keeping one per image", UserWarning, stacklevel=5)
        for i, k in zip(units, row_counts, strict=True):
            counts[i] = k
    return counts


def _row_lengths(kwargs: dict[str, Any], padded: int) -> list[int]:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        return mask.bool().sum(dim=1).tolist()
    return [padded] * kwargs["input_ids"].shape[0]


def with_estimate(
    record: PruneRecord, before: dict[str, Any], after: dict[str, Any], config: Any, method: Any
) -> PruneRecord:
    """``record`` with ``tflops_unpruned``/``tflops_pruned`` filled in (unless already set), from the unpadded row
    lengths of the original call (``before``) and the pruned call (``after``)."""
    if record.tflops_pruned is not None:
        return record
    shape = ModelShape.from_config(config)
    lengths_before = _row_lengths(before, record.seq_len_before)
    lengths_after = _row_lengths(after, record.seq_len_after)
    unpruned = pruned = 0
    for r, (b, a) in enumerate(zip(lengths_before, lengths_after, strict=True)):
        visual = sum(im.n for im in record.images if im.row == r)
        kept = visual - (b - a)  # merged tokens count as kept
        unpruned += prefill_cost(shape, method, b - visual, visual, visual)
        pruned += prefill_cost(shape, method, b - visual, visual, kept)
    return dataclasses.replace(record, tflops_unpruned=unpruned / 1e12, tflops_pruned=pruned / 1e12)
