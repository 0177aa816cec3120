"""The paper-protocol sweep: methods x 192/128/64 of 576 visual tokens on the seven benchmarks, one checkpoint.

    python benchmarks/lmms_eval/sweep.py --pretrained llava-hf/llava-1.5-7b-hf --num-processes 8 \
        --output-path runs/llava7b
    python benchmarks/lmms_eval/aggregate.py runs/llava7b

Runs the unpruned model first (the 100% reference), then one lmms-eval run per (method, budget), each with all the
benchmarks, ``--log_samples`` (the per-sample pruning records) and its own output folder. ``--num-processes N``
launches data-parallel ranks with ``accelerate launch``. ``--dry-run`` prints the commands only. Needs a GPU
machine with ``pip install tokenprune-vlm[eval]`` and the datasets (lmms-eval downloads them from the Hub).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

TASKS = ["gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "textvqa_val", "vqav2_val"]
METHODS = ["fastervlm", "divprune", "visionzip", "cdpruner", "hiprune", "random"]
KEEPS = [192, 128, 64]  # of LLaVA-1.5's 576 tokens per image


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """``(label, argv)`` of every run: the unpruned reference, then methods x budgets (and FLOPs budgets)."""
    launcher = (["accelerate", "launch", f"--num_processes={args.num_processes}", f"--main_process_port={args.port}",
                 "-m", "lmms_eval"] if args.num_processes > 1 else [sys.executable, "-m", "lmms_eval"])
    base_args = f"pretrained={args.pretrained}" + (f",{args.model_args}" if args.model_args else "")
    settings = [("unpruned", "")]
    for method in args.methods:
        settings += [(f"{method}_keep{k}", f",method={method},keep={k}") for k in args.keeps]
        settings += [(f"{method}_flops{f}", f",method={method},flops={f}") for f in args.flops]
    runs = []
    for label, pruning in settings:
        argv = [*launcher, "eval", "--model", args.model, "--model_args", base_args + pruning,
                "--tasks", ",".join(args.tasks), "--batch_size", "1", "--log_samples",
                "--output_path", str(Path(args.output_path) / label)]
        if args.limit:
            argv += ["--limit", str(args.limit)]
        runs.append((label, argv))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="checkpoint, e.g. llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--model", default="tokenprune_llava_hf",
                        help="tokenprune_llava_hf | tokenprune_qwen2_vl | tokenprune_qwen2_5_vl")
    parser.add_argument("--model-args", default="dtype=float16,attn_implementation=sdpa",
                        help="extra wrapper arguments, comma-separated")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--keeps", nargs="*", type=int, default=KEEPS, help="visual tokens kept per image")
    parser.add_argument("--flops", nargs="*", type=float, default=[], help="FLOPs budgets (fractions) as well")
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--num-processes", type=int, default=1, help="GPUs (accelerate launch data parallel)")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--limit", type=int, help="samples per task (quick check)")
    parser.add_argument("--output-path", default="runs/lmms_eval")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    runs = commands(args)
    for i, (label, cmd) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {label}: {shlex.join(cmd)}", flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    if not args.dry_run:
        print(f"done; table: python {Path(__file__).with_name('aggregate.py')} {args.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
