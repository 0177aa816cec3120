"""The method contract: a small dataclass that declares its signals and selects kept indices for one image."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# Signals an adapter can compute for a vision-stage method (one image at a time).
FEATURES = "features"            # [N, D] the image's visual tokens after the projector (the LLM's input space)
CLS_ATTENTION = "cls_attention"  # [H, N] [CLS] -> image-token attention at the vision feature layer (softmax: all keys)
SIGNALS = (FEATURES, CLS_ATTENTION)


@dataclass(frozen=True)
class SelectionContext:
    """Everything a vision-stage method may look at for one image.

    ``k`` is the budget already resolved by :mod:`tokenprune.budget`; ``n`` the image's token count; ``grid`` the
    ``(h, w)`` patch grid when the tokens form one raster grid; ``index_in_row`` counts the images of one prompt.
    """

    k: int
    n: int
    signals: Mapping[str, torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    image_index: int = 0
    row: int = 0
    index_in_row: int = 0

    def signal(self, name: str) -> torch.Tensor:
        if name not in self.signals:
            raise KeyError(
                f"signal {name!r} was not computed; a method must list it in `needs` (computed: {sorted(self.signals)})"
            )
        return self.signals[name]


@dataclass
class PruningMethod:
    """Base of every method. Subclasses set ``name``, ``paper``, ``needs`` and implement :meth:`select`.

    Hyper-parameters are dataclass fields with the official defaults; ``__post_init__`` validates them.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    stage: ClassVar[str] = "vision"
    needs: ClassVar[frozenset[str]] = frozenset()

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        """Kept indices of one image: ``torch.long``, sorted ascending, unique, in ``range(ctx.n)``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The hyper-parameters as a plain dict (what :class:`~tokenprune.config.PruningConfig` stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"
