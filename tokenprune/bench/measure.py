"""Timing and memory primitives: wall clock on CPU, CUDA events on GPU; peak RSS on CPU, peak allocated on GPU."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Stats:
    """Milliseconds of repeated runs: median, min and max (and every run)."""

    runs: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)


class Timer:
    """Times a callable: ``perf_counter`` around it on CPU; CUDA events (no host sync inside the region) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def interleaved(fns: dict[str, Callable[[], Any]], timer: Timer, warmup: int, repeats: int,
                around: dict[str, tuple[Callable[[], None], Callable[[], None]]] | None = None) -> dict[str, Stats]:
    """Time several callables round-robin (A B A B ...) so slow drift of a shared machine hits them alike.
    ``around[name] = (enter, leave)`` run untimed before and after every run of ``name`` (e.g. switching a model
    between two mechanisms)."""
    around = around or {}

    def once(name: str, fn: Callable[[], Any], timed: bool) -> float | None:
        enter, leave = around.get(name, (None, None))
        if enter is not None:
            enter()
        try:
            return timer(fn) if timed else fn()
        finally:
            if leave is not None:
                leave()

    for _ in range(warmup):
        for name, fn in fns.items():
            once(name, fn, False)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(once(name, fn, True))
    return {name: Stats(tuple(r)) for name, r in runs.items()}


class StepClock:
    """A ``LogitsProcessor`` that stamps the time of every generation step (each call follows one forward).

    ``ttft_ms``: from :meth:`start` to the first step (prefill, pruning included); ``decode_ms``: the median gap
    between later steps (one decode forward each).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list[Any] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.stamps = [self._now()]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(self._now())
        return scores

    def gaps_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block on ``threads`` intra-op CPU threads (``None`` or 0: as set), then restore the caller's
    count: a benchmark called from a library, a notebook or a test must not leave the process's setting changed."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tensor_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensor memory ``fn`` holds on top of what was allocated before it: every allocation and
    free of PyTorch's CPU allocator during the call (recorded by the profiler), summed in order. Deterministic:
    it counts what tensors were given (an ``empty`` buffer in full, touched or not), not the resident set, which
    also holds heap blocks an earlier, larger call freed (:func:`peak_memory`) and the BLAS library's own scratch.
    The profiler slows the call: measure time in another run."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    gc.collect(1)  # young generations: what the last run left behind (a full collection costs ~0.2 s here)
    try:  # hand freed heap pages back to the OS so the next peak is measured from a clean baseline (glibc)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak memory ``fn`` adds on top of what was allocated before it, in bytes.

    GPU: ``torch.cuda.max_memory_allocated`` minus the allocation before. CPU: peak resident set size
    (``VmHWM`` after resetting it) minus the RSS before, after returning freed heap memory to the OS; it
    includes allocator slack, so compare runs of one process, not across machines. ``None`` if unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_memory()
    before = _rss_bytes("VmRSS")
    if before is None or not _reset_rss_peak():
        return None
    fn()
    peak = _rss_bytes("VmHWM")
    return None if peak is None else max(0, peak - before)


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers KV cache (``DynamicCache`` layers, legacy key/value lists or tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    else:
        tensors = [t for layer in cache for t in layer]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
