"""Cost of decoder-stage selection inside the prefill: for every registered decoder-stage method, the time spent
recomputing attention rows (and in the whole selection step) as a share of the pruned sdpa prefill, next to the
eager alternative (each scoring layer eager with ``output_attentions``).

Model: LLaVA-1.5-7B's depth (all 32 LLM layers, so every method prunes at its real layers) at a quarter of its
width (d=1024, MLP 2752, 8 heads of 128: every per-token cost of a layer divided by 16, so "recomputation / pruned
prefill" keeps its full-width value) with 3 of the 24 CLIP-L layers at full width (the vision tower is then about
as large a share of the prefill as in the real model); fp32, 2 threads, ``keep=0.5`` (FastV K=2 R=50%; the other
methods at a 50% budget in their own convention).

``python benchmarks/decoder_cost.py`` writes ``benchmarks/results/decoder_cost.json`` and ``.md``. The earlier run
at 1/8 depth and full width (bf16, 1 thread, FastV and PyramidDrop only) is kept as ``decoder_cost_eighth_bf16.*``.
"""

from __future__ import annotations

from pathlib import Path

from tokenprune.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    main(["bench-decoder", "--model", "llava-1.5-7b", "--width-divisor", "4", "--vision-layers", "3",
          "--dtype", "float32", "--keep", "0.5", "--repeats", "3", "--warmup", "1", "--threads", "2",
          "--json", str(RESULTS / "decoder_cost.json"), "--markdown", str(RESULTS / "decoder_cost.md")])
