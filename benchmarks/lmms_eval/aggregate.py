"""Turn lmms-eval output folders of tokenprune runs into one table.

    python benchmarks/lmms_eval/aggregate.py runs/llava-1.5-7b [more folders] [--json table.json] [--csv table.csv]

One row per (checkpoint, pruning setting), read from every ``*_results.json`` under the folders: the score per
benchmark (the papers' metric where known, else the task's first metric), the score as % of the unpruned run of the
same checkpoint, their average, kept visual tokens per sample, TFLOPs per sample (when the pruning record carries
FLOPs estimates) and the measured prefill time. Per-sample numbers come from the ``*_samples_*.jsonl`` files
(``--log_samples``), falling back to the run's ``throughput`` means. Needs no lmms-eval import.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tokenprune.integrations.model_args import pruning_kwargs, split_args_string  # noqa: E402

# The metric each paper-protocol benchmark is reported with (lmms-eval task name -> metric key).
MAIN_METRIC = {
    "gqa": "exact_match", "mmbench_en_dev": "gpt_eval_score", "mme": "mme_perception_score", "pope": "pope_f1_score",
    "scienceqa_img": "exact_match", "textvqa_val": "exact_match", "vqav2_val": "exact_match",
}
# --model_args keys that belong to lmms-eval's released wrappers (llava_hf, qwen2_vl, qwen2_5_vl), not to pruning.
WRAPPER_KEYS = frozenset(
    "pretrained revision device dtype batch_size trust_remote_code attn_implementation device_map chat_template "
    "use_cache max_frames_num use_flash_attention_2 max_length max_pixels min_pixels max_num_frames system_prompt "
    "interleave_visuals reasoning_prompt fps".split()
)
RECORD = ("kept_tokens", "visual_tokens", "tflops_pruned", "prefill_ms")


def setting_label(pruning: dict[str, Any]) -> str:
    if not pruning:
        return "unpruned"
    method = pruning["method"]
    method = "+".join(map(str, method)) if isinstance(method, list) else str(method)
    rest = [f"{k}={v}" for k, v in pruning.items() if k != "method"]
    return " ".join([method, *rest])


def main_score(
    task_results: dict[str, Any], task: str, chosen: dict[str, str] | None = None
) -> tuple[str, float] | None:
    metrics = {k.split(",")[0]: v for k, v in task_results.items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not metrics:
        return None
    wanted = (chosen or {}).get(task) or MAIN_METRIC.get(task)
    name = wanted if wanted in metrics else sorted(metrics)[0]
    return name, float(metrics[name])


def sample_means(results_file: Path, task: str) -> dict[str, float]:
    """Means of the per-sample pruning records of ``task`` logged next to ``results_file``."""
    stamp = results_file.name.removesuffix("_results.json")
    files = sorted(results_file.parent.glob(f"{stamp}_samples_{task}.jsonl"))
    values: dict[str, list[float]] = {name: [] for name in RECORD}
    for path in files:
        for line in path.read_text().splitlines():
            for counts in json.loads(line).get("token_counts") or []:
                record = (counts or {}).get("tokenprune") or {}
                for name in RECORD:
                    if record.get(name) is not None:
                        values[name].append(float(record[name]))
    return {name: sum(v) / len(v) for name, v in values.items() if v}


def collect(folders: list[Path], chosen: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One dict per (results file, task): checkpoint, setting, task, metric, score and the record means."""
    rows = []
    for folder in folders:
        for results_file in sorted(folder.rglob("*_results.json")):
            data = json.loads(results_file.read_text())
            config = data.get("config", {})
            args = config.get("model_args") or ""
            raw = split_args_string(args) if isinstance(args, str) else dict(args)
            pruning = pruning_kwargs({k: v for k, v in raw.items() if k not in WRAPPER_KEYS})
            throughput = data.get("throughput", {})
            for task, task_results in data.get("results", {}).items():
                score = main_score(task_results, task, chosen)
                if score is None:
                    continue
                means = sample_means(results_file, task) or {
                    name: throughput[f"avg_tokenprune_{name}"] for name in RECORD
                    if f"avg_tokenprune_{name}" in throughput
                }
                rows.append({
                    "checkpoint": str(raw.get("pretrained", "?")), "setting": setting_label(pruning), "task": task,
                    "metric": score[0], "score": score[1], **means, "source": str(results_file),
                })
    return rows


def build_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(tasks, table rows): per (checkpoint, setting) the scores, % of unpruned, their mean and the costs."""
    tasks = sorted({r["task"] for r in rows})
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["checkpoint"], r["setting"]), {})[r["task"]] = r
    table = []
    for (checkpoint, setting), by_task in groups.items():
        reference = groups.get((checkpoint, "unpruned"), {})
        row: dict[str, Any] = {"checkpoint": checkpoint, "setting": setting}
        relative = []
        for task in tasks:
            score = by_task[task]["score"] if task in by_task else None
            row[task] = score
            base = reference.get(task, {}).get("score")
            if score is not None and base:
                row[f"{task} %"] = 100.0 * score / base
                relative.append(row[f"{task} %"])
        row["avg %"] = sum(relative) / len(relative) if relative else None
        for name in RECORD:
            values = [r[name] for r in by_task.values() if name in r]
            row[name] = sum(values) / len(values) if values else None
        table.append(row)
    table.sort(key=lambda r: (r["checkpoint"], r["setting"] != "unpruned", -(r["kept_tokens"] or 0), r["setting"]))
    return tasks, table


def render(tasks: list[str], table: list[dict[str, Any]]) -> str:
    header = ["checkpoint", "setting", *tasks, "avg % of unpruned", "kept tokens", "TFLOPs", "prefill ms"]

    def cell(row: dict[str, Any], task: str) -> str:
        if row.get(task) is None:
            return "-"
        pct = row.get(f"{task} %")
        return f"{row[task]:.4g}" + (f" ({pct:.1f}%)" if pct is not None else "")

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        cells = [Path(row["checkpoint"]).name, row["setting"], *(cell(row, t) for t in tasks),
                 num(row["avg %"], ".1f"), num(row["kept_tokens"], ".1f"), num(row["tflops_pruned"], ".3f"),
                 num(row["prefill_ms"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="lmms-eval --output_path folders")
    parser.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC",
                        help="report TASK with METRIC (default: the papers' metric, else the task's first)")
    parser.add_argument("--json", type=Path, help="write the table as JSON")
    parser.add_argument("--csv", type=Path, help="write the table as CSV")
    args = parser.parse_args(argv)
    rows = collect(args.folders, dict(item.split("=", 1) for item in args.metric))
    if not rows:
        print(f"no *_results.json with scores under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 1
    tasks, table = build_table(rows)
    print(render(tasks, table))
    if args.json:
        args.json.write_text(json.dumps({"tasks": tasks, "rows": table}, indent=2))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for row in table for k in row}))
            writer.writeheader()
            writer.writerows(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
