"""Generate and cache routing of an adapter: which path a ``forward`` or ``generate`` call on a pruned model takes.

:class:`CacheRouting` is the half of :class:`~tokenprune.patches.base.VisionStageAdapter` that the instance wrappers
call (``model.forward`` / ``model.generate``); the adapter's other half prunes (``prune``) and records.

* ``generate``: prunes once, runs the original ``generate`` on the shorter prompt and returns the ORIGINAL prompt
  ids followed by the new tokens, so callers that slice by prompt length (lmms-eval) get the generated tokens.
* ``forward`` with images: prunes and runs; logits cover the pruned sequence (see ``handle.last``).
* ``forward`` decode steps of a manual loop after a pruned prefill: an attention mask built on the original
  prompt length is mapped onto the pruned KV cache.
* a call with a cache a pruned prefill filled (follow-up question, resumed generation, a ``copy.deepcopy`` of a
  prompt cache): mapped onto the cache by its :class:`~tokenprune.patches.pruned_cache.CacheState` -- exactly the
  new tokens, at their original positions, the image as it was pruned when it entered the cache. A new image in
  those new tokens is pruned as it enters (``patches/entering_images.py``).
* assisted generation (``assistant_model=``, ``prompt_lookup_num_tokens=``): exact with a vision-stage method on a
  fresh prompt; declined (:func:`decline_assisted`) where it cannot be exact.

The generate modes and what each gives on a pruned model: docs/conversations.md (tests/test_generate_modes.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tokenprune.patches import entering_images, pruned_cache

if TYPE_CHECKING:
    from tokenprune.patches.base import PrunedCall

ASSISTED_FIELDS = ("prompt_lookup_num_tokens", "assistant_early_exit")  # GenerationConfig fields of candidate modes


def assisted_mode(model: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    """The assisted-generation argument of a ``generate`` call (``assistant_model`` or a ``GenerationConfig`` field
    that turns on candidate verification), or None for every other mode."""
    if kwargs.get("assistant_model") is not None:
        return "assistant_model"
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return next((f for f in ASSISTED_FIELDS if kwargs.get(f, getattr(config, f, None)) is not None), None)


def decline_assisted(model: torch.nn.Module, kwargs: dict[str, Any], decoder: str | None) -> None:
    """Raise a ``ValueError`` for an assisted ``generate`` that cannot be exact on a pruned model.

    * under decoder-stage method ``decoder``: the first verification forward holds the prompt AND the candidate
      tokens, so the method would select at its layers with those candidates in the sequence (measured: other logits
      than plain greedy);
    * on a warm cache: transformers 5.23's assisted loop feeds the whole ``input_ids`` on top of it (the unpruned
      model answers wrong there too).
    Vision-stage methods prune before the LLM: on a fresh prompt, assisted greedy is plain greedy token for token."""
    mode = assisted_mode(model, kwargs)
    if mode is None:
        return
    if decoder is not None:
        raise ValueError(
            f"{decoder!r} is a decoder-stage method and this generate call is assisted ({mode}=): assisted "
            f"generation verifies its candidate tokens in the same forward as the prompt, so {decoder!r} would select "
            f"its tokens inside the LLM with those candidates in the sequence, not as a plain generate does. Call "
            f"generate without {mode}= (plain greedy gives exactly the tokens assisted greedy would), use a "
            f"vision-stage method (assisted generation is exact with those), or disable_pruning(model) for that call"
        )
    if pruned_cache.cached_length(kwargs.get("past_key_values")) > 0:
        raise ValueError(
            f"this generate call is assisted ({mode}=) and continues a KV cache that already holds tokens: "
            f"transformers' assisted generation feeds the whole input_ids on top of such a cache (not only the new "
            f"tokens), which cannot be exact. Continue the cache without {mode}= (a follow-up turn or resumed "
            f"generation is exact), or run the whole conversation with {mode}= on a fresh cache "
            f"(past_key_values=None)"
        )


def run_lengths(model: torch.nn.Module, kwargs: dict[str, Any], shift: int) -> dict[str, int]:
    """``max_length`` / ``min_length`` of a ``generate`` call (absolute: prompt + new tokens, from the call, its
    ``generation_config`` or the model's) moved onto ids ``shift`` tokens shorter than the caller's, so that the pruned
    run generates as many new tokens as the caller's length asks for; {} where ``max_new_tokens`` /
    ``min_new_tokens`` decide or no absolute length is set."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    lengths = {}
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value = kwargs.get(total, getattr(config, total, None))
        if shift and value is not None and kwargs.get(new, getattr(config, new, None)) is None:
            lengths[total] = max(int(value) - shift, 0)
    return lengths


class CallerPromptStreamer:
    """A ``generate`` streamer whose first ``put`` (the prompt, which ``generate`` streams before the new tokens) gets
    the caller's prompt ids instead of the pruned ones it runs on; every later ``put`` and ``end`` pass through."""

    def __init__(self, streamer: Any, caller_ids: torch.Tensor):
        self.streamer, self.caller_ids = streamer, caller_ids

    def put(self, value: torch.Tensor) -> None:
        if self.caller_ids is not None:
            repeat = max(value.shape[0] // self.caller_ids.shape[0], 1)  # rows as generate expands them
            value, self.caller_ids = self.caller_ids.to(value.device).repeat_interleave(repeat, dim=0), None
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()


class CacheRouting:
    """The ``forward`` / ``generate`` wrappers' routing (mixed into ``VisionStageAdapter``, which provides ``model``,
    ``method``, ``decoder``, ``prune``, ``visual_token_ids`` and the record hooks)."""

    # --- wrappers -----------------------------------------------------------------------------------------------
    def _forward(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        if self._generating:
            return inner(*args, **kwargs)
        if len(args) > len(self._forward_params):
            return inner(*args, **kwargs)
        kwargs.update(zip(self._forward_params, args, strict=False))
        cache = kwargs.get("past_key_values")
        if pruned_cache.cached_length(cache) == 0:
            pruned_cache.forget(cache)
        call = self.prune(kwargs) if self.method is not None else None
        if call is None:
            out = inner(**self._on_pruned_cache(kwargs))
            self._remember_positions(cache if cache is not None else getattr(out, "past_key_values", None))
            return out
        self._vision_record(call, kwargs)
        try:
            out = inner(**call.kwargs)
        finally:
            self._pending = None
        self._remember(cache if cache is not None else getattr(out, "past_key_values", None), call, kwargs)
        return out

    def _generate(self, inner: Any, *args: Any, **kwargs: Any) -> Any:
        decline_assisted(self.model, kwargs, None if self.decoder is None else self.decoder.method.name)
        if len(args) > 1 or (args and not isinstance(args[0], torch.Tensor)):
            return self._run_generate(inner, *args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        elif isinstance(kwargs.get("inputs"), torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        cache = kwargs.get("past_key_values")
        length = pruned_cache.cached_length(cache)
        if length == 0:
            pruned_cache.forget(cache)
        state = pruned_cache.state_of(cache)
        if length and state is not None and state.vision_pruned and kwargs.get("input_ids") is not None:
            return self._continue_generate(inner, state, kwargs, length)
        if length and state is not None and kwargs.get("input_ids") is not None:
            if self.decoder is not None and entering_images.has_pixels(kwargs) and entering_images.enters_new_images(
                    kwargs["input_ids"], length, self.visual_token_ids()):
                raise ValueError(entering_images.decoder_stage_decline(self.decoder.method.name))
            self.continue_positions(state, kwargs["input_ids"].shape[0])  # a decoder-stage cache: its own offset
        with torch.no_grad():  # as generate itself: no autograd graph (bitsandbytes' CPU 4-bit kernel refuses one)
            call = self.prune(kwargs) if self.method is not None else None
        if call is None:
            out = self._run_generate(inner, **kwargs)
            self._remember_positions(cache if cache is not None else getattr(out, "past_key_values", None))
            return out
        self._vision_record(call, kwargs)
        try:
            out = self._run_generate(inner, caller_ids=kwargs["input_ids"], **call.kwargs)
        finally:
            self._pending = None
        self._remember(cache if cache is not None else getattr(out, "past_key_values", None), call, kwargs)
        return pruned_cache.with_original_prompt(out, kwargs["input_ids"], call.kwargs["input_ids"].shape[1])

    # --- calls on a pruned cache --------------------------------------------------------------------------------
    def _remember(self, cache: Any, call: PrunedCall, kwargs: dict[str, Any]) -> None:
        """Attach what the pruned prefill cached to the cache object (it travels with ``copy.deepcopy``)."""
        pruned_cache.attach(
            cache, original_ids=kwargs["input_ids"].clone(), prefix_ids=call.kwargs["input_ids"].clone(),
            prefix_mask=call.kwargs.get("attention_mask"), prefix_types=call.kwargs.get("mm_token_type_ids"),
            rope_deltas=call.rope_deltas,
            images=entering_images.images_in_rows(call.record, [0] * kwargs["input_ids"].shape[0]),
        )

    def _remember_positions(self, cache: Any) -> None:
        """A decoder-stage selection on a cache without a vision stage: keep the family's decode offset (Qwen's
        ``rope_deltas``, HF module state) with it, for later calls on this cache or a copy."""
        state = pruned_cache.state_of(cache)
        if state is not None and not state.vision_pruned and state.rope_deltas is None:
            deltas = getattr(self.model.model, "rope_deltas", None)
            state.rope_deltas = deltas.clone() if isinstance(deltas, torch.Tensor) else None

    def _continue_generate(self, inner: Any, state: Any, kwargs: dict[str, Any], length: int) -> Any:
        """``generate`` on a cache a vision-pruned prefill filled: the call's ids (original prompt + new tokens)
        mapped onto the pruned prompt, the output's head restored to the caller's ids. New images in the new tokens
        are pruned as they enter (:meth:`_enter_generate`)."""
        entering = entering_images.has_pixels(kwargs) and entering_images.enters_new_images(
            kwargs["input_ids"], pruned_cache.original_length(kwargs["past_key_values"]), self.visual_token_ids())
        if not entering:
            kwargs = pruned_cache.without_cached_pixels(kwargs)
        mapped, original = pruned_cache.continuation(state, kwargs, length)
        self.continue_positions(state, mapped["input_ids"].shape[0])
        if entering:
            return self._enter_generate(inner, state, kwargs, mapped, length)
        out = self._run_generate(inner, caller_ids=kwargs["input_ids"], **mapped)
        return pruned_cache.with_original_prompt(out, kwargs["input_ids"][:, :original], state.prefix_ids.shape[1])

    def _enter_generate(
        self, inner: Any, state: Any, kwargs: dict[str, Any], mapped: dict[str, Any], length: int
    ) -> Any:
        """A new image after a vision-pruned cache: the tokens after the cache pruned as a prompt of their own
        (their own budget), joined behind the cached pruned prefix; the cache's state then stands for the whole
        call, so a later turn continues it (``patches/entering_images.py``)."""
        if self.decoder is not None:
            raise ValueError(entering_images.decoder_stage_decline(self.decoder.method.name))
        cache, ids = kwargs["past_key_values"], kwargs["input_ids"]
        segment = entering_images.segment_kwargs(kwargs, mapped, length)
        start = ids.shape[1] - segment["input_ids"].shape[1]
        segment = self.new_image_pixels(segment, ids, start)
        before = entering_images.cached_images(state, ids[:, :start], self.visual_token_ids())
        self._images_before = before
        try:
            with torch.no_grad():
                call = self.prune_entering(state, segment, entering_images.cached_valid(mapped, length))
        finally:
            self._images_before = None
        joined = entering_images.joined_kwargs(mapped, call.kwargs, length)
        joined["past_key_values"] = cache
        self._vision_record(call, segment)
        try:
            out = self._run_generate(inner, caller_ids=ids, **joined)
        finally:
            self._pending = None
        entering_images.grown_state(cache, ids, joined, call.rope_deltas,
                                    entering_images.images_in_rows(call.record, before))
        return pruned_cache.with_original_prompt(out, ids, joined["input_ids"].shape[1])

    def prune_entering(self, state: Any, segment: dict[str, Any], cached_valid: torch.Tensor) -> PrunedCall:
        """Prune the tokens after a pruned cache (``segment``: a prompt of their own, with the new images' pixels)
        as :meth:`prune` prunes a fresh prompt; ``cached_valid`` ``[B]``: attended tokens already cached per row
        (where the segment's positions start). Families with explicit positions (Qwen M-RoPE) override it."""
        call = self.prune(segment)
        if call is None:
            raise ValueError("the new tokens after the pruned KV cache hold image placeholders but no image to prune")
        return call

    def new_image_pixels(self, segment: dict[str, Any], ids: torch.Tensor, start: int) -> dict[str, Any]:
        """``segment`` with the pixels of the images in ``ids[:, start:]`` only: the caller may pass those, or every
        image of the conversation (a processor run on all of it); the cached images' pixels are dropped. Default: one
        ``pixel_values`` (and ``image_sizes``) entry per image, row-major, told apart by each image's placeholder
        count where the family gives it (images back to back: ``patches/image_runs.py``)."""
        token = int(self.model.config.image_token_id)
        sizes = self.decoder_image_counts(segment).get(token) if segment.get("pixel_values") is not None else None
        return entering_images.per_image_pixels(segment, ids, start, token, sizes)

    def _on_pruned_cache(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A forward on a warm cache (a manual decode loop, a forward continuation): only the new tokens, as with
        any cache; a 2-D mask in original coordinates is mapped onto a vision-pruned cache and, without explicit
        ``position_ids``, the family's continuation positions are set (Qwen: the original M-RoPE positions)."""
        cache = kwargs.get("past_key_values")
        state, length = pruned_cache.state_of(cache), pruned_cache.cached_length(cache)
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if state is None or length == 0 or ids is None:
            return kwargs
        if entering_images.has_pixels(kwargs) and kwargs.get("input_ids") is not None and \
                entering_images.enters_new_images(kwargs["input_ids"], 0, self.visual_token_ids()):
            raise ValueError(entering_images.FORWARD_DECLINE)
        batch, q = ids.shape[:2]
        self.continue_positions(state, batch)
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            return kwargs
        out = dict(kwargs)
        if mask is not None and state.vision_pruned:
            mask = out["attention_mask"] = pruned_cache.decode_mask(state, mask, length, q)
        if kwargs.get("position_ids") is None:
            full = mask if mask is not None else pruned_cache.full_mask(state, batch, length + q, ids.device)
            text = (full.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]  # [B, q]: generate's convention
            positions = self.continuation_positions(state, text)
            if positions is not None:
                out["position_ids"] = positions
        return out

    def continue_positions(self, state: Any, batch: int) -> None:
        """Family hook: restore what positions on the pruned cache need before a call on it (Qwen: rope_deltas)."""

    def continuation_positions(self, state: Any, text: torch.Tensor) -> torch.Tensor | None:
        """Position ids of new tokens on a pruned cache from their text positions ``[B, q]`` (cache coordinates,
        padding-aware); None: the model's own default (LLaVA: a forward prefill without position ids numbered the
        prompt 0.., the decode steps must continue that numbering)."""
        return None

    def _run_generate(self, inner: Any, *args: Any, caller_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The original ``generate`` on the (pruned) arguments; ``caller_ids``: the caller's ``input_ids`` when the
        call runs on other ids (a streamer is then shown the caller's prompt, and absolute lengths count it, as
        without pruning)."""
        if caller_ids is not None:
            if kwargs.get("streamer") is not None:
                kwargs["streamer"] = CallerPromptStreamer(kwargs["streamer"], caller_ids)
            kwargs.update(run_lengths(self.model, kwargs, caller_ids.shape[1] - kwargs["input_ids"].shape[1]))
        self._generating += 1
        if self.decoder is not None:
            self.decoder.frozen += 1  # use_cache=False steps replay this generate's first decoder selection
            self.decoder.selection = None
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.decoder.source_rows = ids.shape[0] if isinstance(ids, torch.Tensor) else None  # before repeats
        try:
            return inner(*args, **kwargs)
        finally:
            self._generating -= 1
            if self.decoder is not None:
                self.decoder.frozen -= 1
                self.decoder.source_rows = None
