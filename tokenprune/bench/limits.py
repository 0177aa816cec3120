"""The physical limit of a pruned prefill, for every kind of method: the same model doing the same work on the
kept tokens alone, with no selection code (what ``tokenprune bench`` times as ``prefill_ms_limit``).

* **vision stage** (DivPrune, FasterVLM, ...): the full vision tower (``get_image_features``, output discarded),
  then the LLM on an input that already has only the kept tokens (``k`` placeholders, the kept features handed
  over through ``mm_encoder_outputs``, prepared once outside the timed region). Not in it: the signals the
  adapter probes from the tower, the selection, the compaction.
* **inside the vision encoder** (FlowCut): the tower's own layer loop on the same shrinking schedule, the tokens
  each layer keeps given (recorded from the pruned prefill), the projector on the survivors, then the LLM on the
  ``k``-token input as above. Not in it: the per-layer signal recomputation and the selection.
* **decoder stage** (FastV, PyramidDrop, ...): the same layer schedule (every token up to the first pruned layer,
  the kept ones after it), the kept tokens of every stage given: the decoder loop runs with the method's
  ``select_stage`` replaced by the answers it gave in the pruned prefill (recorded) and without its per-layer
  observers. The loop's own gather, mask and rotary rebuild stay in (a model that natively ran fewer tokens from
  layer K on would need them too); the attention rows, keys or hidden-state similarities a method reads and its
  rule are not in it.
* **two-stage** (ToDRE, VisionDrop, VFlowOpt): the vision-stage limit followed by the decoder-stage one.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.compute_dtype import compute_dtype


def prefill(model: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
    """One prefill as ``generate`` makes it: the whole prompt, a KV cache returned, logits of the last token."""
    return model(**kwargs, use_cache=True, logits_to_keep=1)


def vision_tower(model: torch.nn.Module, inputs: dict[str, Any]) -> Callable[[], Any]:
    """A callable running the model's full vision tower + projector on ``inputs`` (``get_image_features``)."""
    inner = getattr(model, "model", model)
    fn = inner.get_image_features
    names = set(inspect.signature(fn).parameters)
    kwargs = {k: v for k, v in inputs.items() if k in names}
    return lambda: fn(**kwargs)


@dataclass
class Limit:
    """How to time the limit of one pruned setting: ``run`` one limit prefill (returns the model's output);
    ``enter``/``leave`` switch the model to the limit's mechanism and back (untimed, before and after each limit
    run). ``inputs``: the LLM call's inputs; ``tower``: the vision part run before it (None: inside the call)."""

    run: Callable[[], Any]
    enter: Callable[[], None] = lambda: None
    leave: Callable[[], None] = lambda: None
    kind: str = "vision"
    inputs: dict[str, Any] | None = None
    tower: Callable[[], Any] | None = None


@dataclass
class SelectionClock:
    """Wall time spent inside a method's selection entry points (``select_many`` of the vision stage,
    ``encoder_step`` inside the encoder, ``select_stage`` of the decoder stages: its attention rows and rule),
    per prefill (:meth:`lap` after each); installed as instance attributes on the methods and removed by
    :meth:`stop`."""

    seconds: float = 0.0
    laps: list[float] = field(default_factory=list)
    _wrapped: list[tuple[Any, str]] = field(default_factory=list)

    def lap(self) -> None:
        """Close one prefill: its selection seconds go to ``laps``."""
        self.laps.append(self.seconds)
        self.seconds = 0.0

    def start(self, handle: Any) -> None:
        adapter = handle._adapter
        targets = []
        if adapter.method is not None:
            name = "encoder_step" if adapter.method.stage == "vision-encoder" else "select_many"
            targets.append((adapter.method, name))
        if adapter.decoder is not None:
            targets.append((adapter.decoder.method, "select_stage"))
        for obj, name in targets:
            original = getattr(obj, name)

            def timed(*args: Any, _fn: Callable = original, **kwargs: Any) -> Any:
                begin = time.perf_counter()
                try:
                    return _fn(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - begin

            setattr(obj, name, timed)
            self._wrapped.append((obj, name))

    def stop(self) -> None:
        for obj, name in self._wrapped:
            delattr(obj, name)
        self._wrapped.clear()

    @property
    def ms_per_prefill(self) -> float | None:
        """Median over the prefills (a descheduled thread inflates single runs on a shared machine)."""
        return 1e3 * statistics.median(self.laps) if self.laps else None


def _record_decoder(handle: Any, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[tuple[int, int], list]:
    """``(stage, batch row) -> choices`` the decoder-stage method makes in one pruned prefill of ``inputs``."""
    method = handle._adapter.decoder.method
    original, answers = method.select_stage, {}

    def recording(stage: int, row: Any, images: list) -> list:
        answers[(stage, row.batch_index)] = chosen = original(stage, row, images)
        return chosen

    method.select_stage = recording
    try:
        prefill(model, inputs)
    finally:
        del method.select_stage
    return answers


def _record_encoder(handle: Any, model: torch.nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The kept patches of every ``encoder_step`` call (images in order, layers in order) of one pruned prefill."""
    method = handle._adapter.method
    original, steps = method.encoder_step, []

    def recording(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kept, cumulative = original(*args)
        steps.append(kept)
        return kept, cumulative

    method.encoder_step = recording
    try:
        prefill(model, inputs)
    finally:
        del method.encoder_step
    return steps


def encode_given(model: torch.nn.Module, pixel_values: torch.Tensor, feature_layer: int, budgets: list[int],
                 steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The CLIP tower's layer loop of ``patches/clip_encoder_loop.encode_pruned`` with the kept patches of each
    pruning layer given (``steps``, in the order that loop asked for them) and no signals: per image the
    projected features of the survivors ``[k_i, D]``."""
    llava = model.model
    inner = getattr(llava.vision_tower, "vision_model", llava.vision_tower)
    layers, steps, out = inner.encoder.layers, list(steps), []
    dtype = compute_dtype(inner.embeddings)
    with torch.no_grad():
        for b, k in enumerate(budgets):
            hidden = inner.pre_layrnorm(inner.embeddings(pixel_values[b:b + 1].to(dtype)))  # [1, T, Dv]
            for idx in range(feature_layer + 1):
                scoring = feature_layer - idx - 1 >= 0 and hidden.shape[1] > k + 1
                hidden = layers[idx](hidden, None)
                if scoring:
                    kept = steps.pop(0)
                    hidden = torch.cat([hidden[:, :1], hidden[:, 1 + kept]], dim=1)
            out.append(llava.multi_modal_projector(hidden[:, 1:])[0])
    return out


def limit_for(handle: Any, model: torch.nn.Module, inputs: dict[str, Any]) -> Limit:
    """The :class:`Limit` of the pruning ``handle`` installed on ``model`` for the prefill of ``inputs``."""
    adapter = handle._adapter
    vision, loop = adapter.method, adapter.decoder
    llm_inputs, tower = inputs, None
    kind = []
    if vision is not None:
        pruned_call = adapter.prune(dict(inputs))
        llm_inputs = pruned_call.kwargs if pruned_call is not None else inputs
        if pruned_call is None:
            tower = None  # nothing pruned (keep >= n): the stock call is its own limit
        elif vision.stage == "vision-encoder":
            steps = _record_encoder(handle, model, inputs)
            layer = inputs.get("vision_feature_layer", model.config.vision_feature_layer)
            feature_layer = adapter._feature_layer_index(layer)
            budgets = [int(record.kept.numel()) for record in pruned_call.record.images]
            pixels = inputs["pixel_values"]

            def tower() -> Any:
                return encode_given(model, pixels, feature_layer, budgets, steps)
        else:
            tower = vision_tower(model, inputs)
        kind.append("encoder" if vision.stage == "vision-encoder" else "vision")

    def run() -> Any:
        if tower is not None:
            tower()
        return prefill(model, llm_inputs)

    if loop is None:
        return Limit(run, kind="+".join(kind), inputs=llm_inputs, tower=tower)
    answers = _record_decoder(handle, model, inputs)
    method = loop.method

    def replay(stage: int, row: Any, images: list) -> list:
        return answers[(stage, row.batch_index)]

    def enter() -> None:
        loop.uninstall()
        method.select_stage, method.observed_layers = replay, lambda n_layers: ()
        loop.install()

    def leave() -> None:
        loop.uninstall()
        del method.select_stage, method.observed_layers
        loop.install()

    return Limit(run, enter, leave, kind="+".join([*kind, "decoder"]), inputs=llm_inputs, tower=tower)
