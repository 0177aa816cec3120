"""``tokenprune bench``: prefill, decode, time to first token, peak memory and KV cache, unpruned vs pruned vs the
physical limit, for one model and a sweep of methods x budgets.

* **prefill** = one ``model(**inputs, use_cache=True, logits_to_keep=1)`` call as ``generate`` makes it: vision
  tower + (signals + selection + compaction, when pruned) + LLM prefill.
* **limit** = the same model doing the same work on the kept tokens alone, no selection code
  (:mod:`tokenprune.bench.limits`; vision stage: the full tower, then the LLM on a ``k``-token input prepared
  once outside the timed region; inside the encoder: the tower's shrinking schedule with the kept patches given;
  decoder stage: the same layer schedule with each stage's kept tokens given). The ratio
  ``prefill_ms_pruned / prefill_ms_limit`` is the plugin's overhead; ``selection_ms`` the time spent inside the
  method's selection calls per pruned prefill.
* **ttft** and **decode**: one ``generate(max_new_tokens=T, min_new_tokens=T)`` per repeat with a logits
  processor that stamps every step: the first gap is the time to first token, the median of the later gaps the
  decode time per token (against the pruned KV cache when pruned). ``decode_tokens=0`` skips them.
* **peak memory**: one prefill, CUDA peak allocation or peak RSS above the baseline (see ``measure``).
* **KV bytes**: measured on the cache a prefill returns, next to ``flops.kv_bytes`` for the padded prompt.

Pruned and limit runs alternate (A B A B ...) after ``warmup`` rounds so that a shared machine's drift hits both.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.api import disable_pruning, enable_pruning
from tokenprune.bench.limits import SelectionClock, limit_for, prefill, vision_tower  # noqa: F401 (re-exported)
from tokenprune.bench.measure import StepClock, Timer, cache_bytes, interleaved, peak_memory
from tokenprune.bench.models import BenchModel
from tokenprune.budget import Keep
from tokenprune.budget.flops import kv_bytes, prefill_flops
from tokenprune.compute_dtype import compute_dtype


@dataclass(frozen=True)
class Budget:
    """One point of a sweep: a method with ``keep`` or a ``flops`` target."""

    method: str
    keep: Keep | None = None
    flops: float | None = None
    options: tuple[tuple[str, Any], ...] = ()  # the method's hyper-parameters, where not its defaults

    @property
    def label(self) -> str:
        return f"keep={self.keep}" if self.flops is None else f"flops={self.flops}"


def generation_steps(model: torch.nn.Module, inputs: dict[str, Any], tokens: int, device: torch.device) -> list[float]:
    """Milliseconds from the call to the first token, then between consecutive tokens, of one greedy generate."""
    from transformers import LogitsProcessorList

    clock = StepClock(device)
    clock.start()
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                   logits_processor=LogitsProcessorList([clock]))
    return clock.gaps_ms()


def _generation(model, inputs, tokens, device, warmup, repeats) -> tuple[list[float], list[float]]:
    if tokens < 1:
        return [], []  # decode_tokens=0: no generation measured
    for _ in range(warmup):
        generation_steps(model, inputs, tokens, device)
    ttft, decode = [], []
    for _ in range(repeats):
        gaps = generation_steps(model, inputs, tokens, device)
        ttft.append(gaps[0])
        if len(gaps) > 1:
            decode.append(statistics.median(gaps[1:]))
    return ttft, decode


def _stats(prefix: str, runs: list[float] | tuple[float, ...] | None) -> dict[str, float | None]:
    if not runs:
        return {prefix: None, f"{prefix}_min": None, f"{prefix}_max": None}
    return {prefix: statistics.median(runs), f"{prefix}_min": min(runs), f"{prefix}_max": max(runs)}


def _kv_and_length(model, kwargs) -> tuple[int, int]:
    out = prefill(model, kwargs)
    return cache_bytes(out.past_key_values), int(kwargs["input_ids"].shape[1])


def measure_unpruned(bm: BenchModel, repeats: int, warmup: int, decode_tokens: int) -> dict[str, Any]:
    model, inputs, device = bm.model, bm.inputs, bm.device
    timer = Timer(device)
    stats = interleaved({"unpruned": lambda: prefill(model, inputs)}, timer, warmup, repeats)["unpruned"]
    ttft, decode = _generation(model, inputs, decode_tokens, device, min(warmup, 1), repeats)
    kv, length = _kv_and_length(model, inputs)
    image_id = getattr(model.config, "image_token_id", None)
    ids = inputs["input_ids"]
    rows = ids.shape[0]
    return {
        "visual_tokens": int((ids == image_id).sum()) if image_id is not None else None,
        "seq_len_unpruned": length,
        "tflops_unpruned": rows * prefill_flops(bm.shape, length) / 1e12,
        **_stats("prefill_ms_unpruned", stats.runs), **_stats("ttft_ms_unpruned", ttft),
        **_stats("decode_ms_unpruned", decode),
        "peak_mem_unpruned": peak_memory(lambda: prefill(model, inputs), device),
        "kv_bytes_unpruned": kv,
        "kv_bytes_analytic_unpruned": rows * kv_bytes(bm.shape, length, _dtype_bytes(model)),
    }


def measure_pruned(bm: BenchModel, budget: Budget, repeats: int, warmup: int, decode_tokens: int, *,
                   memory: bool = True) -> dict[str, Any]:
    """One budget: the pruned prefill against its limit (:mod:`tokenprune.bench.limits`, every kind of method),
    the time inside the method's selection, generation, and (``memory``) peak memory and KV bytes."""
    model, inputs, device = bm.model, bm.inputs, bm.device
    timer = Timer(device)
    handle = enable_pruning(model, budget.method, keep=budget.keep, flops=budget.flops, **dict(budget.options))
    try:
        prefill(model, inputs)
        record = handle.last
        limit = limit_for(handle, model, inputs)
        clock = SelectionClock()

        def pruned() -> None:
            prefill(model, inputs)
            clock.lap()

        stats = interleaved({"pruned": pruned, "limit": limit.run}, timer, warmup, repeats,
                            around={"pruned": (lambda: clock.start(handle), clock.stop),
                                    "limit": (limit.enter, limit.leave)})
        ttft, decode = _generation(model, inputs, decode_tokens, device, min(warmup, 1), repeats)
        rows = inputs["input_ids"].shape[0]
        row = {
            "method": budget.method, "keep": budget.keep, "flops": budget.flops, "stage": handle.method.stage,
            "options": dict(budget.options) or None,
            "limit_kind": limit.kind,
            "visual_tokens": record.n_visual, "kept_tokens": record.n_kept, "seq_len_pruned": record.seq_len_after,
            "tflops_pruned": record.tflops_pruned,
            **_stats("prefill_ms_pruned", stats["pruned"].runs),
            **_stats("prefill_ms_limit", stats["limit"].runs),
            "selection_ms": clock.ms_per_prefill,  # median over the pruned runs
            **_stats("ttft_ms_pruned", ttft), **_stats("decode_ms_pruned", decode),
        }
        if memory:
            kv, _ = _kv_and_length(model, inputs)
            row.update({
                "peak_mem_pruned": peak_memory(lambda: prefill(model, inputs), device),
                "peak_mem_limit": _around(limit, lambda: peak_memory(limit.run, device)),
                "kv_bytes_pruned": kv,
                "kv_bytes_analytic_pruned": rows * kv_bytes(bm.shape, record.seq_len_after, _dtype_bytes(model)),
            })
    finally:
        disable_pruning(model)
    return row


def _around(limit: Any, fn: Any) -> Any:
    limit.enter()
    try:
        return fn()
    finally:
        limit.leave()


def run(bm: BenchModel, budgets: Iterable[Budget], *, repeats: int = 5, warmup: int = 1, decode_tokens: int = 8,
        progress: bool | None = None) -> list[dict[str, Any]]:
    """Measure the unpruned model once, then every budget; one flat dict per budget (see ``report.COLUMNS``)."""
    from tqdm.auto import tqdm

    if repeats < 1 or warmup < 0 or decode_tokens < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0, decode_tokens >= 0; got {repeats}, {warmup}, "
                         f"{decode_tokens}")
    budgets = list(budgets)
    context = {
        "model": bm.description, "device": str(bm.device), "dtype": str(compute_dtype(bm.model)),
        "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup, "decode_tokens": decode_tokens,
    }
    bar = tqdm(total=len(budgets) + 1, desc="bench", unit="setting", disable=None if progress is None else not progress)
    rows = []
    with torch.inference_mode():
        bar.set_postfix_str("unpruned")
        base = measure_unpruned(bm, repeats, warmup, decode_tokens)
        bar.update()
        for budget in budgets:
            bar.set_postfix_str(f"{budget.method} {budget.label}")
            row = {**base, **measure_pruned(bm, budget, repeats, warmup, decode_tokens)}
            row["overhead"] = _ratio(row["prefill_ms_pruned"], row["prefill_ms_limit"])
            row["speedup"] = _ratio(row["prefill_ms_unpruned"], row["prefill_ms_pruned"])
            rows.append({**row, **context})
            bar.update()
    bar.close()
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _dtype_bytes(model: torch.nn.Module) -> int:
    return compute_dtype(model).itemsize  # the KV cache holds activations
