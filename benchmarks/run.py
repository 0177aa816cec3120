"""Run one benchmark config: ``python benchmarks/run.py benchmarks/<name>.json [more.json ...]``.

Each config holds ``tokenprune bench`` options (see ``tokenprune bench --help``). Writes
``benchmarks/results/<name>.json``, ``.csv``, ``.txt`` (the table) and, for sweeps with several budgets per
method, ``<name>_flops_vs_latency.png`` and ``<name>_tokens_vs_latency.png``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import Counter
from pathlib import Path

from tokenprune.bench.plots import plot_sweep
from tokenprune.cli import main

RESULTS = Path(__file__).resolve().parent / "results"


def run(config: Path) -> None:
    stem = config.stem
    out_json, out_csv = RESULTS / f"{stem}.json", RESULTS / f"{stem}.csv"
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        main(["bench", "--config", str(config), "--json", str(out_json), "--csv", str(out_csv)])
    print(table.getvalue(), end="")
    (RESULTS / f"{stem}.txt").write_text(table.getvalue())
    rows = json.loads(out_json.read_text())
    if max(Counter(r["method"] for r in rows).values()) > 1:
        for path in plot_sweep(rows, RESULTS, stem):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        run(Path(name))
