"""Instance wiring shared by the model-family adapters.

An adapter wraps ``model.forward`` and ``model.generate`` ON THE INSTANCE (never the class) and removes both on
:meth:`VisionStageAdapter.uninstall`. The family subclass implements :meth:`prune`: given the call's keyword
arguments it computes the image features and the signals the method declared, selects, and returns new keyword
arguments with the image placeholders and features compacted together (``mm_encoder_outputs``).

* ``generate``: prunes once, runs the original ``generate`` on the shorter prompt and returns the ORIGINAL prompt
  ids followed by the new tokens, so callers that slice by prompt length (lmms-eval) get the generated tokens.
* ``forward`` with images: prunes and runs; logits cover the pruned sequence (see ``handle.last``).
* ``forward`` decode steps of a manual loop after a pruned prefill: an attention mask built on the original
  prompt length is mapped onto the pruned KV cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tokenprune import flops_budget
from tokenprune.budget import kept_count
from tokenprune.methods import PruningMethod
from tokenprune.record import PruneRecord

if TYPE_CHECKING:
    from tokenprune.api import PruningHandle

_MISSING = object()
_WRAPPED = ("forward", "generate")


@dataclass
class PrunedCall:
    """The keyword arguments to run instead, plus what happened."""

    kwargs: dict[str, Any]
    record: PruneRecord


class VisionStageAdapter:
    """Base of the adapters that prune after the vision encoder, before the LLM."""

    model_types: ClassVar[tuple[str, ...]] = ()
    signals: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: torch.nn.Module, method: PruningMethod, keep: float | int, handle: PruningHandle):
        self.model = model
        self.method = method
        self.keep = keep
        self.handle = handle
        self._saved: dict[str, Any] = {}
        self._generating = 0
        # (pruned attention mask, original prompt length) of the last pruned forward prefill, for decode steps;
        # kept small on purpose: holding the call's kwargs would keep its KV cache alive.
        self._decode_map: tuple[torch.Tensor | None, int] | None = None
        self._forward_params = [
            p.name
            for p in inspect.signature(type(model).forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        ]
        self.check_method()

    # --- family-specific ---------------------------------------------------------------------------------------
    def check_method(self) -> None:
        """Raise a ``ValueError`` if this model cannot provide what the method needs."""
        missing = self.method.needs - self.signals
        if missing:
            raise ValueError(
                f"method {self.method.name!r} needs signal(s) {sorted(missing)}, which the "
                f"{self.model.config.model_type!r} adapter cannot compute (it provides {sorted(self.signals)})"
            )

    def prune(self, kwargs: dict[str, Any]) -> PrunedCall | None:
        """Pruned keyword arguments for a prefill call, or ``None`` when there is nothing to prune."""
        raise NotImplementedError

    def kept_counts(self, sizes: list[int], kwargs: dict[str, Any]) -> list[int]:
        """The budget of each selection unit (image, crop or frame) of one call, in prompt order.

        The one place adapters turn the budget into counts: ``keep`` per unit (:func:`tokenprune.budget.kept_count`),
        or a FLOPs target (``enable_pruning(..., flops=f)``) solved per prompt row over the whole call
        (:func:`tokenprune.flops_budget.solve_counts`).
        """
        flops = getattr(getattr(self.handle, "config", None), "flops", None)
        if flops is not None:
            return flops_budget.solve_counts(flops, sizes, kwargs, self.model.config, self.method)
        return [kept_count(self.keep, n) for n in sizes]

    def finish_record(self, call: PrunedCall, kwargs: dict[str, Any]) -> PruneRecord:
        """The record ``handle.last`` gets: the adapter's, plus the prefill FLOPs estimate if it has none."""
        return flops_budget.with_estimate(call.record, kwargs, call.kwargs, self.model.config, self.method)

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

    def uninstall(self) -> None:
        for name, saved in self._saved.items():
            if saved is _MISSING:
                self.model.__dict__.pop(name, None)
            else:
                setattr(self.model, name, saved)
        self._saved.clear()
        self._decode_map = None

    # --- wrappers -----------------------------------------------------------------------------------------------
    def _forward(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        if self._generating:
            return inner(*args, **kwargs)
        if len(args) > len(self._forward_params):
            return inner(*args, **kwargs)
        kwargs.update(zip(self._forward_params, args, strict=False))
        call = self.prune(kwargs)
        if call is None:
            return inner(**self._translate_decode_mask(kwargs))
        self._decode_map = (call.kwargs.get("attention_mask"), call.record.seq_len_before)
        self.handle._record(self.finish_record(call, kwargs))
        return inner(**call.kwargs)

    def _generate(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], torch.Tensor)):
            return self._run_generate(inner, *args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        elif isinstance(kwargs.get("inputs"), torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        call = self.prune(kwargs)
        if call is None:
            return self._run_generate(inner, **kwargs)
        self.handle._record(self.finish_record(call, kwargs))
        out = self._run_generate(inner, **call.kwargs)
        return _with_original_prompt(out, kwargs["input_ids"], call.kwargs["input_ids"].shape[1])

    def _run_generate(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        self._generating += 1
        try:
            return inner(*args, **kwargs)
        finally:
            self._generating -= 1

    def _translate_decode_mask(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Map a decode step's mask from original-prompt coordinates onto the pruned KV cache (manual loops)."""
        mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if self._decode_map is None or mask is None or mask.ndim != 2 or cache is None or ids is None:
            return kwargs
        cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
        pruned_mask, original_length = self._decode_map
        if cached is None or pruned_mask is None or mask.shape[0] != pruned_mask.shape[0]:
            return kwargs
        new_tokens = cached - pruned_mask.shape[1]  # generated since the pruned prefill
        if new_tokens < 0 or mask.shape[1] != original_length + new_tokens + ids.shape[1]:
            return kwargs
        translated = torch.cat([pruned_mask.to(mask.dtype), mask[:, original_length:]], dim=1)
        return {**kwargs, "attention_mask": translated}


def _with_original_prompt(out: Any, prompt_ids: torch.Tensor, pruned_length: int) -> Any:
    """Replace the pruned prompt at the head of ``generate``'s output with the original prompt ids."""
    sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if sequences is None:
        return out
    repeat = sequences.shape[0] // prompt_ids.shape[0]  # num_return_sequences / beams
    prompt = prompt_ids.to(sequences.device).repeat_interleave(repeat, dim=0)
    restored = torch.cat([prompt, sequences[:, pruned_length:]], dim=1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out
