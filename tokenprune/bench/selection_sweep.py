"""Scaling sweep of the selection cost: each vision-stage selector's time and peak extra memory at growing token
counts, next to one 7B decoder layer's prefill over the same tokens (measured in the same run) and, where it fits,
the naive reference (same indices asserted on one thread, recorded on several).

Shapes (``SHAPES``): LLaVA-1.5 (576), 2 x 576, LLaVA-NeXT at its largest (2,880), LLaVA-OneVision AnyRes-max-9
(7,290) with LLaVA-7B's D = 4,096 and layer, and a 16-frame Qwen2-VL video (448 x 448 frames: 8 temporal groups
x 256 merged tokens = 2,048) with Qwen2-7B's D = 3,584 and layer. ``k = N / 9`` (64 of 576). Signals are the
synthetic ones of :mod:`tokenprune.bench.selection` (i.i.d. Gaussian features), plus one shape of 2,880 clustered
features (:func:`clustered_features`: near twins, as real patch features have).
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


def _label(row: dict[str, Any]) -> str:
    """N as the tables show it, with the shape's note (rows of older sweeps: the video shape's label)."""
    note = row.get("note", "video" if row["shape"] == "qwen-video-16f" else "")
    return f"{row['n']:,}" + (f" ({note})" if note else "")


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


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Log-log selection time against N, one panel per dtype x threads: each selector, one 7B layer's prefill and
    1 % of it, and a line proportional to ``k N D`` (k = N/9) through k-center's first point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    configs = sorted({(r["dtype"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(1, len(configs), figsize=(5.2 * len(configs), 4.6), squeeze=False, sharey=True)
    for ax, (dtype, threads) in zip(axes[0], configs, strict=True):
        mine = [r for r in rows if (r["dtype"], r["threads"]) == (dtype, threads) and "(" not in _label(r)]
        for name in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["n"], r["ms"]) for r in mine if r["method"] == name)
            xs, ys = zip(*points, strict=True)
            style = {"color": "black", "linewidth": 2} if name == "layer" else {}
            ax.plot(xs, ys, "-o", markersize=3, label="one 7B layer (prefill)" if name == "layer" else name, **style)
            if name == "layer":
                ax.plot(xs, [y / 100 for y in ys], "k--", linewidth=1, label="1% of the layer")
                floor = sorted((r["n"], r["floor_fp32_ms"]) for r in mine if r["method"] == "layer"
                               and r.get("floor_fp32_ms"))
                if floor:
                    ax.plot(*zip(*floor, strict=True), "-.", color="grey", linewidth=1.5,
                            label="k fp32 rows, one product (exact greedy's floor)")
            naive = sorted((r["n"], r["reference_ms"]) for r in mine if r["method"] == name and "reference_ms" in r)
            if naive:
                ax.plot(*zip(*naive, strict=True), ":x", color=ax.lines[-1].get_color(), markersize=4,
                        label=f"{name} naive")
        anchor = sorted((r["n"], r["ms"]) for r in mine if r["method"] == "kcenter")
        if anchor:
            n0, t0 = anchor[0]
            ns = [n0, max(r["n"] for r in mine)]
            ax.plot(ns, [t0 * (n / n0) ** 2 for n in ns], color="grey", linewidth=4, alpha=0.3,
                    label="∝ k·N·D (k = N/9)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({r["n"] for r in mine})
        ax.set_xticks(ticks, [f"{n:,}" for n in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("visual tokens N (D = 4,096)")
        ax.set_title(f"{dtype}, {threads} thread{'s' if threads > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("ms")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep as a markdown table: per shape x method, time, share of a layer, peak memory against the
    ``2 N D x 4 bytes`` budget, and the speed-ups over the naive reference and the previous implementation."""
    def mib(b: int | None) -> str:
        return "-" if b is None else f"{b / 2**20:.0f}"

    lines = ["| dtype | threads | N | D | k | selector | ms | % of a layer | peak MiB | budget MiB | naive ms | "
             "x naive | before ms | x before |", "|" + "---|" * 14]
    for r in rows:
        lines.append("| " + " | ".join([
            r["dtype"], str(r["threads"]), _label(r),
            f"{r['d']:,}", str(r["k"]), "**one 7B layer**" if r["method"] == "layer" else r["method"],
            f"{r['ms']:,.1f}", f"{100 * r['fraction_of_layer']:.2f}" if "fraction_of_layer" in r else "-",
            mib(r.get("peak_bytes")), mib(r["memory_budget_bytes"]) if r["method"] != "layer" else "-",
            f"{r['reference_ms']:,.0f}" if "reference_ms" in r else "-",
            f"{r['reference_speedup']:.1f}" if "reference_speedup" in r else "-",
            f"{r['before_ms']:,.0f}" if "before_ms" in r else "-",
            f"{r['before_speedup']:.1f}" if "before_speedup" in r else "-",
        ]) + " |")
    return "\n".join(lines)


def before_after(rows: list[dict[str, Any]], dtype: str, threads: int) -> str:
    """The docs' table for one configuration: per selector and N, before -> now (ms and peak MiB), the share of one
    layer, the speed-up over the naive reference, and whether the indices equal the previous selector's."""
    mine = [r for r in rows if (r["dtype"], r["threads"]) == (dtype, threads)]
    layer = {r["shape"]: r["ms"] for r in mine if r["method"] == "layer"}
    lines = ["| selector | N | before ms | now ms | x before | % of a layer | before MiB | now MiB | budget MiB | "
             "x naive | same as before |", "|" + "---|" * 11]
    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else "-"

    selectors = sorted((r for r in mine if r["method"] != "layer"),
                       key=lambda r: (SELECTORS.index(r["method"]) if r["method"] in SELECTORS else 99, r["n"]))
    for r in selectors:
        lines.append("| " + " | ".join([
            r["method"], _label(r),
            cell(r, "before_ms", ",.0f"), f"{r['ms']:,.0f}", cell(r, "before_speedup", ".1f"),
            f"{100 * r['ms'] / layer[r['shape']]:.1f}" if r["shape"] in layer else "-",
            f"{r['before_peak_bytes'] / 2**20:,.0f}" if r.get("before_peak_bytes") is not None else "-",
            f"{r['peak_bytes'] / 2**20:,.0f}" if r.get("peak_bytes") is not None else "-",
            f"{r['memory_budget_bytes'] / 2**20:,.0f}", cell(r, "reference_speedup", ".1f") + (
                f" ({r['shared_with_reference']} of {r['k']} same)" if r.get("same_as_reference") is False else ""),
            {True: "yes", False: "**no**"}.get(r.get("same_as_before"), "-"),
        ]) + " |")
    lines += ["", "One 7B layer's prefill in the same run: " + "; ".join(
        f"N = {s}: {ms:,.0f} ms" for s, ms in layer.items()) + "."]
    return "\n".join(lines)


# What bounds each selector's cost (the paper's algorithm, as implemented): the reason a row misses the targets.
LIMITS = {
    "divprune": "first pick: each token's nearest neighbour, every pair in the worst case (N^2 D = {pairs} G MACs); "
                "probe rows and bounds skip pairs, yet a quarter to a third of the rows are needed on both inputs "
                "swept; greedy: k fp32 rows (k N D = {rows} G MACs)",
    "kcenter": "k rows of the fp32 similarity (k N D = {rows} G MACs, about 2.5 k computed in blocks of likely "
               "picks; each block streams the N D fp32 features); bf16 products would change the picks",
    "cdpruner": "as k-center (k kernel rows, k N D = {rows} G MACs) + the incremental Cholesky rows (k^2 N / 2)",
    "mmtok": "the paper's facility location has N vision items per token: the fp32 N x (M + N) coverage "
             "({cover} MiB) and its N^2 D_c similarity (D_c = 1,024: {vision_pairs} G MACs), then a lazy greedy "
             "over coverage rows",
    "holov": "similarity variance within each of P = 16 chunks in fp32: N^2 D / P = {chunks} G MACs",
    "visiondrop": "linear: [CLS] scores, one pass over the tower's hidden states and head-mean keys, the VisionZip "
                  "merge",
    "visionzip": "linear: one pass over the tower's hidden states and head-mean keys, one [R, C] key-similarity "
                 "product",
    "recoverable": "fp64 affinities of int(D r) centres (the official quirk's count, data-dependent) to the N x D_k "
                   "keys, one product per 64 centres; the image-text relevance's fp32 unit rows; LOF O(N k)",
}


def _figures(n: int, d: int) -> dict[str, str]:
    """The sizes the ``LIMITS`` texts quote, at ``n`` tokens of width ``d`` (``k = n / 9``)."""
    k = round(n / 9)
    return {"pairs": f"{n * n * d / 1e9:.0f}", "rows": f"{k * n * d / 1e9:.1f}",
            "chunks": f"{n * n * d / 16 / 1e9:.1f}", "cover": f"{n * (n + 32) * 4 / 2**20:,.0f}",
            "vision_pairs": f"{n * n * 1024 / 1e9:.1f}"}


def verdict(rows: list[dict[str, Any]], dtype: str, threads: int, mid: str = "2880", big: str = "7290") -> str:
    """Per selector against the issue's targets: at ``mid`` <= 1 % of one 7B layer and >= 3x the naive reference,
    at ``big`` <= 2 % of a layer and <= ``2 N D x 4`` bytes extra; what bounds it where a target is missed (its
    figures at both sizes, ``mid / big``), and the floor of an exact greedy (the ``k`` fp32 similarity rows in one
    product) as a share of the layer at each size."""
    mine = {(r["shape"], r["method"]): r for r in rows if (r["dtype"], r["threads"]) == (dtype, threads)}
    lines = [f"| selector | N = {int(mid):,}: % of a layer | x naive | met? | N = {int(big):,}: % of a layer | "
             f"extra MiB (budget) | met? | what bounds it (figures at N = {int(mid):,} / {int(big):,}) |",
             "|" + "---|" * 8]
    for name in SELECTORS:
        a, b = mine.get((mid, name)), mine.get((big, name))
        if a is None and b is None:
            continue
        cells = [name]
        if a:
            layer = mine[(mid, "layer")]["ms"]
            speedup = a.get("reference_speedup")
            ok = a["ms"] <= 0.01 * layer and (speedup is None or speedup >= 3)
            twin = mine.get((f"{mid}-clustered", name), {})  # the same N on clustered features, if swept
            cells += [f"{100 * a['ms'] / layer:.2f}", ("-" if speedup is None else f"{speedup:.1f}") + (
                f" (clustered: {twin['reference_speedup']:.1f})" if "reference_speedup" in twin else ""),
                "yes" if ok else "no"]
        else:
            cells += ["-", "-", "-"]
        if b:
            layer = mine[(big, "layer")]["ms"]
            ok = b["ms"] <= 0.02 * layer and (b["peak_bytes"] or 0) <= b["memory_budget_bytes"]
            cells += [f"{100 * b['ms'] / layer:.2f}",
                      f"{(b['peak_bytes'] or 0) / 2**20:,.0f} ({b['memory_budget_bytes'] / 2**20:,.0f})",
                      "yes" if ok else "no"]
        else:
            cells += ["-", "-", "-"]
        sizes = [_figures(r["n"], r["d"]) for r in (a, b) if r]
        cells.append(LIMITS[name].format(**{key: " / ".join(f[key] for f in sizes) for key in sizes[0]}))
        lines.append("| " + " | ".join(cells) + " |")
    floors = [mine.get((shape, "layer")) for shape in (mid, big)]
    floors = [r for r in floors if r and r.get("floor_fp32_ms")]
    if floors:
        lines += ["", "Floor of an exact greedy (its `k` rows of the fp32 similarity, `k N D`, as one product at the "
                  "best rate this CPU has), measured in the same run: " + "; ".join(
                      f"N = {r['n']:,}: {r['floor_fp32_ms']:,.1f} ms = **{100 * r['floor_fp32_ms'] / r['ms']:.2f} %** "
                      f"of the layer ({dtype}: {r['floor_dtype_ms']:,.1f} ms = "
                      f"{100 * r['floor_dtype_ms'] / r['ms']:.2f} %)" for r in floors) + "."]
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], dtype: str = "bfloat16", threads: int = 1, mid: str = "2880",
            big: str = "7290") -> str:
    """The docs' short table for one configuration: per selector, before -> now (ms) and the share of one layer at
    ``mid`` and ``big``, the speed-up over the naive reference (and on the clustered shape), and the peak tensor
    memory before -> now at ``big`` against the ``2 N D x 4`` bound."""
    mine = {(r["shape"], r["method"]): r for r in rows if (r["dtype"], r["threads"]) == (dtype, threads)}
    if (mid, "layer") not in mine or (big, "layer") not in mine:
        return ""
    budget = mine[(big, "layer")]["memory_budget_bytes"] / 2**20
    lines = [f"| selector | N = {int(mid):,}: before -> now ms | % of a layer | x naive (clustered) | "
             f"N = {int(big):,}: before -> now ms | % of a layer | MiB before -> now (bound {budget:,.0f}) |",
             "|" + "---|" * 7,
             f"| one 7B layer | {mine[(mid, 'layer')]['ms']:,.0f} | - | - | {mine[(big, 'layer')]['ms']:,.0f} | - "
             "| - |"]

    def change(r: dict[str, Any] | None, key: str, now: str, scale: float = 1.0) -> str:
        if r is None:
            return "-"
        if r.get(key) is None:
            return f"{r[now] / scale:,.0f}"
        return f"{r[key] / scale:,.0f} -> {r[now] / scale:,.0f}"

    for name in SELECTORS:
        a, b, twin = mine.get((mid, name)), mine.get((big, name)), mine.get((f"{mid}-clustered", name), {})
        if a is None and b is None:
            continue
        naive = "-" if not a or "reference_speedup" not in a else f"{a['reference_speedup']:.1f}" + (
            f" ({twin['reference_speedup']:.1f})" if "reference_speedup" in twin else "")
        lines.append("| " + " | ".join([
            name, change(a, "before_ms", "ms"), f"{100 * a['ms'] / mine[(mid, 'layer')]['ms']:.1f}" if a else "-",
            naive, change(b, "before_ms", "ms"), f"{100 * b['ms'] / mine[(big, 'layer')]['ms']:.1f}" if b else "-",
            change(b, "before_peak_bytes", "peak_bytes", 2**20) if b and b.get("peak_bytes") is not None else "-",
        ]) + " |")
    return "\n".join(lines)


def docs_section(rows: list[dict[str, Any]]) -> str:
    """The generated part of ``docs/selection_cost.md``: per configuration the before/after table and the verdict
    against the targets (``benchmarks/selection_cost.py --docs`` writes it from the committed JSON)."""
    parts = []
    for dtype, threads in sorted({(r["dtype"], r["threads"]) for r in rows}, reverse=True):
        parts += [f"### {dtype}, {threads} thread{'s' if threads > 1 else ''}", "", before_after(rows, dtype, threads),
                  "", "Against the targets:", "", verdict(rows, dtype, threads), ""]
    return "\n".join(parts)
