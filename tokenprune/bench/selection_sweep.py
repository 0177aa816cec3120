"""Scaling sweep of the selection cost: each vision-stage selector's time and peak extra memory at growing token
counts, next to one 7B decoder layer's prefill over the same tokens (measured in the same run) and, where it fits,
the naive reference (same indices asserted on one thread, recorded on several).

Shapes (``SHAPES``): LLaVA-1.5 (576), 2 x 576, LLaVA-NeXT at its largest (2,880), LLaVA-OneVision AnyRes-max-9
(7,290) with LLaVA-7B's D = 4,096 and layer, and a 16-frame Qwen2-VL video (448 x 448 frames: 8 temporal groups
x 256 merged tokens = 2,048) with Qwen2-7B's D = 3,584 and layer. ``k = N / 9`` (64 of 576). Signals are the
synthetic ones of :mod:`tokenprune.bench.selection` (i.i.d. Gaussian features), plus one shape of 2,880 clustered
features (:func:`clustered_features`: near twins, as real patch features have). Its tables, plot and verdict:
:mod:`tokenprune.bench.selection_report`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokenprune.bench.measure import Timer, peak_memory, tensor_peak_bytes, torch_threads
from tokenprune.bench.references import REFERENCES
from tokenprune.bench.selection import decoder_layer, synthetic_context
from tokenprune.methods import FEATURES, METHODS


@dataclass(frozen=True)
class Shape:
    label: str
    n: int
    d: int
    layer: str  # key of LAYERS
    note: str = ""  # shown next to N in the tables; shapes with a note are not on the plot's N axis
    clustered: bool = False  # features around N / 36 centres (image regions) instead of i.i.d. Gaussian


SHAPES = (
    Shape("576", 576, 4096, "llama-7b"), Shape("1152", 1152, 4096, "llama-7b"),
    Shape("qwen-video-16f", 2048, 3584, "qwen2-7b", note="video"), Shape("2880", 2880, 4096, "llama-7b"),
    Shape("2880-clustered", 2880, 4096, "llama-7b", note="clustered", clustered=True),
    Shape("7290", 7290, 4096, "llama-7b"),
)


def clustered_features(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[N, D]`` tokens around ``N / 36`` random centres (cosine about 0.8 to their centre), a stand-in for the
    regions of an image: every token has near twins, as real patch features do, where i.i.d. Gaussian tokens are
    all about equally far apart (the worst case of DivPrune's first pick)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 36), d, generator=g)
    members = torch.randint(0, centres.shape[0], (n,), generator=g)
    return (centres[members] + 0.5 * torch.randn(n, d, generator=g)).to(dtype)


def _context(method: Any, shape: Shape, k: int, dtype: torch.dtype) -> Any:
    ctx = synthetic_context(method, shape.n, shape.d, k, dtype)
    if shape.clustered:
        for request in method.requests():
            if request.name == FEATURES:
                ctx.signals[request.key] = clustered_features(shape.n, shape.d, dtype)
    return ctx


# hidden, intermediate, attention heads, key-value heads
LAYERS = {"llama-7b": (4096, 11008, 32, 32), "qwen2-7b": (3584, 18944, 28, 4)}
SELECTORS = ("divprune", "kcenter", "cdpruner", "mmtok", "holov", "visiondrop", "visionzip", "recoverable")


def _measure(fn: Callable[[], Any], timer: Timer, warmup: int, repeats: int) -> tuple[list[float], int | None, Any]:
    """Milliseconds of ``repeats`` runs after ``warmup`` runs and one untimed run that reads the peak extra
    resident memory (bytes; it starts from a trimmed heap, so it pays the page faults the timed runs do not), and
    that run's result."""
    for _ in range(warmup):
        fn()
    result: list[Any] = []
    peak = peak_memory(lambda: result.append(fn()), torch.device("cpu"))
    return [timer(fn) for _ in range(repeats)], peak, result[0]


def _kept(out: Any) -> torch.Tensor:
    return (out.kept if hasattr(out, "kept") else out).cpu()


def sweep(
    dtype: str, threads: int, shapes: tuple[Shape, ...] = SHAPES, methods: tuple[str, ...] = SELECTORS, *,
    reference_max_n: int = 1152, before: dict[str, Callable[[Any], torch.Tensor]] | None = None,
    before_max_n: int = 2880, layer: bool = True, repeats: Callable[[int], int] = lambda n: 3 if n <= 2880 else 1,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """One row per shape x method (and one ``"layer"`` row per shape): ``ms`` (median), ``runs``, ``peak_bytes``,
    ``layer_ms``, ``fraction_of_layer``; ``reference_ms`` / ``reference_speedup`` where the naive reference ran
    (``n <= reference_max_n``; its indices must equal the selector's on one thread, on several the row records
    ``same_as_reference`` and ``shared_with_reference``), ``before_ms`` / ``before_speedup`` for the
    ``before`` implementations (``name -> ctx -> kept``, e.g. the previous release's) up to ``before_max_n``.
    The layer row also records the floor of an exact greedy: ``floor_fp32_ms``, one fp32 ``[k, D] x [D, N]``
    product (the ``k`` similarity rows every greedy selector reads, computed at the best rate the CPU has), and
    ``floor_dtype_ms``, the same product in ``dtype`` (what it would cost if picks could use that precision).
    Runs on ``threads`` CPU threads and restores the caller's count."""
    with torch_threads(threads):
        return _sweep(dtype, shapes, methods, reference_max_n=reference_max_n, before=before,
                      before_max_n=before_max_n, layer=layer, repeats=repeats, log=log, threads=threads)


def _floor(n: int, d: int, k: int, dtype: torch.dtype, timer: Timer) -> float:
    """Milliseconds (best of 3) of one ``[k, D] x [D, N]`` product of unit rows in ``dtype``."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    x = (x / x.norm(dim=-1, keepdim=True)).to(dtype)
    rows = x[:k].clone()
    timer(lambda: rows @ x.T)  # warm-up
    return min(timer(lambda: rows @ x.T) for _ in range(3))


def _sweep(
    dtype: str, shapes: tuple[Shape, ...], methods: tuple[str, ...], *, reference_max_n: int,
    before: dict[str, Callable[[Any], torch.Tensor]] | None, before_max_n: int, layer: bool,
    repeats: Callable[[int], int], log: Callable[[str], None], threads: int,
) -> list[dict[str, Any]]:
    torch_dtype = getattr(torch, dtype)
    timer = Timer(torch.device("cpu"))
    rows: list[dict[str, Any]] = []
    layers: dict[str, Callable[[int], Callable[[], Any]]] = {}
    for shape in shapes:
        n, d, k = shape.n, shape.d, max(1, round(shape.n / 9))
        base = {"shape": shape.label, "note": shape.note, "n": n, "d": d, "k": k, "dtype": dtype, "threads": threads,
                "memory_budget_bytes": 2 * n * d * 4}
        layer_ms = None
        if layer:
            if shape.layer not in layers:
                layers[shape.layer] = decoder_layer(*LAYERS[shape.layer], torch_dtype)
            runs, peak, _ = _measure(layers[shape.layer](n), timer, 1, repeats(n))  # the median below
            layer_ms = statistics.median(runs)
            floor_fp32, floor_dtype = _floor(n, d, k, torch.float32, timer), _floor(n, d, k, torch_dtype, timer)
            rows.append({**base, "method": "layer", "layer": shape.layer, "ms": layer_ms, "runs": runs,
                         "peak_bytes": peak, "floor_fp32_ms": floor_fp32, "floor_dtype_ms": floor_dtype})
            log(f"{dtype} x{threads} {shape.label}: one {shape.layer} layer {layer_ms:.0f} ms; k rows in one product: "
                f"fp32 {floor_fp32:.1f} ms, {dtype} {floor_dtype:.1f} ms")
        for name in methods:
            method = METHODS[name]()
            ctx = _context(method, shape, k, torch_dtype)
            runs, peak, out = _measure(lambda m=method, c=ctx: m.select(c), timer, 1 if n <= 2880 else 0, repeats(n))
            row = {**base, "method": name, "ms": statistics.median(runs), "runs": runs, "peak_bytes": peak}
            if layer_ms:
                row.update(layer_ms=layer_ms, fraction_of_layer=row["ms"] / layer_ms)
            kept = _kept(out)
            if name in REFERENCES and n <= reference_max_n:
                ref_runs, ref_peak, ref = _measure(lambda r=REFERENCES[name], c=ctx: r(c), timer, 0, 1)
                same = torch.equal(ref.cpu(), kept)
                if not same and threads == 1:  # one thread: the rows round as the full matrix, bit for bit
                    raise AssertionError(f"{name}: the naive reference disagrees at N={n}, k={k}, {dtype}")
                # several threads: a block's product rounds its last bit unlike the full matrix's, so tokens
                # whose scores differ by less than that may swap (recorded, with how many indices both keep)
                row.update(reference_ms=ref_runs[0], reference_peak_bytes=ref_peak,
                           reference_speedup=ref_runs[0] / row["ms"], same_as_reference=same,
                           shared_with_reference=len(set(ref.cpu().tolist()) & set(kept.tolist())))
            if before and name in before and n <= before_max_n:
                old_runs, old_peak, old = _measure(lambda b=before[name], c=ctx: b(c), timer, 0, 1)
                row.update(before_ms=old_runs[0], before_peak_bytes=old_peak, before_speedup=old_runs[0] / row["ms"],
                           same_as_before=bool(torch.equal(old.cpu(), kept)))
            rows.append(row)
            log(f"{dtype} x{threads} {shape.label}: {name} {row['ms']:.1f} ms, RSS peak {(peak or 0) / 2**20:.0f} MiB"
                + (f", naive {row['reference_ms']:.0f} ms" if "reference_ms" in row else "")
                + (f", before {row['before_ms']:.0f} ms" if "before_ms" in row else ""))
    return rows


def memory_pass(rows: list[dict[str, Any]], shapes: tuple[Shape, ...] = SHAPES,
                before: dict[str, Callable[[Any], torch.Tensor]] | None = None,
                log: Callable[[str], None] = print) -> None:
    """Re-measure every selector row's peak extra memory (and its ``before`` implementation's) as the peak of the
    tensor memory the call holds (:func:`~tokenprune.bench.measure.tensor_peak_bytes`: the allocator's own
    record, the same figure in any process), in place of the timed runs' resident-set peaks, which in one long
    process move by tens of MiB with what earlier runs left in the heap (kept as ``rss_peak_in_sweep_bytes``)."""
    by_label = {s.label: s for s in shapes}
    for row in rows:
        if row["method"] not in METHODS or row["shape"] not in by_label:
            continue
        method = METHODS[row["method"]]()
        ctx = _context(method, by_label[row["shape"]], row["k"], getattr(torch, row["dtype"]))
        calls = {"peak_bytes": lambda m=method, c=ctx: m.select(c)}
        if before and row["method"] in before and "before_ms" in row:
            calls["before_peak_bytes"] = lambda b=before[row["method"]], c=ctx: b(c)
        with torch_threads(row["threads"]):
            for key, call in calls.items():
                row.setdefault(key.replace("peak_bytes", "rss_peak_in_sweep_bytes"), row.get(key))
                row[key] = tensor_peak_bytes(call)
        log(f"{row['dtype']} x{row['threads']} {row['shape']}: {row['method']} peak {row['peak_bytes'] / 2**20:.0f} MiB"
            + (f" (before {row['before_peak_bytes'] / 2**20:.0f})" if "before_peak_bytes" in calls else ""))
