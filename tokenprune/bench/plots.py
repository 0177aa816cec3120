"""Charts of a bench sweep (matplotlib, headless Agg): prefill latency against estimated FLOPs and against kept
tokens, per method, with the physical limit and the unpruned model for reference."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(7, 4.5))


def _series(rows: list[dict[str, Any]], x: str, y: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """method -> sorted (x, median, min, max) points."""
    out: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for r in rows:
        if r.get(y) is not None and r.get(x) is not None:
            out[r["method"]].append((r[x], r[y], r[f"{y}_min"], r[f"{y}_max"]))
    return {m: sorted(points) for m, points in out.items()}


def _draw(ax, series, label_suffix: str = "", style: str = "-o") -> None:
    for method, points in series.items():
        xs, med, lo, hi = zip(*points, strict=True)
        ax.errorbar(xs, med, yerr=[[m - a for m, a in zip(med, lo, strict=True)],
                                   [b - m for m, b in zip(med, hi, strict=True)]],
                    fmt=style, capsize=3, markersize=4, label=f"{method}{label_suffix}")


def _limit(rows: list[dict[str, Any]], x: str) -> dict[str, list[tuple[float, float, float, float]]]:
    """The physical limit depends on the kept count only: one series over all methods."""
    by_x: dict[float, tuple[float, float, float, float]] = {}
    for r in rows:
        if r.get("prefill_ms_limit") is not None:
            point = (r[x], r["prefill_ms_limit"], r["prefill_ms_limit_min"], r["prefill_ms_limit_max"])
            by_x[r[x]] = min(by_x.get(r[x], point), point, key=lambda p: p[1])
    return {"physical limit": sorted(by_x.values())} if by_x else {}


def plot_sweep(rows: list[dict[str, Any]], out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>_flops_vs_latency.png`` and ``<stem>_tokens_vs_latency.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = rows[0]
    paths = []
    for x, xlabel, name in (
        ("tflops_pruned", "estimated LLM prefill TFLOPs (exact formula, text included)", "flops_vs_latency"),
        ("kept_tokens", "visual tokens kept", "tokens_vs_latency"),
    ):
        plt, (fig, ax) = _figure()
        _draw(ax, _series(rows, x, "prefill_ms_pruned"))
        _draw(ax, _limit(rows, x), style="--s")
        unpruned_x = first["tflops_unpruned"] if x == "tflops_pruned" else first["visual_tokens"]
        ax.errorbar([unpruned_x], [first["prefill_ms_unpruned"]],
                    yerr=[[first["prefill_ms_unpruned"] - first["prefill_ms_unpruned_min"]],
                          [first["prefill_ms_unpruned_max"] - first["prefill_ms_unpruned"]]],
                    fmt="k*", markersize=10, capsize=3, label="unpruned")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("prefill ms (median, min-max)")
        ax.set_title(first["model"], fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}_{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
