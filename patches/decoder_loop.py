"""The decoder loop of decoder-stage methods, for the Llama LM of LLaVA-1.5/LLaVA-NeXT and the Qwen2-VL/Qwen2.5-VL
text model (docs/composition.md).

Installed on the instance as hooks, never on the class: a pre-hook on ``model.model`` (reads the prompt's
``input_ids``), a pre-hook and a hook on ``model.model.language_model`` (start and finish of one LLM call) and a
pre-hook on every decoder layer. HF's own loop still runs each layer exactly once; at the first pruned layer of a
stage the layer's pre-hook gathers the kept slots of the hidden states and hands that layer and the later ones a
rebuilt mask, the matching rotary cos/sin and no ``position_ids`` (gapped ids must not look like packed sequences
to flash-attention). Layers from that point on therefore write a shorter KV cache (HF ``DynamicCache`` keeps one
length per layer); layer 0 always holds the whole prompt, so HF's own position and mask logic, which reads
``get_seq_length()`` of layer 0, stays right for the unpruned layers.

A method that accumulates per-layer signals (TransPrune's token transition variation) lists the layers in
``observed_layers``; only then are forward hooks added on those layers' attention and MLP modules, which add the
method's per-token increment to a ``[B, M]`` sum during a selecting prefill (re-indexed at every pruning).

Three kinds of call:

* ``select`` -- a prefill: scores (``attention_rows``), selection, records; the selection is kept for later calls.
* ``decode`` -- a call on the cache the selection wrote (``generate`` steps or a manual loop): no gathering; for
  each stage the 2-D attention mask's prompt columns are gathered by the stage's index (per-layer padding masks),
  the new tokens appended. KEEP: HF's positions (original numbering) are used as they are; REINDEX: each stage
  shifts them by the prompt tokens removed before it (per row).
* ``replay`` -- a ``use_cache=False`` step of ``generate``: the whole sequence again; the prompt is pruned with the
  stored selection (never re-selected with a newer last token), so cached and uncached generation agree.

Qwen3-VL's DeepStack maps, added after the first LLM layers: when a stage prunes before the last of them, the loop
adds them itself, gathered and merged like the hidden states (``patches/deepstack_carry.py``).

Models whose layers do not share one mask (sliding-window layers, bidirectional image blocks: Gemma 3) get, from the
first pruned layer on, each layer's own mask over the kept slots and each layer's own rotary tables gathered for
them (``patches/decoder_masks.py``); the adapter hands the loop the image blocks of a call (``blocks``).

Around the loop: the call's state, the stored selection and the record (``patches/decoder_call.py``), what a pruned
layer is handed (``patches/decoder_layer_inputs.py``), which image each placeholder belongs to, also for images
side by side (``patches/image_runs.py``), and one stage's selection (``patches/decoder_select.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokenprune.budget import Keep
from tokenprune.methods.decoder_base import DecoderMethod, StagePlan
from tokenprune.patches import pruned_cache
from tokenprune.patches.decoder_call import LayerRecord, LoopCall, PrefillSelection, call_images, call_positions
from tokenprune.patches.decoder_grids import visual_coords
from tokenprune.patches.decoder_layer_inputs import layer_override, read_layers, rotary_for, stage_override
from tokenprune.patches.decoder_masks import call_padding
from tokenprune.patches.decoder_select import apply_mixes, gather, select_stage
from tokenprune.patches.deepstack_carry import take_deepstack
from tokenprune.patches.image_runs import image_numbers
from tokenprune.patches.sparse_ffn import SparseFFN


class DecoderLoop:
    """Runs one :class:`~tokenprune.methods.decoder_base.DecoderMethod` inside a model's language model."""

    def __init__(
        self, model: torch.nn.Module, method: DecoderMethod, keep: Keep, visual_ids: tuple[int, ...],
        on_record: Callable[[LayerRecord], None], force_keep_positions: bool = False,
        plan: tuple[StagePlan, ...] | None = None,
        blocks: Callable[[dict[str, Any]], torch.Tensor | None] | None = None, one_d_rope: bool | None = None,
        image_counts: Callable[[dict[str, Any]], dict[int, list[int]]] | None = None,
    ):
        self.model, self.method, self.keep = model, method, keep
        self.lm = model.model.language_model
        self.layers = self.lm.layers
        self.n_layers = len(self.layers)
        # the method's plan, or the adapter's mapping of it (Qwen3.5: scored at full-attention layers)
        self.plan: tuple[StagePlan, ...] = plan or method.check_layers(self.n_layers, model.config.model_type)
        # Qwen3.5's Gated DeltaNet layers: a 2-D padding mask instead of the attention mask (recurrent_mask)
        self.linear = frozenset(i for i, layer in enumerate(self.layers) if hasattr(layer, "linear_attn"))
        self.visual_ids = visual_ids
        self.reindex = method.positions == "reindex" and not force_keep_positions
        # 1-D RoPE (LLaVA, InternVL, Gemma 3); False: Qwen's M-RoPE (default: the families that force KEEP)
        self.one_d_positions = not force_keep_positions if one_d_rope is None else one_d_rope
        # Per-layer masks (patches/decoder_masks.py): each layer's sliding window, and the adapter's image blocks of a
        # call (from the model's kwargs: Gemma 3's token_type_ids), or None
        self.windows = [getattr(getattr(layer, "self_attn", None), "sliding_window", None) for layer in self.layers]
        self.block_fn = blocks
        # each image's placeholder count from the model's call kwargs (images side by side: patches/image_runs.py)
        self.count_fn = image_counts
        self._model_kwargs: dict[str, Any] | None = None
        self.per_layer = blocks is not None or any(isinstance(w, int) for w in self.windows)
        if self.per_layer and self.reindex:
            raise ValueError(f"{method.name}: re-indexed positions are not supported on a model with per-layer masks")
        self._mask2d: torch.Tensor | None = None  # the model's 2-D padding mask of the call (layer-0 coordinates)
        self._blocks: torch.Tensor | None = None
        self.on_record = on_record
        self.frozen = 0  # > 0 inside generate: a use_cache=False step replays the prefill's selection
        self.source_rows: int | None = None  # the caller's prompt rows of the call in progress (set by the adapter)
        self.selection: PrefillSelection | None = None
        self._ids: torch.Tensor | None = None
        self._call: LoopCall | None = None
        self._hooks: list[Any] = []
        self._ffn = SparseFFN(self) if method.sparse_ffn() else None  # neuron sparsity (patches/sparse_ffn.py)
        self.attention_layers = read_layers(self)

    # --- installation -------------------------------------------------------------------------------------------
    def install(self) -> None:
        self._hooks.append(self.model.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._hooks.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self._hooks.append(self.lm.register_forward_hook(self._lm_post, always_call=True))
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._layer_post(i)))
        for i in self.method.observed_layers(self.n_layers):  # only methods that accumulate per-layer signals
            layer = self.layers[i]
            mixer = layer.linear_attn if i in self.linear else layer.self_attn
            self._hooks.append(mixer.register_forward_hook(self._observe(i, "attn"), with_kwargs=True))
            self._hooks.append(layer.mlp.register_forward_hook(self._observe(i, "mlp"), with_kwargs=True))
        if self._ffn is not None:
            self._ffn.install()

    def uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._ffn is not None:
            self._ffn.uninstall()
        self.selection, self._call, self._ids = None, None, None
        self._mask2d, self._blocks, self._model_kwargs = None, None, None

    # --- call start / end ---------------------------------------------------------------------------------------
    def _model_pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids = ids if isinstance(ids, torch.Tensor) else None
        self._model_kwargs = kwargs
        if self.per_layer:
            mask = kwargs.get("attention_mask")
            self._mask2d = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
            self._blocks = self.block_fn(kwargs) if self.block_fn is not None else None

    def _lm_pre(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ids, self._ids, self._call = self._ids, None, None
        model_mask, self._mask2d = self._mask2d, None
        blocks, self._blocks = self._blocks, None
        model_kwargs, self._model_kwargs = self._model_kwargs, None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return
        batch, q = embeds.shape[:2]
        cache = kwargs.get("past_key_values")
        past = pruned_cache.cached_length(cache)
        state = pruned_cache.state_of(cache) if past > 0 else None
        sel = state.selection if state is not None else None  # a call on a cache: ITS prefill's selection
        mask = kwargs.get("attention_mask")
        if self.per_layer and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            mask = call_padding(model_mask, mask, sel, batch, past, q)
        else:
            mask = pruned_cache.padding_mask_2d(mask, past + q)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            if past == 0 and ids is not None and not self._has_visual(ids):
                return
            if past > 0 and (sel is None or not sel.stages):
                return
            raise ValueError(
                f"decoder-stage pruning ({self.method.name}) needs a 2-D attention mask (or None); got "
                f"{type(mask).__name__} {getattr(mask, 'shape', '')}"
            )
        mask2d = (mask.bool() if mask is not None
                  else torch.ones(batch, past + q, dtype=torch.bool, device=embeds.device))
        pos = call_positions(kwargs.get("position_ids"), batch, q, past, embeds.device) if self.reindex else None
        if past > 0:
            if sel is None or not sel.stages:
                return
            if sel.ids.shape[0] != batch:
                raise ValueError(
                    f"{self.method.name}: this KV cache holds a decoder-stage selection of {sel.ids.shape[0]} prompt "
                    f"row(s); the call has {batch}. Continue a cache with the batch it was filled with (beams: "
                    f"start the beam search from the pruned prefill, not from a cache of another batch)"
                )
            kv_len = pruned_cache.static_length(cache)
            self._call = LoopCall("decode", q, sel.ids.shape[1], mask2d, pos, sel, kv_len=kv_len)
            return
        sel = self.selection
        if ids is None:
            return
        use_cache = kwargs.get("use_cache")
        use_cache = self.lm.config.use_cache if use_cache is None else use_cache
        if (self.frozen and cache is None and not use_cache and sel is not None and sel.ids.shape[0] == batch
                and q >= sel.ids.shape[1]
                and torch.equal(ids[:, : sel.ids.shape[1]], sel.ids)):
            if sel.stages:
                self._call = LoopCall("replay", q, sel.ids.shape[1], mask2d, pos, sel, blocks=blocks)
                return self._take_deepstack(args, kwargs, q)
            return
        if not self._has_visual(ids):
            return
        sel = PrefillSelection(ids.clone(), [], mask=mask2d[:, :q].clone() if self.per_layer else None)
        self.selection = sel
        call = LoopCall("select", q, q, mask2d, pos, sel, image_of=self._image_of(ids, model_kwargs),
                     kv_len=pruned_cache.static_length(cache), source_rows=self.source_rows, blocks=blocks)
        call.coords = visual_coords(self.model.config.model_type, call.image_of, kwargs.get("position_ids"))
        call.index = torch.arange(q, device=ids.device).expand(batch, -1)
        call.valid = mask2d[:, :q].clone()
        call.removed = torch.zeros_like(call.index)
        call.shift = torch.zeros(batch, dtype=torch.long, device=ids.device)
        self._call = call
        return self._take_deepstack(args, kwargs, q)

    def _take_deepstack(self, args: tuple, kwargs: dict, q: int) -> tuple[tuple, dict] | None:
        """Qwen3-VL: the DeepStack maps the call's stages would cut, taken over from HF (see the module doc)."""
        self._call.deepstack = take_deepstack(kwargs, min(p.layer for p in self.plan), q)
        return None if self._call.deepstack is None else (args, kwargs)

    def _lm_post(self, module: Any, args: tuple, output: Any) -> None:
        call, self._call = self._call, None
        if call is None or call.mode != "select" or not call.counts:
            return
        tokens = tuple(int(c.sum()) for c, _ in call.counts)
        visual = tuple(int(v.sum()) for _, v in call.counts)
        self.on_record(LayerRecord(call_images(call), tokens, visual, call.n, int(call.index.shape[1])))

    # --- per layer ----------------------------------------------------------------------------------------------
    def _layer_pre(self, i: int) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            call = self._call
            if call is None:
                return None
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            kwargs["_incoming"] = kwargs.get("position_embeddings")  # this layer's own rotary tables, unpruned
            if call.cos_sin is None:  # first layer: HF's (unpruned) rotary tables and the call's cache
                call.cos_sin = kwargs["position_embeddings"]
                cache = kwargs.get("past_key_values")
                if call.mode == "select":
                    pruned_cache.attach(cache, selection=call.sel)
            if call.override:
                kwargs.update(layer_override(self, i, call.override, kwargs))
            if call.mode == "select":
                h = self._select_at(i, h, kwargs, call)
            else:
                stage = next((s for s in call.sel.stages if s.layer == i), None)
                if stage is not None:
                    if call.mode == "replay":
                        t = call.q - call.n
                        extra = torch.arange(stage.prev_len, stage.prev_len + t, device=h.device)
                        slots = torch.cat([stage.slots, extra.expand(h.shape[0], -1)], dim=1)
                        h = apply_mixes(gather(h, slots), h, stage.mixes)
                        if call.deepstack is not None:
                            call.deepstack.follow(slots, stage.mixes)
                    call.override = stage_override(self, stage, call, h)
                    kwargs.update(layer_override(self, i, call.override, kwargs))
            kwargs.pop("_incoming")
            return (h, *rest), kwargs

        return hook

    def _layer_post(self, i: int) -> Callable:
        """Forward hook of layer ``i``: adds DeepStack level ``i`` when the loop carries the maps."""

        def hook(module: Any, args: tuple, output: Any) -> Any:
            call = self._call
            if call is None or call.deepstack is None or i >= len(call.deepstack.levels):
                return None
            return call.deepstack.add(i, output)

        return hook

    def _observe(self, i: int, part: str) -> Callable:
        """Forward hook of a sublayer (``"attn"``/``"mlp"``) of an observed layer: during a selecting prefill, adds
        the method's per-slot increment (from the sublayer's input and output) to ``call.accum``."""

        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            call = self._call
            if call is None or call.mode != "select":
                return
            x = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            inc = self.method.observe(i, part, x, out, call.valid)
            call.accum = inc if call.accum is None else call.accum + inc

        return hook

    def _select_at(self, i: int, h: torch.Tensor, kwargs: dict, call: LoopCall) -> torch.Tensor:
        if i == 0:
            call.embeds = h
        if any(p.score_layer == i for p in self.plan) or i in self.attention_layers.values():
            cos, sin = kwargs["position_embeddings"]
            call.inputs[i] = (h, cos, sin)
        s = next((j for j, p in enumerate(self.plan) if p.layer == i), None)
        if s is not None:
            stage = select_stage(self, s, h, call)
            if stage is not None:
                call.sel.stages.append(stage)
                h = apply_mixes(gather(h, stage.slots), h, stage.mixes)
                if call.deepstack is not None:
                    call.deepstack.follow(stage.slots, stage.mixes)
                if call.accum is not None:
                    call.accum = gather(call.accum, stage.slots)
                call.index, call.valid, call.removed, call.shift = stage.index, stage.valid, stage.removed, stage.shift
                call.extra = stage.extra
                call.override = stage_override(self, stage, call, h)
                kwargs.update(layer_override(self, i, call.override, kwargs))
                if any(p.score_layer == i < p.layer for p in self.plan):  # a later stage scores what layer i gets
                    call.inputs[i] = (h, *kwargs["position_embeddings"])
        visual = call.valid & (call.image_of.gather(1, call.index) >= 0)
        call.counts.append((call.valid.sum(1), visual.sum(1)))
        return h

    # --- bookkeeping --------------------------------------------------------------------------------------------
    def rotary_for(self, i: int) -> Callable:
        """The language model's rotary module as layer ``i`` uses it (``patches/decoder_layer_inputs.py``)."""
        return rotary_for(self.lm, i)

    def _has_visual(self, ids: torch.Tensor) -> bool:
        return bool(torch.isin(ids, torch.tensor(self.visual_ids, device=ids.device)).any())

    def _image_of(self, ids: torch.Tensor, model_kwargs: dict[str, Any] | None) -> torch.Tensor:
        """Image number of each token within its row, -1 for text (``patches/image_runs.py``)."""
        counts = self.count_fn(model_kwargs) if self.count_fn is not None and model_kwargs is not None else {}
        return image_numbers(ids, self.visual_ids, counts)
