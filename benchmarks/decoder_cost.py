"""Cost of decoder-stage selection inside the prefill: for every registered decoder-stage method, the time spent
recomputing attention rows (and in the whole selection step) as a share of the pruned sdpa prefill, next to the
eager alternative (each scoring layer eager with ``output_attentions``), LLaVA-1.5-7B shape at 1/8 depth (4 of 32
LLM layers, 3 of 24 CLIP-L layers, full widths; FastV K=2, PyramidDrop's boundaries scaled to layers 1, 2, 3),
bf16, keep=0.5 (FastV: R = 50%, the paper's default; PyramidDrop: a 50% layer average, lambda solved), one
thread (the shared 2-core machine was under heavy load).

``python benchmarks/decoder_cost.py`` writes ``benchmarks/results/decoder_cost.json`` and ``.md``.
"""

from __future__ import annotations

from pathlib import Path

from tokenprune.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    main(["bench-decoder", "--model", "llava-1.5-7b", "--layers", "4", "--vision-layers", "3", "--dtype", "bfloat16",
          "--keep", "0.5", "--repeats", "3", "--warmup", "1", "--threads", "1", "--no-progress",
          "--json", str(RESULTS / "decoder_cost.json"), "--markdown", str(RESULTS / "decoder_cost.md")])
