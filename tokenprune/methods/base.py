"""The method contract: a small dataclass that declares its signals and selects kept indices for one image."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# Signals an adapter can compute for a vision-stage method (one selection unit -- an image, a crop or a frame --
# at a time). A method lists the names it needs in ``needs``; signals of a vision-encoder layer other than the
# feature layer are asked for through :meth:`PruningMethod.requests` with a ``layer``.
FEATURES = "features"            # [N, D] the image's visual tokens after the projector (the LLM's input space)
CLS_ATTENTION = "cls_attention"  # [H, N] [CLS] -> image-token attention at the vision feature layer (softmax: all keys)
SIGNALS = (FEATURES, CLS_ATTENTION)


@dataclass(frozen=True)
class SignalRequest:
    """One signal a method needs. ``layer`` indexes the vision encoder's layers (0-based, negative from the end,
    HF ``encoder.layers[layer]``); ``None`` means the feature layer (the layer whose output the projector reads)."""

    name: str
    layer: int | None = None

    @property
    def key(self) -> str:
        return self.name if self.layer is None else f"{self.name}@{self.layer}"


@dataclass(frozen=True)
class Selection:
    """What a merging method returns instead of bare indices.

    ``kept`` as for :meth:`PruningMethod.select`; ``merged`` ``[m, D]`` extra tokens in the FEATURES space that the
    adapter places in the image's span right after the kept tokens (VisionZip's contextual tokens, as officially
    appended after the dominant ones); ``assign`` ``[N]`` long: for each original token, the merged token it was
    folded into, or -1 (for drawing and records).
    """

    kept: torch.Tensor
    merged: torch.Tensor | None = None
    assign: torch.Tensor | None = None


@dataclass(frozen=True)
class SelectionContext:
    """Everything a vision-stage method may look at for one image.

    ``k`` is the budget already resolved by :mod:`tokenprune.budget`; ``n`` the unit's token count; ``grid`` the
    ``(h, w)`` patch grid when the tokens form one raster grid; ``index_in_row`` counts the images of one prompt;
    ``unit_index`` the selection unit within the image (the crop of a LLaVA-NeXT image under a per-crop budget, the
    frame of a video under a per-frame budget; 0 when the whole image is one unit).
    """

    k: int
    n: int
    signals: Mapping[str, torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    image_index: int = 0
    row: int = 0
    index_in_row: int = 0
    unit_index: int = 0

    def signal(self, name: str, layer: int | None = None) -> torch.Tensor:
        key = SignalRequest(name, layer).key
        if key not in self.signals:
            raise KeyError(
                f"signal {key!r} was not computed; a method must declare it in `needs` / `requests()` "
                f"(computed: {sorted(self.signals)})"
            )
        return self.signals[key]


@dataclass
class PruningMethod:
    """Base of every method. Subclasses set ``name``, ``paper``, ``needs`` and implement :meth:`select`.

    Hyper-parameters are dataclass fields with the official defaults; ``__post_init__`` validates them.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    stage: ClassVar[str] = "vision"
    needs: ClassVar[frozenset[str]] = frozenset()
    # The paper's budget on LLaVA-NeXT (specs/methods_vision.md §1): "crop" = one budget per crop (base tile and
    # each high-resolution tile, FasterVLM-style), "image" = one global pool over the whole packed image (DivPrune).
    crop_scope: ClassVar[str] = "crop"
    # LLaVA-NeXT's image_newline tokens are candidates (DivPrune's official code selects over the packed sequence,
    # newlines included); otherwise they are dropped whenever the image is pruned (per-crop official code has none).
    newline_candidates: ClassVar[bool] = False

    def requests(self) -> tuple[SignalRequest, ...]:
        """The signals to compute, with their layers. Default: every name in ``needs`` at the feature layer;
        methods that read other vision layers (HiPrune's object/deep layers) override this."""
        return tuple(SignalRequest(name) for name in sorted(self.needs))

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        """Kept indices of one image: ``torch.long``, sorted ascending, unique, in ``range(ctx.n)`` (or a
        :class:`Selection` for methods that also merge tokens)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The hyper-parameters as a plain dict (what :class:`~tokenprune.config.PruningConfig` stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"
