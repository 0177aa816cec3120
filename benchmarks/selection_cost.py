"""Selection cost of every registered method at N = 576 (LLaVA-1.5) and N = 2,880 (LLaVA-NeXT), D = 4,096, next
to one LLaVA-7B decoder layer's prefill over N tokens and the naive references (same output asserted).

``python benchmarks/selection_cost.py`` writes ``benchmarks/results/selection_cost.json`` and ``.txt``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from tokenprune.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        main(["bench-selection", "--sizes", "576,2880", "--dim", "4096", "--dtype", "bfloat16", "--repeats", "5",
              "--reference-repeats", "3",
              "--threads", "2", "--json", str(RESULTS / "selection_cost.json")])
    print(table.getvalue(), end="")
    (RESULTS / "selection_cost.txt").write_text(table.getvalue())
