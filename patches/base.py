"""Instance wiring shared by the model-family adapters.

An adapter wraps ``model.forward`` and ``model.generate`` ON THE INSTANCE (never the class) and removes both on
:meth:`VisionStageAdapter.uninstall`. The family subclass implements :meth:`prune`: given the call's keyword
arguments it computes the image features and the signals the method declared, selects, and returns new keyword
arguments with the image placeholders and features compacted together (``mm_encoder_outputs``).

The wrappers' routing (``generate`` and ``forward`` on a fresh prompt, on a pruned KV cache, assisted generation)
is :class:`~tokenprune.patches.generate_routing.CacheRouting`, mixed into the adapter
(``patches/generate_routing.py``); the state a pruned prefill leaves on its cache is ``patches/pruned_cache.py``.

A decoder-stage method (``decoder``) runs inside the language model through a
:class:`~tokenprune.patches.decoder_loop.DecoderLoop` (hooks installed with the wrappers, removed with them); with a
vision-stage method too (composition, ``method=["divprune", "fastv"]``) it sees the vision-pruned prompt.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokenprune.budget import Keep, flops_targets, kept_count
from tokenprune.compaction import compact, padding_side, reindex_positions
from tokenprune.methods import PruningMethod
from tokenprune.patches.decoder_loop import DecoderLoop, LayerRecord
from tokenprune.patches.generate_routing import CacheRouting
from tokenprune.record import ImageRecord, PruneRecord

if TYPE_CHECKING:
    from tokenprune.api import PruningHandle

_MISSING = object()
_WRAPPED = ("forward", "generate")


@dataclass
class PrunedCall:
    """The keyword arguments to run instead, plus what happened."""

    kwargs: dict[str, Any]
    record: PruneRecord
    rope_deltas: torch.Tensor | None = None  # Qwen: [B, 1] decode offset on the pruned cache (M-RoPE)


class VisionStageAdapter(CacheRouting):
    """Base of the adapters that prune after the vision encoder, before the LLM (the wrappers' routing:
    :class:`~tokenprune.patches.generate_routing.CacheRouting`)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    signals: ClassVar[frozenset[str]] = frozenset()
    cls_token: ClassVar[bool] = True  # does the family's vision tower have a [CLS] token?
    # Does the adapter run the vision encoder's layer loop for ``stage = "vision-encoder"`` methods (FlowCut)?
    encoder_loop: ClassVar[bool] = False
    decoder_keep_positions: ClassVar[bool] = False  # True: decoder stages always KEEP positions (M-RoPE)
    # Can hand a whole video to a method as one selection unit (``SelectionContext.video``; HoliTom)?
    video_units: ClassVar[bool] = False
    decoder_one_d_rope: ClassVar[bool | None] = None  # 1-D RoPE despite KEEP (Gemma 3); None: not keep_positions

    def __init__(
        self,
        model: torch.nn.Module,
        method: PruningMethod,
        keep: float | int,
        handle: PruningHandle,
        scope: str | None = None,
        decoder: PruningMethod | None = None,
        decoder_keep: Keep | None = None,
    ):
        self.model = model
        self.method = method
        self.keep = keep
        self.scope = scope
        self.handle = handle
        self._saved: dict[str, Any] = {}
        self._generating = 0
        self._forward_params = [
            p.name
            for p in inspect.signature(type(model).forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        ]
        if method is not None and method.stage == "decoder":
            raise ValueError(f"{method.name!r} is a decoder-stage method: pass it as decoder=, not as the vision stage")
        if method is not None and method.stage == "two-stage":
            raise ValueError(f"{method.name!r} is a two-stage method: pass its stages() (enable_pruning splits it)")
        if method is not None:
            self.check_method()
        self._pending: PruneRecord | None = None  # the vision-stage record of the call in progress
        self._images_before: list[int] | None = None  # per row: images already in the cache (a new image entering)
        if decoder is not None:
            plan = decoder.check_layers(len(model.model.language_model.layers), model.config.model_type)
            first = min(stage.layer for stage in plan)
            reason = self.decoder_reason(model.config.model_type, decoder.name, first, model.config)
            if reason:
                raise ValueError(reason)
            plan = self.decoder_plan(decoder.name, plan, model.config)
        self.decoder = None if decoder is None else DecoderLoop(
            model, decoder, decoder_keep if decoder_keep is not None else keep, self.visual_token_ids(),
            self._decoder_record, force_keep_positions=self.decoder_keep_positions, plan=plan,
            blocks=self.decoder_blocks(), one_d_rope=self.decoder_one_d_rope, image_counts=self.decoder_image_counts,
        )

    def decoder_blocks(self) -> Any:
        """For a family whose image tokens attend to each other in both directions: a function of the model's call
        kwargs giving ``[B, L]`` the image block of every token (-1 text) or None (the call has no blocks), which the
        decoder loop keeps over the surviving tokens (``patches/decoder_masks.py``). Default None: causal only."""
        return None

    def decoder_image_counts(self, kwargs: dict[str, Any]) -> dict[int, list[int]]:
        """Per placeholder id, each image's placeholder count (flat prompt order) in the model call ``kwargs``, for
        families whose images can sit side by side (``patches/image_runs.py``); default {}: a run is one image."""
        return {}

    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids of the visual tokens in the LLM's input (where decoder-stage methods look)."""
        return (int(self.model.config.image_token_id),)

    # --- family-specific ---------------------------------------------------------------------------------------
    @classmethod
    def decoder_reason(cls, model_type: str, name: str, first_layer: int, config: Any = None) -> str | None:
        """Why this family cannot run decoder-stage method ``name`` whose first pruned LLM layer is ``first_layer``
        (``None``: it can). ``config`` is the model's config, or None for the released checkpoints (the method
        tables decide support without a model)."""
        return None

    @classmethod
    def mixture_of_experts(cls, model_type: str) -> bool:
        """Whether the family's LLM FFNs are mixtures of experts (no single set of FFN neurons: methods that sparsify
        the FFN, ``DecoderMethod.sparse_ffn``, decline)."""
        return False

    @classmethod
    def method_reason(cls, method: PruningMethod) -> str | None:
        """Why this family cannot run vision-stage ``method`` (an instance: its options count) beyond a missing
        signal, or ``None``. :meth:`check_method` raises it and the method tables show it (``tokenprune.catalog``)."""
        return None

    @classmethod
    def decoder_plan(cls, name: str, plan: tuple, config: Any = None, model_type: str | None = None) -> tuple:
        """Where a decoder-stage method's stages run on this family: its paper ``plan`` (``StagePlan`` per stage,
        validated on the model's depth) mapped onto the family's LLM (default: unchanged); a ``ValueError`` when it
        cannot be. ``config``: the model's, or None for the released checkpoints of ``model_type``."""
        return plan

    def check_method(self) -> None:
        """Raise a ``ValueError`` if this model cannot provide what the method needs."""
        missing = self.method.signals_needed(self.cls_token) - self.signals
        if self.method.video_only and not self.video_units:
            raise ValueError(
                f"method {self.method.name!r} merges tokens across the frames of a video; the "
                f"{self.model.config.model_type!r} adapter does not hand it whole videos (video merging runs on "
                f"Qwen2-VL, Qwen2.5-VL, Qwen3-VL / Qwen3.5 and LLaVA-OneVision). For images use an image method, "
                f"e.g. 'divprune'"
            )
        if self.method.stage == "vision-encoder" and not self.encoder_loop:
            raise ValueError(
                f"method {self.method.name!r} prunes inside the vision encoder, layer by layer; the "
                f"{self.model.config.model_type!r} adapter does not run the encoder's layer loop (only LLaVA-1.5, "
                f"model_type 'llava', does). Use 'fastervlm' or 'visionzip' ([CLS]-attention methods after the "
                f"encoder) instead"
            )
        if missing:
            raise ValueError(
                f"method {self.method.name!r} needs signal(s) {sorted(missing)}, which the "
                f"{self.model.config.model_type!r} adapter cannot compute (it provides {sorted(self.signals)}); use a "
                f"method that needs only those (`tokenprune methods` lists what runs on each family)"
            )

    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        """Pruned keyword arguments for a prefill call, or ``None`` when there is nothing to prune."""
        raise NotImplementedError

    def images_before(self, batch: int) -> list[int]:
        """Per row, the index (``SelectionContext.index_in_row``) the call's first image gets: 0 in a fresh prompt;
        after a pruned cache, the images the cache already holds (an image's index is its index in the
        conversation, as in a fresh run of all of it)."""
        return list(self._images_before) if self._images_before is not None else [0] * batch

    @staticmethod
    def prefill_ids(kwargs: dict[str, Any]) -> torch.Tensor | None:
        """``input_ids`` of a fresh prefill with pixels; None for a continuation with a warm KV cache. Raises when
        the call has pixels but no ``input_ids`` (the placeholders cannot be found)."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "tokenprune needs input_ids to find the image/video placeholders, but got inputs_embeds with pixel "
                "values; pass input_ids (as the processor returns them) or call disable_pruning(model) first"
            )
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return None  # a continuation with a warm cache: not a fresh prefill
        return input_ids

    def kept_counts(self, sizes: list[int], kwargs: dict[str, Any]) -> list[int]:
        """The budget of each selection unit (image, crop or frame) of one call, in prompt order.

        The one place adapters turn the budget into counts: ``keep`` per unit (:func:`tokenprune.budget.kept_count`),
        or a FLOPs target (``enable_pruning(..., flops=f)``) solved per prompt row over the whole call
        (:func:`tokenprune.budget.flops_targets.solve_counts`).
        """
        flops = getattr(getattr(self.handle, "config", None), "flops", None)
        if flops is not None:
            return flops_targets.solve_counts(flops, sizes, kwargs, self.model.config, self.method)
        return [kept_count(self.keep, n) for n in sizes]

    def finish_record(self, call: PrunedCall, kwargs: dict[str, Any]) -> PruneRecord:
        """The record ``handle.last`` gets: the adapter's, plus the prefill FLOPs estimate if it has none."""
        return flops_targets.with_estimate(call.record, kwargs, call.kwargs, self.model.config, self.method)

    # --- installation -------------------------------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        for name in _WRAPPED:
            self._saved[name] = model.__dict__.get(name, _MISSING)
        inner_forward, inner_generate = model.forward, model.generate

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(inner_forward, *args, **kwargs)

        def generate(*args: Any, **kwargs: Any) -> Any:
            return self._generate(inner_generate, *args, **kwargs)

        for name, fn, inner in (("forward", forward, inner_forward), ("generate", generate, inner_generate)):
            fn.__doc__, fn.__name__ = inner.__doc__, name
            fn.__wrapped__ = inner  # type: ignore[attr-defined]
            setattr(model, name, fn)
        if self.decoder is not None:
            self.decoder.install()

    def uninstall(self) -> None:
        for name, saved in self._saved.items():
            if saved is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                setattr(self.model, name, saved)
        self._saved.clear()
        if self.decoder is not None:
            self.decoder.uninstall()

    # --- records ------------------------------------------------------------------------------------------------
    def _vision_record(self, call: PrunedCall, kwargs: dict[str, Any]) -> None:
        """Record a vision-stage prefill (per-layer counts: the pruned prompt in every layer; the prefill FLOPs
        estimate); a decoder stage of the same call refines it when the language model has run."""
        mask = call.kwargs.get("attention_mask")
        ids = call.kwargs["input_ids"]
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        n_layers = len(self.model.model.language_model.layers)
        record = dataclasses.replace(
            self.finish_record(call, kwargs), tokens_per_layer=(tokens,) * n_layers,
            visual_per_layer=(call.record.n_kept,) * n_layers,
        )
        self._pending = record
        self.handle._record(record)

    def _decoder_record(self, info: LayerRecord) -> None:
        """``handle.last`` after a decoder-stage prefill; with a vision stage before it, each image's ``kept``
        indexes the ORIGINAL image tokens (composed through both stages) where the spans line up."""
        vision = self._pending
        images = [ImageRecord(row, m, n, kept, n_merged=merged) for row, m, n, kept, merged in info.images]
        name = self.decoder.method.name
        before = info.seq_len_before
        if vision is not None:
            name, before = f"{vision.method}+{name}", vision.seq_len_before
            images = _compose(vision.images, images)
        self.handle._record(PruneRecord(
            name, tuple(images), before, info.seq_len_after,
            tokens_per_layer=info.tokens_per_layer, visual_per_layer=info.visual_per_layer,
        ))


def pad_id(candidates: tuple[int | None, ...], reserved: set[int]) -> int:
    """The id re-padded rows are filled with: the first configured pad id of ``candidates`` (e.g. the text config's,
    then the model config's), unless there is none or it is one of the model's ``reserved`` multimodal ids -- then
    the smallest id that is none of them (padding is masked: any ordinary id will do)."""
    pad = next((c for c in candidates if c is not None), None)
    if pad is None or pad in reserved:
        pad = next(i for i in range(len(reserved) + 1) if i not in reserved)
    return int(pad)


def compacted_inputs(
    kwargs: dict[str, Any], keep: torch.Tensor, pad: int, *, dropped: tuple[str, ...],
    extra: dict[str, tuple[torch.Tensor, int]] | None = None,
) -> dict[str, Any]:
    """The call's keyword arguments with the placeholders where ``keep`` (``[B, L]``) is False dropped from every
    per-token input and the rows re-padded (:func:`~tokenprune.compaction.compact`): ``input_ids`` (padded with
    ``pad``), the ``extra`` per-token inputs ``{name: (tensor, pad value)}``, the attention mask (given, or built
    when the rows end up with different lengths), labels (``-100``) and position ids (re-indexed contiguously).
    The ``dropped`` inputs (pixels the adapter has encoded) are left out; the rest passes through."""
    input_ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    per_token = {"input_ids": (input_ids, pad), **(extra or {})}
    counts = keep.sum(dim=1)
    if mask is not None or bool((counts != counts[0]).any()):  # unequal rows need a mask for the re-padding
        per_token["attention_mask"] = (mask if mask is not None else torch.ones_like(input_ids), 0)
    if kwargs.get("labels") is not None:
        per_token["labels"] = (kwargs["labels"], -100)
    if kwargs.get("position_ids") is not None:
        per_token["position_ids"] = (reindex_positions(kwargs["position_ids"], keep), 0)
    new_kwargs = {k: v for k, v in kwargs.items() if k not in dropped}
    new_kwargs.update(compact(keep, per_token, side=padding_side(mask)))
    return new_kwargs


def placeholder_positions(
    is_placeholder: torch.Tensor, features: list[torch.Tensor] | list[int], kind: str = "image"
) -> torch.Tensor:
    """Flat (row-major) positions of the ``[B, L]`` placeholder mask, checked against the features they will hold
    (given as tensors ``[N_i, D]`` or as their counts ``N_i``)."""
    flat_positions = is_placeholder.reshape(-1).nonzero().squeeze(1)
    total = sum(f if isinstance(f, int) else f.shape[0] for f in features)
    if flat_positions.numel() != total:
        raise ValueError(
            f"the prompt has {flat_positions.numel()} {kind} placeholder tokens but the {len(features)} {kind}(s) "
            f"give {total} features; build the inputs with the model's processor"
        )
    return flat_positions


def text_embeddings(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None, row: int, end: int,
    placeholder_ids: tuple[int, ...],
) -> torch.Tensor:
    """TEXT_EMBEDDINGS (``methods/base.py``): LLM input embeddings of the row's text tokens after position ``end``
    (the image's last placeholder); every text token of the row if none follows. Placeholders and padding excluded."""
    ids = input_ids[row]
    text = ~torch.isin(ids, torch.tensor(placeholder_ids, device=ids.device))
    if mask is not None:
        text &= mask[row].bool()
    after = text.clone()
    after[: end + 1] = False
    chosen = ids[after] if bool(after.any()) else ids[text]
    with torch.no_grad():
        return model.get_input_embeddings()(chosen)


def _compose(vision: tuple[ImageRecord, ...], decoder: list[ImageRecord]) -> list[ImageRecord]:
    """Vision-stage images refined by the decoder stage's survivors (spans without merged tokens); where the two
    do not line up (merged tokens, image/video order), the decoder stage's own view of the spans is kept."""
    ordered = sorted(vision, key=lambda im: (im.row, im.index_in_row))
    if len(ordered) != len(decoder) or any(v.n_kept != d.n for v, d in zip(ordered, decoder, strict=True)):
        return decoder
    out = []
    for v, d in zip(ordered, decoder, strict=True):
        if v.n_merged:
            out.append(d)
        else:
            out.append(dataclasses.replace(v, kept=v.kept[d.kept.to(v.kept.device)], n_merged=d.n_merged))
    return out
