"""Selection cost of the selectors next to one 7B decoder layer's prefill at the same N.

``python benchmarks/selection_cost.py`` writes ``benchmarks/results/selection_cost.json`` and ``.txt`` (every
registered method at N = 576 and 2,880, naive references, same output asserted; ``tokenprune bench-selection``).

``python benchmarks/selection_cost.py --sweep`` runs the scaling sweep (:mod:`tokenprune.bench.selection_sweep`:
N = 576, 1,152, 2,880, 7,290 and a 16-frame Qwen video, D = 4,096, k = N/9, bf16 and fp32, 1 and 2 threads; time
and peak extra memory per selector, one 7B layer's prefill, the naive references up to ``--reference-max-n``, the
previous implementation (``--before REV``, read from git) up to ``--before-max-n``; after the first configuration
both up to ``--later-max-n``) and writes
``results/selection_sweep.{json,md,png}``. Each finished configuration is saved at once (a partial sweep is usable);
after the last one every selector's peak memory is re-measured as the peak of the tensor memory it holds
(``selection_sweep.memory_pass``; ``--no-memory-pass`` keeps the timed runs' resident-set peaks).

``--memory DIR`` re-runs the memory pass over the sweep saved in ``DIR`` and rewrites its files.

``--merge DIR ... --name NAME`` merges the rows of several sweep runs (one per dtype or shape group, run side by
side) into ``results/NAME.{json,md,png}``; ``--docs --name NAME`` writes the tables of ``docs/selection_cost.md``
from ``results/NAME.json`` (checked by ``tests/test_selection_sweep.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

from tokenprune.cli import main

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def previous_selectors(rev: str) -> dict:
    """``name -> ctx -> kept`` from the selectors as they were at git revision ``rev`` (the "before" column)."""
    from tokenprune import functional as F
    from tokenprune.methods import (
        CLS_ATTENTION,
        CLS_ATTENTION_WIDE,
        FEATURES,
        TEXT_EMBEDDINGS,
        VISION_HIDDEN,
        VISION_KEYS,
    )

    modules = {}
    shared = ("similarity_rows", "diversity")  # imported by the old modules after them: the old versions
    current = {name: sys.modules.get(f"tokenprune.functional.{name}") for name in shared}
    try:
        for name in ("similarity_rows", "diversity", "dpp", "coverage", "recovery", "chunks"):
            show = subprocess.run(["git", "show", f"{rev}:tokenprune/functional/{name}.py"], cwd=ROOT,
                                  capture_output=True, text=True)
            if show.returncode:  # not in that revision (similarity_rows before the third round)
                continue
            module = types.ModuleType(f"before_{name}")
            exec(compile(show.stdout, f"{rev}:{name}.py", "exec"), module.__dict__)  # noqa: S102 (our own history)
            modules[name] = module
            if name in shared:
                sys.modules[f"tokenprune.functional.{name}"] = module
    finally:
        for name, module in current.items():
            if module is not None:
                sys.modules[f"tokenprune.functional.{name}"] = module

    def relevance(ctx):
        feats, text = ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS)
        return F.instruction_relevance(feats, text) if text.shape[0] else feats.new_ones(ctx.n).float()

    def pivot(ctx):
        return int(ctx.signal(CLS_ATTENTION, -1).float().mean(dim=0).argmax())

    def recoverable(ctx):  # the method's select (tokenprune/methods/recoverable.py) on the old functional
        feats, text = ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS)
        sim = F.instruction_relevance(feats, text.float().mean(dim=0, keepdim=True)) * 768**-0.5
        keys = ctx.signal(VISION_KEYS, -1).float().transpose(0, 1).reshape(ctx.n, -1)
        return modules["recovery"].recoverable(ctx.signal(CLS_ATTENTION_WIDE, -1), sim, ctx.signal(VISION_HIDDEN),
                                               keys)[0]

    def holov(ctx):  # the method's select with [CLS] (tokenprune/methods/holov.py) on the old functional
        attn = ctx.signal(CLS_ATTENTION).float().mean(dim=0)
        return modules["chunks"].holov(attn, ctx.signal(FEATURES), ctx.k, chunks=16)[0]

    return {
        "recoverable": recoverable,
        "holov": holov,
        "divprune": lambda ctx: modules["diversity"].divprune(ctx.signal(FEATURES), ctx.k),
        "kcenter": lambda ctx: modules["diversity"].kcenter(ctx.signal(FEATURES), ctx.k, pivot(ctx)),
        "cdpruner": lambda ctx: modules["dpp"].cdpruner(ctx.signal(FEATURES), relevance(ctx), ctx.k),
        "mmtok": lambda ctx: modules["coverage"].mmtok(ctx.signal(FEATURES), ctx.signal(TEXT_EMBEDDINGS), ctx.k,
                                                       ctx.signal(VISION_HIDDEN), tv_temp=0.02),
    }


RSS_MEMORY = "resident-set peaks of the timed runs"
TENSOR_MEMORY = "peaks of the tensor memory each call holds (selection_sweep.memory_pass)"


def write_results(stem: Path, saved: dict) -> None:
    """``stem.json`` (``saved``: meta and ``rows``), ``stem.md`` (the full table) and ``stem.png`` (the plot)."""
    from tokenprune.bench import selection_report as report

    stem.with_suffix(".json").write_text(json.dumps(saved, indent=1) + "\n")
    stem.with_suffix(".md").write_text(report.markdown(saved["rows"]) + "\n")
    report.plot(saved["rows"], str(stem.with_suffix(".png")))


def run_sweep(args: argparse.Namespace) -> None:
    from tokenprune.bench import selection_sweep as sweep

    shapes = tuple(s for s in sweep.SHAPES if args.shapes is None or s.label in args.shapes.split(","))
    before = previous_selectors(args.before) if args.before else None
    out = Path(args.out)
    rows: list = []
    meta = {"what": "benchmarks/selection_cost.py " + " ".join(sys.argv[1:]), "before": args.before,
            "memory": RSS_MEMORY}

    def save() -> None:
        write_results(out / "selection_sweep", {**meta, "rows": rows})

    for i, config in enumerate(args.configs.split(",")):
        dtype, threads = config.split("x")
        limit = 10**9 if i == 0 else args.later_max_n  # the first configuration runs the baselines the furthest
        rows += sweep.sweep(dtype, int(threads), shapes, reference_max_n=min(args.reference_max_n, limit),
                            before=before, before_max_n=min(args.before_max_n, limit),
                            log=lambda line: print(line, flush=True))
        save()
    if not args.no_memory_pass:
        sweep.memory_pass(rows, shapes, before, log=lambda line: print(line, flush=True))
        meta["memory"] = TENSOR_MEMORY
        save()


def remeasure_memory(directory: str) -> None:
    """Re-run the memory pass over the rows of the sweep saved in ``directory`` (its ``before`` revision read from
    git again) and rewrite its files: for a sweep run before the pass existed, or after a change to memory only."""
    from tokenprune.bench import selection_sweep as sweep

    out = Path(directory)
    saved = json.loads((out / "selection_sweep.json").read_text())
    rows = saved["rows"]
    before = previous_selectors(saved["before"]) if saved.get("before") else None
    sweep.memory_pass(rows, sweep.SHAPES, before, log=lambda line: print(line, flush=True))
    saved["memory"] = TENSOR_MEMORY
    write_results(out / "selection_sweep", saved)


DOCS = ROOT / "docs" / "selection_cost.md"
BEGIN, END = "<!-- sweep tables: generated by benchmarks/selection_cost.py --docs -->", "<!-- end of sweep tables -->"


def merge(parts: list[str], name: str) -> None:
    """Rows of several sweep runs (``--out`` directories, e.g. one per dtype or shape group) into
    ``results/{name}.{json,md,png}``."""
    runs = [json.loads((Path(p) / "selection_sweep.json").read_text()) for p in parts]
    write_results(RESULTS / name, {"what": [run["what"] for run in runs], "before": runs[0]["before"],
                                   "memory": [run.get("memory", RSS_MEMORY) for run in runs],
                                   "rows": [r for run in runs for r in run["rows"]]})


SUMMARY = ("<!-- sweep summary: generated by benchmarks/selection_cost.py --docs -->", "<!-- end of sweep summary -->")


def write_docs(name: str) -> None:
    """Replace the generated summary and tables in ``docs/selection_cost.md`` with those of
    ``results/{name}.json``."""
    from tokenprune.bench import selection_report as report

    rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
    text = DOCS.read_text()
    for (begin, end), block in (((BEGIN, END), report.docs_section(rows)), (SUMMARY, report.summary(rows))):
        head, rest = text.split(begin)
        text = f"{head}{begin}\n\n{block}\n{end}{rest.split(end)[1]}"
    DOCS.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="the scaling sweep instead of the per-method table")
    parser.add_argument("--configs", default="bfloat16x1,bfloat16x2,float32x1,float32x2",
                        help="comma list of DTYPExTHREADS, run in this order")
    parser.add_argument("--shapes", default=None, help="comma list of shape labels (default: all)")
    parser.add_argument("--reference-max-n", type=int, default=1152, help="largest N timed for the naive references")
    parser.add_argument("--before", default=None, help="git revision of the previous selectors (the 'before' column)")
    parser.add_argument("--before-max-n", type=int, default=2880)
    parser.add_argument("--later-max-n", type=int, default=1152,
                        help="largest N of the naive references and the previous selectors after the first config")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--memory", default=None, metavar="DIR", help="re-measure the memory of the sweep saved in "
                        "DIR (selection_sweep.json) and rewrite its files")
    parser.add_argument("--no-memory-pass", action="store_true", help="keep the timed runs' resident-set peaks "
                        "instead of re-measuring each selector's memory after them")
    parser.add_argument("--merge", nargs="+", default=None, help="sweep --out directories to merge into --name")
    parser.add_argument("--name", default="selection_sweep_scaled", help="results/NAME.{json,md,png} to merge into "
                        "or to write the docs' tables from")
    parser.add_argument("--docs", action="store_true", help="rewrite the tables of docs/selection_cost.md from "
                        "results/NAME.json")
    args = parser.parse_args()
    if args.memory:
        remeasure_memory(args.memory)
    if args.merge:
        merge(args.merge, args.name)
    if args.docs:
        write_docs(args.name)
    if args.sweep:
        run_sweep(args)
    elif not (args.merge or args.docs or args.memory):
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            main(["bench-selection", "--sizes", "576,2880", "--dim", "4096", "--dtype", "bfloat16", "--repeats", "5",
                  "--reference-repeats", "3",
                  "--threads", "2", "--json", str(RESULTS / "selection_cost.json")])
        print(table.getvalue(), end="")
        (RESULTS / "selection_cost.txt").write_text(table.getvalue())
