"""The method contract: a small dataclass that declares its signals and selects kept indices for one image."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# Signals an adapter can compute for a vision-stage method, one selection unit (an image, a crop or a frame) at a
# time. A method lists the names it needs in ``needs``; signals of a vision-encoder layer other than the feature
# layer are asked for through :meth:`PruningMethod.requests` with a ``layer``. N = the unit's visual tokens in the
# order of its placeholder span; every attention is a softmax in fp32 over ALL keys of the layer (incl. [CLS]),
# recomputed for just the rows needed (never read from the kernel). Semantics per family:
#
# CLIP towers (LLaVA-1.5, LLaVA-NeXT crops; ``patches/clip_signals.py``), layer l = ``encoder.layers[l]``:
FEATURES = "features"            # [N, D]  the visual tokens after the projector (the LLM's input space)
CLS_ATTENTION = "cls_attention"  # [H, N]  [CLS] query row of layer l over the image-token keys
ATTENTION_RECEIVED = "attention_received"  # [N] attention each image token receives in layer l: mean over heads
#                                    and over ALL query rows ([CLS] included), [CLS] column dropped (HiPrune).
#                                    Qwen2-VL/2.5-VL (no [CLS]): mean over heads and over the image's query rows of
#                                    ViT block l, then mean over the 4 rows of each 2x2 merge unit, un-permuted from
#                                    window order to raster order -> one value per merged token (HiPrune/HoloV ports).
#                                    Gemma 3 (SigLIP, no [CLS]): mean over heads and all patch query rows of layer l,
#                                    then mean over each pooling window of the projector (4x4 patches -> 1 token).
ATTENTION_MAP = "attention_map"  # [N, N]  head-mean attention among image tokens (rows = queries); the [CLS] row
#                                    and column are dropped after the softmax, so rows need not sum to 1 (FoPru).
VISION_HIDDEN = "vision_hidden"  # [N, Dv] output of layer l at the image tokens (pre-projector; at the feature layer
#                                    exactly what the projector reads). Qwen: output of ViT block l averaged over each
#                                    merge unit, un-permuted (MMTok's vision-vision space on Qwen2.5-VL).
#                                    Gemma 3: output of SigLIP layer l (before post_layernorm), averaged over each
#                                    pooling window.
CLS_HIDDEN = "cls_hidden"        # [Dv]    output of layer l at [CLS] (VisionZip keeps it as a dominant token)
VISION_KEYS = "vision_keys"      # [H, N, d_h] per-head keys of layer l at the image tokens: ``k_proj`` output before
#                                    any scaling (CLIP has no RoPE). Qwen: not provided.
CLS_ATTENTION_WIDE = "cls_attention_wide"  # [N] [CLS] row of layer l computed as ONE full-width head:
#                                    softmax(q_cls . k^T / sqrt(D_v)) with q, k the whole q_proj/k_proj outputs
#                                    (Recoverable Compression's hook on q_proj/k_proj), image-token columns.
TEXT_EMBEDDINGS = "text_embeddings"  # [M, D] the LLM input embeddings (``get_input_embeddings()``) of the text tokens
#                                    of the image's prompt row that FOLLOW the image's placeholder span (the user's
#                                    question and the rest of the prompt; other images' placeholders and padding
#                                    excluded); if no text follows, every non-image, non-padding token of the row.
#                                    Same definition on every family (BOS is never after an image).
PAIRED_TEXT = "paired_text"  # [M, D] the LLM input embeddings of the image's PAIRED text in an interleaved prompt:
#                                    the text tokens between the image's block and the next image's (or video's)
#                                    block of the row, or the row's end for its last image; the family's image-block
#                                    delimiters (Qwen <|vision_start|>/<|vision_end|>, InternVL <img>/</img>) and
#                                    padding excluded. An image followed directly by another has none: an error (CATP).
SIGNALS = (
    FEATURES, CLS_ATTENTION, ATTENTION_RECEIVED, ATTENTION_MAP, VISION_HIDDEN, CLS_HIDDEN, VISION_KEYS,
    CLS_ATTENTION_WIDE, TEXT_EMBEDDINGS, PAIRED_TEXT,
)
# Signals that exist only on vision towers with a [CLS] token (CLIP); a Qwen adapter never computes them.
CLS_SIGNALS = frozenset({CLS_ATTENTION, CLS_HIDDEN, CLS_ATTENTION_WIDE})


@dataclass(frozen=True)
class Deviation:
    """One deliberate difference from a method's official code, declared next to its defaults so the docs' table
    (:mod:`tokenprune.methods.deviations`) cannot fall behind the code. ``what`` we do differently, ``why``, and
    ``restore``: the option that gives the official behaviour back (``"quirks=True"``), or None if none does."""

    what: str
    why: str
    restore: str | None = None


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

    ``kept`` as for :meth:`PruningMethod.select`; ``merged`` ``[m, D]`` extra tokens that the adapter places in the
    image's span right after the kept tokens (VisionZip's contextual tokens, as officially appended after the
    dominant ones), except the first ``lead`` rows, which go right BEFORE the kept tokens (VisionZip's [CLS] token,
    officially the first dominant token). ``space`` says where the merged rows live: ``"features"`` (projector
    output, placed as they are) or ``"vision_hidden"`` (pre-projector, like :data:`VISION_HIDDEN`; the adapter runs
    them through the projector, as the official codes merge before projecting). ``assign`` ``[N]`` long: for each
    original token, the merged token it was folded into, or -1 (for drawing and records). ``order`` ``[k + m]``
    (optional): the sequence of ``cat([kept, merged])`` rows in the span where positions are re-indexed (HoliTom's
    per-window ``[static clusters, frame tokens]`` layout); None: ``lead`` merged, kept, the other merged.
    """

    kept: torch.Tensor
    merged: torch.Tensor | None = None
    assign: torch.Tensor | None = None
    lead: int = 0
    space: str = FEATURES
    order: torch.Tensor | None = None

    @property
    def n_merged(self) -> int:
        return 0 if self.merged is None else int(self.merged.shape[0])


@dataclass(frozen=True)
class SelectionContext:
    """Everything a vision-stage method may look at for one image.

    ``k`` is the budget already resolved by :mod:`tokenprune.budget`; ``n`` the unit's token count; ``grid`` the
    ``(h, w)`` patch grid when the tokens form one raster grid; ``index_in_row`` counts the images of one prompt;
    ``unit_index`` the selection unit within the image (the crop of a LLaVA-NeXT image under a per-crop budget, the
    frame of a video under a per-frame budget; 0 when the whole image is one unit); ``cls_token`` is False on vision
    towers without [CLS] (the signals are then those of ``needs_without_cls``); ``video`` is ``(frames, h, w)`` when
    the unit is a whole video (frame-major rasters of ``h x w`` tokens; methods with ``video_unit = "video"``).
    """

    k: int
    n: int
    signals: Mapping[str, torch.Tensor] = field(default_factory=dict)
    grid: tuple[int, int] | None = None
    image_index: int = 0
    row: int = 0
    index_in_row: int = 0
    unit_index: int = 0
    cls_token: bool = True
    video: tuple[int, int, int] | None = None

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

    Families: ``needs`` are the signals on a vision tower with [CLS] (CLIP: LLaVA-1.5, LLaVA-NeXT). On towers
    without [CLS] (Qwen2-VL/2.5-VL) a method uses ``needs_without_cls`` (a documented substitute, e.g. attention
    received instead of the [CLS] row); if that is None and ``needs`` contains a [CLS] signal, or ``no_cls_reason``
    is set, the method cannot run there and :meth:`check_family` raises with that reason.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    stage: ClassVar[str] = "vision"  # "vision-encoder": prunes inside the tower's layer loop (``encoder_step``)
    needs: ClassVar[frozenset[str]] = frozenset()
    # The paper's budget on LLaVA-NeXT (its official code's AnyRes path): "crop" = one budget per crop (base tile and
    # each high-resolution tile, FasterVLM-style), "image" = one global pool over the whole packed image (DivPrune).
    crop_scope: ClassVar[str] = "crop"
    # LLaVA-NeXT's image_newline tokens are candidates (DivPrune's official code selects over the packed sequence,
    # newlines included); otherwise they are dropped whenever the image is pruned (per-crop official code has none).
    newline_candidates: ClassVar[bool] = False
    needs_without_cls: ClassVar[frozenset[str] | None] = None
    no_cls_reason: ClassVar[str] = ""
    # False for methods whose kept count is data-dependent (Recoverable Compression): ``k`` is then only honoured
    # as "keep everything" when ``k >= n``.
    fixed_budget: ClassVar[bool] = True
    # Non-empty when no adapter can run the method yet; :meth:`check_family` raises ``NotImplementedError`` with it:
    # ``enable_pruning`` fails before touching the model.
    unavailable: ClassVar[str] = ""
    # Deliberate differences from the official code (rendered into docs/deviations.md).
    deviations: ClassVar[tuple[Deviation, ...]] = ()
    # Videos: "frame" = the family's default units (per frame unless scope="image"); "video" = one unit per whole
    # video with ``SelectionContext.video`` set (HoliTom's temporal merging). ``video_only``: the method merges
    # frames and declines families without videos at enable time and images at the call.
    video_unit: ClassVar[str] = "frame"
    video_only: ClassVar[bool] = False

    @classmethod
    def signals_needed(cls, cls_token: bool = True) -> frozenset[str]:
        """Signal names on a tower with (``cls_token=True``) or without [CLS]; raises if unsupported there."""
        if cls.unavailable:
            raise NotImplementedError(f"method {cls.name!r} cannot run yet: {cls.unavailable}")
        if cls_token:
            return cls.needs
        if cls.needs_without_cls is not None:
            return cls.needs_without_cls
        if cls.no_cls_reason or cls.needs & CLS_SIGNALS:
            reason = cls.no_cls_reason or f"it needs {sorted(cls.needs & CLS_SIGNALS)}"
            raise ValueError(
                f"method {cls.name!r} cannot run on a vision tower without a [CLS] token (Qwen's ViTs, "
                f"LLaVA-OneVision's SigLIP): "
                f"{reason}"
            )
        return cls.needs

    def check_family(self, cls_token: bool = True) -> None:
        """Raise a ``ValueError`` saying why not and what to use instead if the method cannot run there."""
        self.signals_needed(cls_token)

    def requests(self, cls_token: bool = True) -> tuple[SignalRequest, ...]:
        """The signals to compute, with their layers. Default: every needed name at the feature layer; methods
        that read other vision layers (HiPrune's object/deep layers) override this."""
        return tuple(SignalRequest(name) for name in sorted(self.signals_needed(cls_token)))

    def select(self, ctx: SelectionContext) -> torch.Tensor | Selection:
        """Kept indices of one image: ``torch.long``, sorted ascending, unique, in ``range(ctx.n)`` (or a
        :class:`Selection` for methods that also merge tokens)."""
        raise NotImplementedError

    def select_many(self, contexts: Sequence[SelectionContext]) -> list[torch.Tensor | Selection]:
        """:meth:`select` for several images or crops, in order. Methods whose selector takes a batch override it
        (contexts of equal ``n`` and ``k`` in one call, each exactly as alone: :mod:`tokenprune.methods.batched`)."""
        return [self.select(ctx) for ctx in contexts]

    def options(self) -> dict[str, Any]:
        """The hyper-parameters as a plain dict (what :class:`~tokenprune.config.PruningConfig` stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"
