"""Cost of a decoder-stage selection inside the prefill (``tokenprune bench-decoder``).

Decoder-stage methods (FastV, PyramidDrop, ...) score visual tokens by attention rows that the decoder loop
recomputes for just the rows a method asks for (``patches/attention_rows.py``), so the prefill runs on sdpa (or
flash) and never asks the kernel for weights. For every registered decoder-stage method this measures, on one
model and prompt, after warm-up (median, min, max of repeats):

* **prefill_ms_pruned**: one pruned prefill (``model(**inputs, use_cache=True, logits_to_keep=1)``) on the
  model's attention implementation (sdpa by default); ``prefill_ms_unpruned`` the same call without pruning.
* **rows_ms**: wall time spent inside the attention-row recomputation (``attention_rows``) during that prefill,
  and **select_ms**: inside the whole selection step of every stage (``select_stage``: rows, the method's rule,
  the new layout). Both are timed from outside by wrapping the two functions of ``tokenprune.patches`` for the
  duration of the run; ``rows_fraction`` / ``select_fraction`` are the per-run ratios to the pruned prefill.
* **the eager alternative**: computing the same scores the way the official code does, by running each scoring
  layer in eager mode with ``output_attentions=True`` (the full ``[H, N, N]`` probabilities, from which the
  method's rows are read). On the very input the scoring layer received in the pruned prefill (captured), the
  layer is timed once with sdpa (``score_layers_ms_sdpa``) and once eager with weights
  (``score_layers_ms_eager``). ``eager_extra_ms`` is what the prefill would pay instead of ``rows_ms``
  (``eager_extra_fraction`` of the pruned prefill), summed over stages: eager - sdpa when the scoring layer is
  before the pruned one (FastV: layer K-1 runs on every token anyway, eager instead of sdpa); the whole eager
  layer when a stage scores the pruned layer's own input (PyramidDrop: that layer then runs on the kept tokens
  only, so its full-length scores need one extra run of it).
* **agreement**: the method's selection replayed on the eager probabilities (``select_stage`` with a row whose
  ``attention(rows)`` reads the eager map; everything else from the real row) against the selection it made on
  the recomputed rows: ``kept_agreement`` (smallest share of common kept tokens over stages and images),
  ``selection_identical`` and ``scores_max_abs_diff`` (largest difference of any recomputed probability from the
  eager one; eager weights are rounded to the model's dtype, recomputed rows are fp32).

Methods whose rule reads no attention rows (``rows_calls`` 0) have no eager alternative (``None``); a method that
cannot run on the model (e.g. its layers do not fit a reduced depth) gets a row with ``skipped`` and the reason.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenprune.api import disable_pruning, enable_pruning
from tokenprune.bench.measure import Timer, interleaved
from tokenprune.bench.models import BenchModel
from tokenprune.bench.run import prefill
from tokenprune.budget import Keep
from tokenprune.compute_dtype import compute_dtype
from tokenprune.methods import METHODS


def decoder_methods() -> list[str]:
    """Every registered method with ``stage == "decoder"``, sorted."""
    return sorted(name for name, cls in METHODS.items() if getattr(cls, "stage", None) == "decoder")


@dataclass
class _RowsCall:
    args: tuple  # (layer, hidden [1, N, D], rows [1, R], cos, sin, valid [1, N])
    out: torch.Tensor  # [1, H, R, N] fp32


@dataclass
class _StageCall:
    stage: int
    row: Any
    images: list[tuple[torch.Tensor, int]]
    chosen: list[torch.Tensor]
    rows_calls: list[_RowsCall] = field(default_factory=list)


class Probe:
    """Times (and, with ``capture``, records) ``attention_rows`` and ``select_stage`` of the decoder loop by
    wrapping the module attributes the loop looks them up from (``tokenprune.patches.decoder_select`` and
    ``tokenprune.patches.decoder_loop``)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.capture = False
        self.reset()

    def reset(self) -> None:
        self.rows_s = self.select_s = 0.0
        self.rows_calls = 0
        self.stages: list[_StageCall] = []
        self._current: list[_RowsCall] | None = None

    @contextmanager
    def installed(self) -> Iterator[Probe]:
        import tokenprune.patches.decoder_loop as decoder
        import tokenprune.patches.decoder_select as decoder_select

        for module, name in ((decoder_select, "attention_rows"), (decoder, "select_stage")):
            if not callable(getattr(module, name, None)):
                raise RuntimeError(f"{module.__name__}.{name} is gone: the decoder mechanism changed; update "
                                   "tokenprune/bench/decoder_cost.py (it times the function the loop calls)")
        rows_fn, select_fn = decoder_select.attention_rows, decoder.select_stage

        def timed_rows(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.sync()
            begin = time.perf_counter()
            out = rows_fn(*args, **kwargs)
            self.sync()
            self.rows_s += time.perf_counter() - begin
            self.rows_calls += 1
            if self.capture and self._current is not None:
                self._current.append(_RowsCall(args, out))
            return out

        def timed_select(loop: Any, s: int, h: torch.Tensor, call: Any) -> Any:
            method = loop.method
            if self.capture:
                self._current = []
                original = method.select_stage

                def recording(stage: int, row: Any, images: list) -> list[torch.Tensor]:
                    chosen = original(stage, row, images)
                    self.stages.append(_StageCall(stage, row, list(images), list(chosen), self._current))
                    return chosen

                method.select_stage = recording  # instance attribute, removed below
            self.sync()
            begin = time.perf_counter()
            try:
                return select_fn(loop, s, h, call)
            finally:
                self.sync()
                self.select_s += time.perf_counter() - begin
                if self.capture:
                    del method.select_stage
                    self._current = None

        decoder_select.attention_rows, decoder.select_stage = timed_rows, timed_select
        try:
            yield self
        finally:
            decoder_select.attention_rows, decoder.select_stage = rows_fn, select_fn


def _kept(choice: Any) -> torch.Tensor:
    """Kept slot indices of one image's choice (a tensor, or a ``Recycled``'s ``kept``)."""
    from tokenprune.methods.decoder_base import Recycled

    return choice.kept if isinstance(choice, Recycled) else choice


class _EagerRow:
    """A decoder row whose ``attention(rows)`` reads the eager probabilities ``[H, N, N]``; the rest is the real
    row's."""

    def __init__(self, row: Any, probs: torch.Tensor):
        self._row, self._probs = row, probs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._row, name)

    def attention(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.tensor([self._row.last]) if rows is None else rows.reshape(-1)
        return self._probs[:, rows.to(self._probs.device)].float()


def _layer_call(layer: torch.nn.Module, args: tuple, impl: str) -> tuple[Callable[[], Any], dict[str, Any]]:
    """``layer`` run on the captured scoring input with ``impl`` attention; returns the call and a dict that the
    call fills with ``probs`` (``[H, N, N]``, eager only, read from ``self_attn``'s output)."""
    from tokenprune.patches.decoder_masks import build_mask

    _, hidden, _, cos, sin, valid = args
    n = hidden.shape[1]
    mask = build_mask(impl, valid.bool(), n, hidden.dtype)
    config = layer.self_attn.config
    got: dict[str, Any] = {}

    def keep_weights(module: Any, inputs: Any, output: Any) -> None:
        if impl == "eager":
            got["probs"] = output[1][0]

    def call() -> Any:
        previous = config._attn_implementation
        config._attn_implementation = impl
        hook = layer.self_attn.register_forward_hook(keep_weights)
        try:
            return layer(hidden, attention_mask=mask, position_ids=None, position_embeddings=(cos, sin),
                         output_attentions=impl == "eager")
        finally:
            hook.remove()
            config._attn_implementation = previous

    return call, got


def _stats(prefix: str, runs: list[float]) -> dict[str, float]:
    return {prefix: statistics.median(runs), f"{prefix}_min": min(runs), f"{prefix}_max": max(runs)}


def measure_method(bm: BenchModel, name: str, keep: Keep, repeats: int, warmup: int,
                   unpruned: list[float] | None) -> dict[str, Any]:
    model, inputs, device = bm.model, bm.inputs, bm.device
    timer = Timer(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    probe = Probe(sync)
    handle = enable_pruning(model, name, keep=keep)
    try:
        with probe.installed():
            for _ in range(warmup):
                prefill(model, inputs)
            prefill_ms, rows_ms, select_ms, fractions, select_fractions = [], [], [], [], []
            for _ in range(repeats):
                probe.reset()
                ms = timer(lambda: prefill(model, inputs))
                prefill_ms.append(ms)
                rows_ms.append(probe.rows_s * 1e3)
                select_ms.append(probe.select_s * 1e3)
                fractions.append(probe.rows_s * 1e3 / ms)
                select_fractions.append(probe.select_s * 1e3 / ms)
            calls = probe.rows_calls
            probe.reset()
            probe.capture = True  # one more (untimed) prefill that records what each stage saw and chose
            prefill(model, inputs)
            probe.capture = False
            stages = probe.stages
        record = handle.last
        method = handle.method if not isinstance(handle.method, tuple) else handle.method[-1]
        plan = method.check_layers(len(model.model.language_model.layers))
        row: dict[str, Any] = {
            "method": name, "keep": keep, "stages": [[p.layer, p.score_layer] for p in plan],
            "visual_tokens": record.n_visual, "kept_tokens": record.n_kept,
            "visual_per_layer": list(record.visual_per_layer or ()),
            **_stats("prefill_ms_pruned", prefill_ms), **_stats("rows_ms", rows_ms),
            **_stats("select_ms", select_ms), **_stats("rows_fraction", fractions),
            **_stats("select_fraction", select_fractions), "rows_calls": calls,
        }
        if unpruned:
            row["prefill_ms_unpruned"] = statistics.median(unpruned)
        row.update(_eager_alternative(stages, method, plan, timer, repeats, warmup, row["prefill_ms_pruned"],
                                      row["rows_ms"]))
    finally:
        disable_pruning(model)
    return row


def _eager_alternative(stages: list[_StageCall], method: Any, plan: tuple, timer: Timer, repeats: int, warmup: int,
                       prefill_ms: float, rows_ms: float) -> dict[str, Any]:
    none = dict.fromkeys(("score_layers_ms_sdpa", "score_layers_ms_eager", "eager_extra_ms", "eager_extra_fraction",
                          "rows_vs_eager", "rows_fraction_of_score_layers", "scores_max_abs_diff", "kept_agreement",
                          "selection_identical"))
    scored = [s for s in stages if s.rows_calls]
    if not scored:
        return none
    sdpa_ms = eager_ms = 0.0
    max_diff, agreement, identical = 0.0, 1.0, True
    extra = 0.0
    for stage in scored:
        args = stage.rows_calls[0].args
        layer = args[0]
        sdpa, _ = _layer_call(layer, args, "sdpa")
        eager, got = _layer_call(layer, args, "eager")
        stats = interleaved({"sdpa": sdpa, "eager": eager}, timer, max(warmup, 1), repeats)
        sdpa_ms += stats["sdpa"].median
        eager_ms += stats["eager"].median
        own_input = plan[stage.stage].score_layer == plan[stage.stage].layer  # scored on the pruned layer's input
        extra += stats["eager"].median - (0.0 if own_input else stats["sdpa"].median)
        probs = got["probs"]  # [H, N, N] from the last eager run
        for rc in stage.rows_calls:
            rows = rc.args[2][0]
            max_diff = max(max_diff, float((probs[:, rows].float() - rc.out[0]).abs().max()))
        replay = method.select_stage(stage.stage, _EagerRow(stage.row, probs), stage.images)
        for ours, theirs, (_, k) in zip(stage.chosen, replay, stage.images, strict=True):
            ours, theirs = _kept(ours), _kept(theirs)  # merged/recycled tokens: compare the kept originals
            common = len(set(ours.tolist()) & set(theirs.tolist()))
            agreement = min(agreement, common / k if k else 1.0)
            identical = identical and torch.equal(ours.cpu(), theirs.cpu())
    return {
        "score_layers_ms_sdpa": sdpa_ms, "score_layers_ms_eager": eager_ms, "eager_extra_ms": extra,
        "eager_extra_fraction": extra / prefill_ms, "rows_vs_eager": rows_ms / extra if extra > 0 else None,
        "rows_fraction_of_score_layers": rows_ms / sdpa_ms, "scores_max_abs_diff": max_diff,
        "kept_agreement": agreement, "selection_identical": identical,
    }


def run(bm: BenchModel, methods: list[str] | None = None, keep: Keep = 64, *, repeats: int = 5, warmup: int = 1,
        unpruned: bool = True, progress: bool | None = None) -> list[dict[str, Any]]:
    """One row per decoder-stage method (default: every registered one) at ``keep``; see the module docstring."""
    from tqdm.auto import tqdm

    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0; got {repeats}, {warmup}")
    names = methods or decoder_methods()
    wrong = [m for m in names if m not in METHODS or METHODS[m].stage != "decoder"]
    if wrong:
        raise ValueError(f"not decoder-stage methods: {wrong}; decoder-stage methods: {', '.join(decoder_methods())}")
    context = {
        "model": bm.description, "device": str(bm.device), "dtype": str(compute_dtype(bm.model)),
        "attn_implementation": bm.model.config._attn_implementation, "threads": torch.get_num_threads(),
        "repeats": repeats, "warmup": warmup,
    }
    disable = None if progress is None else not progress
    bar = tqdm(total=len(names) + int(unpruned), desc="decoder cost", disable=disable)
    rows = []
    with torch.inference_mode():
        base = None
        if unpruned:
            bar.set_postfix_str("unpruned")
            base = list(interleaved({"u": lambda: prefill(bm.model, bm.inputs)}, Timer(bm.device), warmup,
                                    repeats)["u"].runs)
            bar.update()
        for name in names:
            bar.set_postfix_str(name)
            try:
                rows.append({**measure_method(bm, name, keep, repeats, warmup, base), **context})
            except (ValueError, NotImplementedError) as err:  # e.g. a plan that does not fit a reduced depth
                rows.append({"method": name, "keep": keep, "skipped": f"{type(err).__name__}: {err}", **context})
            bar.update()
    bar.close()
    return rows


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.1f} ({row[key + '_min']:.1f}-{row[key + '_max']:.1f})"


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per method, and a footer with the model and the definitions."""
    if not rows:
        return "(no results)"
    header = ("method", "stages (layer, scored at)", "kept", "pruned prefill ms", "recompute ms",
              "recompute % of prefill (min-max)", "selection step %", "eager score layers ms (sdpa)",
              "eager extra % of prefill", "eager / recompute", "same selection", "max |Δp|")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | skipped: {r['skipped'][:150]} |" + " |" * (len(header) - 2))
            continue
        ratio = "-" if r.get("rows_vs_eager") in (None, 0) else f"{1 / r['rows_vs_eager']:.1f}x"
        eager = "-" if r["score_layers_ms_eager"] is None else (
            f"{r['score_layers_ms_eager']:.0f} ({r['score_layers_ms_sdpa']:.0f})")
        same = "-" if r["selection_identical"] is None else (
            "yes" if r["selection_identical"] else f"no ({100 * r['kept_agreement']:.1f}% common)")
        diff = "-" if r["scores_max_abs_diff"] is None else f"{r['scores_max_abs_diff']:.1e}"
        cells = (
            r["method"], " ".join(f"({a}, {b})" for a, b in r["stages"]), f"{r['kept_tokens']}/{r['visual_tokens']}",
            _ms(r, "prefill_ms_pruned"), _ms(r, "rows_ms"),
            f"{_pct(r['rows_fraction'])} ({_pct(r['rows_fraction_min'])}-{_pct(r['rows_fraction_max'])})",
            _pct(r["select_fraction"]), eager, _pct(r["eager_extra_fraction"], 1), ratio, same, diff,
        )
        lines.append("| " + " | ".join(cells) + " |")
    first = next((r for r in rows if "skipped" not in r), rows[0])
    unpruned = (f"; unpruned prefill {first['prefill_ms_unpruned']:.0f} ms"
                if first.get("prefill_ms_unpruned") is not None else "")
    lines += ["", f"{first['model']}; {first['threads']} threads; median (min-max) of {first['repeats']} repeats "
              f"after {first['warmup']} warm-up{unpruned}. recompute = time inside attention_rows during the pruned "
              "prefill; selection step = inside select_stage (rows + rule + layout); eager = each scoring layer "
              "run on its captured input with eager attention and output_attentions, next to the same layer on "
              "sdpa; eager extra = the cost of getting the scores that way instead: eager - sdpa for a layer before "
              "the pruned one, the whole eager layer for a stage scored on the pruned layer's own input."]
    return "\n".join(lines)
