"""DeepStack maps (Qwen3-VL) carried through a decoder-stage pruning.

Qwen3-VL's language model adds one DeepStack feature map to the hidden states at the visual positions after each of
its first ``len(deepstack_visual_embeds)`` layers (``Qwen3VLTextModel._deepstack_process``). A decoder-stage pruning
at an earlier layer shortens the hidden states, so HF's own addition (by the unpruned ``visual_pos_masks``) no longer
fits. The decoder loop then takes the maps out of the language model's arguments, lays each one out like the hidden
states (``[B, L, D]``, zero at text), hands them through every pruning step with the same gather and the same merges
as the hidden states, and adds them itself after those layers: the surviving tokens get their own DeepStack rows
(a merged token the same combination of its members' rows as of their hidden states), dropped tokens none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.patches.decoder_select import apply_mixes, gather

_MASK, _EMBEDS = "visual_pos_masks", "deepstack_visual_embeds"


@dataclass
class DeepStack:
    """The DeepStack maps still to be added, in the current layout of the hidden states."""

    levels: list[torch.Tensor]  # [B, L, D] per level: level l is added after LLM layer l
    visual: torch.Tensor        # [B, L] bool: slots that carry a visual token (HF's visual_pos_masks, gathered)

    def follow(self, slots: torch.Tensor, mixes: list) -> None:
        """The same step as the hidden states': keep ``slots`` ``[B, M]`` and apply the merges ``mixes``."""
        self.levels = [apply_mixes(gather(x, slots), x, mixes) for x in self.levels]
        self.visual = self.visual.gather(1, slots)

    def add(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``h`` after ``layer`` with that level added at the visual slots (HF's arithmetic: ``h[mask] + rows``)."""
        if layer >= len(self.levels) or not bool(self.visual.any()):
            return h
        h = h.clone()
        rows = self.levels[layer].to(h.device, h.dtype)[self.visual]
        h[self.visual] = h[self.visual] + rows
        return h


def take_deepstack(kwargs: dict[str, Any], first_pruned_layer: int, q: int) -> DeepStack | None:
    """The DeepStack maps of a language-model call (``kwargs``, changed in place: HF then adds none), or None when
    the call has none or every map is added before ``first_pruned_layer`` (HF's own addition is then exact)."""
    embeds, mask = kwargs.get(_EMBEDS), kwargs.get(_MASK)
    if embeds is None or mask is None or len(embeds) <= first_pruned_layer:
        return None
    mask = mask.bool()
    if mask.shape[1] != q:
        raise ValueError(
            f"DeepStack visual_pos_masks covers {mask.shape[1]} tokens, the language model call {q}; a decoder-stage "
            f"pruning before the last DeepStack layer needs them aligned (one mask entry per input token)"
        )
    levels = []
    for level in embeds:
        full = level.new_zeros(*mask.shape, level.shape[-1])  # [B, L, D]
        full[mask] = level.to(full.device)
        levels.append(full)
    kwargs[_EMBEDS], kwargs[_MASK] = None, None
    return DeepStack(levels, mask)
