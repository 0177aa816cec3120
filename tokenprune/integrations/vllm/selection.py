"""One image's selection inside vLLM: budget, context, the method's ``select`` and a check of its answer."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tokenprune.integrations.vllm.options import VllmPruning
from tokenprune.methods import Selection, SelectionContext


def select_image(
    pruning: VllmPruning,
    n: int,
    signals: Mapping[str, torch.Tensor],
    grid: tuple[int, int] | None,
    cls_token: bool,
) -> torch.Tensor:
    """Kept indices (``torch.long``, ascending, on the CPU) of one image with ``n`` visual tokens.

    vLLM batches images of different prompts together, so each image is selected as the first image of its
    prompt (``index_in_row=0``): seeded methods (random, k-center's pivot without [CLS]) match
    ``enable_pruning`` on one-image prompts.
    """
    k = pruning.kept(n)
    if k >= n:
        return torch.arange(n)
    ctx = SelectionContext(k=k, n=n, signals=dict(signals), grid=grid, cls_token=cls_token)
    kept = pruning.method.select(ctx)
    if isinstance(kept, Selection):
        raise ValueError(f"method {pruning.method.name!r} merges tokens; the vLLM plugin supports pure selection")
    kept = kept.detach().to("cpu", torch.long)
    if kept.ndim != 1 or kept.numel() != k or not bool((kept[1:] > kept[:-1]).all()):
        raise RuntimeError(
            f"{pruning.method.name} returned {kept.tolist()} for k={k}, n={n}; expected {k} ascending unique indices "
            f"(vLLM reserved exactly {k} placeholders for this image)"
        )
    return kept
