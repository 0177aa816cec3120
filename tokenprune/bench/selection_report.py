"""The scaling sweep's report (:mod:`tokenprune.bench.selection_sweep` rows in, text and a plot out): the full
table, the docs' before/after tables and summary, the verdict against issue 24's targets with what bounds each
selector, and the log-log plot of selection time against N."""

from __future__ import annotations

from typing import Any

from tokenprune.bench.selection_sweep import SELECTORS


def _label(row: dict[str, Any]) -> str:
    """N as the tables show it, with the shape's note (rows of older sweeps: the video shape's label)."""
    note = row.get("note", "video" if row["shape"] == "qwen-video-16f" else "")
    return f"{row['n']:,}" + (f" ({note})" if note else "")


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
