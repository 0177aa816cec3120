"""The serving benchmark's table (markdown, ratios pruned/unpruned side by side) and its TTFT-vs-keep plot (a
self-contained SVG: vLLM's environment has no plotting library)."""

from __future__ import annotations

SERVER_COLUMNS = (("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"), ("ttft_p50_s", "TTFT p50 s"),
                  ("ttft_p99_s", "TTFT p99 s"), ("kv_blocks_peak", "KV blocks peak"))
OFFLINE_COLUMNS = (("requests_per_s", "req/s"), ("output_tokens_per_s", "out tok/s"), ("prompt_tokens", "prompt tok"),
                   ("kv_blocks_per_request", "KV blocks/req"))


def _table(rows: dict[str, dict], columns) -> list[str]:
    base = rows["unpruned"]
    head = "| keep | " + " | ".join(f"{name} | ratio" for _, name in columns) + " |"
    lines = [head, "|---" * (1 + 2 * len(columns)) + "|"]
    for label, row in rows.items():
        cells = []
        for key, _ in columns:
            value, ref = row.get(key), base.get(key)
            cells.append("-" if value is None else f"{value:.3g}")
            cells.append(f"{value / ref:.2f}" if value is not None and ref else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    """Both tables, with the run's settings."""
    plan = results["plan"]
    out = [f"Model `{plan['model']}` ({plan['model_type']}), method `{plan['method']}`, {plan['requests']} requests "
           f"at concurrency {plan['concurrency']}, {plan['max_tokens']} output tokens each, one "
           f"{plan['image_size'][0]}x{plan['image_size'][1]} image per request, device {plan['device']}.", "",
           "**vllm serve** (streamed chat requests; ratio = pruned / unpruned)", "",
           *_table(results["server"], SERVER_COLUMNS)]
    if results.get("offline"):
        out += ["", "**offline LLM.generate** (one batch of the same prompts)", "",
                *_table(results["offline"], OFFLINE_COLUMNS)]
    return "\n".join(out) + "\n"


def svg_ttft(results: dict, width: int = 480, height: int = 300) -> str:
    """TTFT p50 and p99 (s) against keep (unpruned = 1.0)."""
    points = sorted(((1.0 if label == "unpruned" else float(label)), row["ttft_p50_s"], row["ttft_p99_s"])
                    for label, row in results["server"].items())
    top = max(p[2] for p in points) * 1.1 or 1.0
    left, bottom, right, upper = 60, height - 40, width - 20, 20

    def x(keep: float) -> float:
        return left + keep * (right - left)

    def y(value: float) -> float:
        return bottom - value / top * (bottom - upper)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12">', '<rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{upper}" stroke="black"/>',
             f'<text x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle">keep (fraction of visual tokens)'
             f'</text>',
             f'<text x="14" y="{(upper + bottom) / 2}" transform="rotate(-90 14 {(upper + bottom) / 2})" '
             f'text-anchor="middle">time to first token (s)</text>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{x(tick)}" y="{bottom + 16}" text-anchor="middle">{tick:g}</text>')
    for i in range(5):
        value = top * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4}" text-anchor="end">{value:.2g}</text>')
    for index, (name, colour) in ((1, ("p50", "#1f77b4")), (2, ("p99", "#d62728"))):
        path = " ".join(f"{x(p[0]):.1f},{y(p[index]):.1f}" for p in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x(p[0]):.1f}" cy="{y(p[index]):.1f}" r="3" fill="{colour}"/>' for p in points]
        parts.append(f'<text x="{right - 40}" y="{upper + 14 * index}" fill="{colour}">TTFT {name}</text>')
    return "\n".join(parts + ["</svg>"]) + "\n"
