"""Bench output: a table a person can read, JSON and CSV a program can read (one row per method x budget)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

COLUMNS = (
    "method", "keep", "flops", "visual_tokens", "kept_tokens", "seq_len_unpruned", "seq_len_pruned",
    "tflops_unpruned", "tflops_pruned",
    "prefill_ms_unpruned", "prefill_ms_unpruned_min", "prefill_ms_unpruned_max",
    "prefill_ms_pruned", "prefill_ms_pruned_min", "prefill_ms_pruned_max",
    "prefill_ms_limit", "prefill_ms_limit_min", "prefill_ms_limit_max", "overhead", "speedup",
    "stage", "limit_kind", "selection_ms",
    "ttft_ms_unpruned", "ttft_ms_unpruned_min", "ttft_ms_unpruned_max",
    "ttft_ms_pruned", "ttft_ms_pruned_min", "ttft_ms_pruned_max",
    "decode_ms_unpruned", "decode_ms_unpruned_min", "decode_ms_unpruned_max",
    "decode_ms_pruned", "decode_ms_pruned_min", "decode_ms_pruned_max",
    "peak_mem_unpruned", "peak_mem_pruned", "peak_mem_limit",
    "kv_bytes_unpruned", "kv_bytes_pruned", "kv_bytes_analytic_unpruned", "kv_bytes_analytic_pruned",
    "model", "device", "dtype", "threads", "repeats", "warmup", "decode_tokens",
)


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps([{c: row.get(c) for c in COLUMNS} for row in rows], indent=2)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in COLUMNS})
    return buffer.getvalue()


def write(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as JSON or CSV, chosen by the file's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_csv(rows) if path.suffix == ".csv" else to_json(rows) + "\n")
    return path


def _ms(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "-"
    return f"{row[key]:.1f} ({row[key + '_min']:.1f}-{row[key + '_max']:.1f})"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The unpruned model first, then one line per method x budget; times are median (min-max) ms."""
    if not rows:
        return "(no results)"
    first = rows[0]
    header = ("setting", "tokens", "TFLOPs", "prefill ms", "limit ms", "pruned/limit", "speed-up", "TTFT ms",
              "decode ms/tok", "peak MiB", "KV MiB (analytic)")
    lines = [header, (
        "unpruned", f"{first['visual_tokens']}", f"{first['tflops_unpruned']:.4g}", _ms(first, "prefill_ms_unpruned"),
        "-", "-", "1.00x", _ms(first, "ttft_ms_unpruned"), _ms(first, "decode_ms_unpruned"),
        _mb(first["peak_mem_unpruned"]),
        f"{_mb(first['kv_bytes_unpruned'])} ({_mb(first['kv_bytes_analytic_unpruned'])})",
    )]
    for r in rows:
        budget = f"keep={r['keep']}" if r.get("flops") is None else f"flops={r['flops']}"
        share = f"{r['tflops_pruned']:.4g} ({100 * r['tflops_pruned'] / r['tflops_unpruned']:.0f}%)"
        lines.append((
            f"{r['method']} {budget}", f"{r['kept_tokens']}/{r['visual_tokens']}", share,
            _ms(r, "prefill_ms_pruned"), _ms(r, "prefill_ms_limit"), _x(r.get("overhead"), 3), _x(r.get("speedup")),
            _ms(r, "ttft_ms_pruned"), _ms(r, "decode_ms_pruned"), _mb(r["peak_mem_pruned"]),
            f"{_mb(r['kv_bytes_pruned'])} ({_mb(r['kv_bytes_analytic_pruned'])})",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    text = [fmt.format(*line) for line in lines]
    text.insert(1, "-" * len(text[0]))
    footer = (f"{first['model']}; {first['threads']} threads; {first['repeats']} repeats after {first['warmup']} "
              f"warm-up; TFLOPs = LLM prefill estimate (exact formula, text included); limit = vision tower + LLM "
              f"on an input with only the kept tokens")
    return "\n".join([*text, footer])
