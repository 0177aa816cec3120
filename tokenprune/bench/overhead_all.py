"""Every registered method against its physical limit, in one run (``benchmarks/overhead_all.py``).

For each keep (outer loop, so the smallest budget finishes first) and each method: the pruned prefill and its limit
(:mod:`tokenprune.bench.limits`) timed interleaved, ``overhead = prefill_ms_pruned / prefill_ms_limit`` and the time
inside the method's selection calls (``selection_ms``). The unpruned prefill is measured once. Every finished
setting is written to the JSON file at once; a second call with the same file skips what is there (resumable),
and refuses a file measured on another configuration. A method that cannot run on the model gets a row with
``error``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenprune.bench.models import BenchModel
from tokenprune.bench.run import Budget, measure_pruned, measure_unpruned
from tokenprune.compute_dtype import compute_dtype
from tokenprune.methods import METHODS

TARGET = 1.05
STAGE_ORDER = ("vision", "vision-encoder", "decoder", "two-stage")
CSV_COLUMNS = ("method", "stage", "keep", "visual_tokens", "kept_tokens", "prefill_ms_pruned", "prefill_ms_pruned_min",
               "prefill_ms_pruned_max", "prefill_ms_limit", "prefill_ms_limit_min", "prefill_ms_limit_max",
               "overhead", "overhead_ms", "selection_ms", "speedup", "limit_kind", "error")


def all_methods() -> list[str]:
    """Every registered image method, grouped by stage (vision, inside the encoder, decoder, two-stage), then by
    name. Video-only methods (HoliTom) are not in this benchmark: its model takes one image (:func:`video_only`)."""
    images = [name for name in METHODS if not METHODS[name].video_only]
    return sorted(images, key=lambda name: (STAGE_ORDER.index(METHODS[name].stage), name))


def video_only() -> list[str]:
    """The registered methods that merge the frames of a video and so have no row in this image benchmark."""
    return sorted(name for name in METHODS if METHODS[name].video_only)


def run_all(bm: BenchModel, path: Path, methods: Sequence[str], keeps: Sequence[float], *, repeats: int,
            warmup: int, options: dict[str, dict[str, Any]] | None = None,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure what ``path`` does not hold yet; returns the whole file's content (``context``, ``unpruned``,
    ``rows``). ``options[method]``: hyper-parameters other than the defaults (e.g. a layer the model lacks)."""
    options = options or {}
    context = {"model": bm.description, "dtype": str(compute_dtype(bm.model)), "threads": torch.get_num_threads(),
               "repeats": repeats, "warmup": warmup}
    data = json.loads(path.read_text()) if path.exists() else {"context": context, "rows": []}
    if data["context"] != context:
        raise ValueError(f"{path} was measured on {data['context']}, this run is {context}; use another --out or "
                         f"delete the file to start again")
    save = lambda: path.write_text(json.dumps(data, indent=1) + "\n")  # noqa: E731
    with torch.inference_mode():
        if "unpruned" not in data:
            log("unpruned prefill ...")
            data["unpruned"] = measure_unpruned(bm, repeats, warmup, 0)
            save()
        done = {(r["method"], r["keep"]) for r in data["rows"]}
        todo = [(keep, m) for keep in keeps for m in methods if (m, keep) not in done]
        for i, (keep, method) in enumerate(todo, 1):
            begin = time.perf_counter()
            try:
                budget = Budget(method, keep, options=tuple(sorted(options.get(method, {}).items())))
                row = measure_pruned(bm, budget, repeats, warmup, 0, memory=False)
                row["overhead"] = row["prefill_ms_pruned"] / row["prefill_ms_limit"]
                row["overhead_ms"] = row["prefill_ms_pruned"] - row["prefill_ms_limit"]
                row["speedup"] = data["unpruned"]["prefill_ms_unpruned"] / row["prefill_ms_pruned"]
            except (ValueError, RuntimeError, NotImplementedError) as err:
                row = {"method": method, "keep": keep, "stage": METHODS[method].stage,
                       "error": f"{type(err).__name__}: {err}"}
            data["rows"].append(row)
            save()
            shown = (f"overhead {row['overhead']:.3f} (pruned {row['prefill_ms_pruned']:.0f} ms, limit "
                     f"{row['prefill_ms_limit']:.0f} ms, selection {row['selection_ms'] or 0:.1f} ms)"
                     if "error" not in row else row["error"][:120])
            log(f"[{i}/{len(todo)}] {method} keep={keep}: {shown}  ({time.perf_counter() - begin:.0f} s)")
    return data


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row.get("error"):
        return "error"
    ratio = f"{row['overhead']:.3f}"
    ratio = f"**{ratio}**" if row["overhead"] > TARGET else ratio
    return f"{ratio} ({row['selection_ms']:,.1f})" if row.get("selection_ms") is not None else ratio


def markdown(data: dict[str, Any], keeps: Sequence[float]) -> str:
    """One line per method: per keep the overhead ratio (above the target in bold) and the selection ms in
    brackets; the kept visual tokens of the smallest keep; the limit's kind."""
    rows = {(r["method"], r["keep"]): r for r in data["rows"]}
    methods = [m for m in all_methods() if any(m == r["method"] for r in data["rows"])]
    smallest = min(keeps)
    head = ["method", "stage", *[f"keep {k}: overhead (selection ms)" for k in keeps],
            f"kept at {smallest} (of N)", "limit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        small = rows.get((m, smallest)) or {}
        kept = (f"{small['kept_tokens']} of {small['visual_tokens']}" if "kept_tokens" in small else "-")
        kind = next((r.get("limit_kind") for (n, _), r in rows.items() if n == m and r.get("limit_kind")), "-")
        opts = next((r.get("options") for (n, _), r in rows.items() if n == m and r.get("options")), None)
        name = m + (" (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")" if opts else "")
        lines.append("| " + " | ".join([name, METHODS[m].stage, *[_cell(rows.get((m, k))) for k in keeps], kept,
                                        kind or "-"]) + " |")
    unpruned = data.get("unpruned", {}).get("prefill_ms_unpruned")
    ctx = data["context"]
    lines += ["", f"Model: {ctx['model']}; {ctx['threads']} threads, median of {ctx['repeats']} interleaved "
                  f"pruned/limit pairs after {ctx['warmup']} warm-up round(s)"
              + (f"; unpruned prefill {unpruned:,.0f} ms." if unpruned else ".")]
    errors = [r for r in data["rows"] if r.get("error") and r["method"] in methods]
    lines += [f"- {r['method']} keep={r['keep']}: {r['error']}" for r in errors]
    if video_only():
        lines += ["", f"Not measured: {', '.join(video_only())} (videos only; the benchmark model takes one image)."]
    return "\n".join(lines)


def side_by_side(before: dict[str, Any], after: dict[str, Any], keeps: Sequence[float]) -> str:
    """The methods of ``after`` with, per keep, the overhead ratio (selection ms) of ``before`` and of ``after``
    next to each other (above the target in bold): the same settings measured on two versions of the code. Both
    runs' contexts are printed, so a reader sees whether the model and the machine's settings match."""
    old = {(r["method"], r["keep"]): r for r in before["rows"]}
    new = {(r["method"], r["keep"]): r for r in after["rows"]}
    methods = [m for m in all_methods() if any(m == n for n, _ in new)]
    head = ["method", "stage", *[f"keep {k}: {when}" for k in keeps for when in ("before", "after")]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [_cell(rows.get((m, k))) for k in keeps for rows in (old, new)]
        lines.append("| " + " | ".join([m, METHODS[m].stage, *cells]) + " |")
    for name, data in (("Before", before), ("After", after)):
        ctx = data["context"]
        unpruned = data.get("unpruned", {}).get("prefill_ms_unpruned")
        lines += ["", f"{name}: {ctx['model']}; {ctx['threads']} threads, median of {ctx['repeats']} interleaved "
                      f"pruned/limit pairs after {ctx['warmup']} warm-up round(s)"
                  + (f"; unpruned prefill {unpruned:,.0f} ms." if unpruned else ".")]
    return "\n".join(lines)


def to_csv(data: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in data["rows"]:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in CSV_COLUMNS})
    return buffer.getvalue()


def plot(data: dict[str, Any], keeps: Sequence[float], path: Path) -> None:
    """Left: overhead ratio per method (one marker per keep) with the 1.05 target; right: selection ms (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {(r["method"], r["keep"]): r for r in data["rows"] if not r.get("error")}
    methods = [m for m in all_methods() if any(m == n for n, _ in rows)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.32 * len(methods) + 1.6), sharey=True)
    ys = range(len(methods))
    for j, keep in enumerate(keeps):
        points = [(rows[(m, keep)], y) for y, m in zip(ys, methods, strict=True) if (m, keep) in rows]
        if not points:
            continue
        offset = (j - (len(keeps) - 1) / 2) * 0.22
        left.plot([r["overhead"] for r, _ in points], [y + offset for _, y in points], "o", markersize=4,
                  label=f"keep {keep}")
        right.plot([max(r["selection_ms"] or 0, 1e-2) for r, _ in points], [y + offset for _, y in points], "o",
                   markersize=4, label=f"keep {keep}")
    left.axvline(1.0, color="grey", linewidth=1)
    left.axvline(TARGET, color="red", linestyle="--", linewidth=1, label=f"target {TARGET}")
    left.set_yticks(list(ys), [f"{m} ({METHODS[m].stage})" for m in methods], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("pruned prefill / limit")
    left.legend(fontsize=7)
    right.set_xscale("log")
    right.set_xlabel("ms inside the method's selection per prefill")
    for ax in (left, right):
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(data["context"]["model"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(data: dict[str, Any], keeps: Sequence[float], stem: Path) -> list[Path]:
    """``stem``.md, .csv and .png next to the JSON the run wrote."""
    md, csv_path, png = stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".png")
    md.write_text(markdown(data, keeps) + "\n")
    csv_path.write_text(to_csv(data))
    plot(data, keeps, png)
    return [md, csv_path, png]
