"""Every registered method against its physical limit: ``python benchmarks/overhead_all.py``.

Writes ``benchmarks/results/overhead_all.json`` after every finished setting (run it again to resume where it
stopped: finished settings are skipped) and, at the end (or with ``--report`` alone), ``overhead_all.md``,
``.csv`` and ``.png``. Default model: the tiny LLaVA-1.5 architecture (64 visual tokens, LLM width 128) at
LLaVA-1.5-7B's full LLM depth (32 layers, so every decoder-stage method prunes at its real layers), fp32, 1 thread,
5 interleaved repeats after a warm-up round (:mod:`tokenprune.bench.overhead_all`). The 576-token model (LLM
width 512, 4-layer vision tower of width 256) of the same depth, every method, from scratch (docs/benchmarks.md):

    python benchmarks/overhead_all.py --model demo --dtype bfloat16 --threads 1 --fresh \\
        --out benchmarks/results/overhead_all_demo.json

``--method a,b`` measures some methods only; ``--before earlier.json`` writes the .md with that run's ratios and
this run's side by side (``results/overhead_changed.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokenprune.bench import overhead_all as oa
from tokenprune.bench.models import load

RESULTS = Path(__file__).resolve().parent / "results"
# HiPrune's object layer is CLIP layer 8 (of 24); the small towers here have 3-4 layers: score at layer 0 (the
# selection's cost does not depend on which layer the attention comes from)
OPTIONS = {"hiprune": {"object_layer": 0}}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--width-divisor", type=int, default=1, help="narrow a llava-1.5-7b/13b preset's LLM")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--vision-layers", type=int, default=0, help="0: the model's own")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", default="0.11,0.25,0.5", help="comma list, run in this order")
    parser.add_argument("--method", default="all", help="comma list or 'all'")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of pruned + limit")
    parser.add_argument("--out", default=str(RESULTS / "overhead_all.json"))
    parser.add_argument("--report", action="store_true", help="only write .md/.csv/.png from the JSON")
    parser.add_argument("--fresh", action="store_true", help="measure every setting again (the JSON is replaced)")
    parser.add_argument("--before", default=None,
                        help="a JSON of an earlier run: the .md puts its ratios and this run's side by side")
    args = parser.parse_args()
    keeps = [float(k) for k in args.keep.split(",")]
    out = Path(args.out)
    if args.fresh and not args.report:
        out.unlink(missing_ok=True)
    if not args.report:
        torch.set_num_threads(args.threads)
        bm = load(args.model, layers=args.layers, vision_layers=args.vision_layers or None, dtype=args.dtype,
                  width_divisor=args.width_divisor)
        methods = oa.all_methods() if args.method == "all" else args.method.split(",")
        oa.run_all(bm, out, methods, keeps, repeats=args.repeats, warmup=args.warmup, options=OPTIONS,
                   log=lambda line: print(line, flush=True))
    data = json.loads(out.read_text())
    for path in oa.write_outputs(data, keeps, out.with_suffix("")):
        print(f"wrote {path}")
    if args.before:
        md = out.with_suffix(".md")
        md.write_text(oa.side_by_side(json.loads(Path(args.before).read_text()), data, keeps) + "\n")
        print(f"wrote {md} (before: {args.before})")
