"""The selection-cost sweep (``benchmarks/selection_cost.py --sweep``): its rows, memory pass, thread handling and
inputs (:mod:`tokenprune.bench.selection_sweep`), its report (:mod:`tokenprune.bench.selection_report`), and the
docs tables generated from the committed results."""

import pytest
import torch

from tokenprune import functional as F

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only spins on a loaded machine


def test_scaling_sweep_rows_plot_and_table(tmp_path):
    """The sweep on tiny shapes: every selector has a time and a peak, the naive references and the previous
    implementation ran (same indices asserted inside), and the plot and table are written."""
    from tokenprune.bench import selection_report as report
    from tokenprune.bench import selection_sweep as sweep
    from tokenprune.bench.references import REFERENCES

    shapes = (sweep.Shape("a", 36, 16, "llama-7b"), sweep.Shape("b", 72, 16, "llama-7b"))
    before = {"divprune": lambda ctx: F.divprune(ctx.signal("features"), ctx.k)}
    rows = sweep.sweep("float32", 1, shapes, ("divprune", "kcenter", "holov"), before=before, layer=False,
                       log=lambda line: None)
    assert [(r["n"], r["method"]) for r in rows] == [(n, m) for n in (36, 72) for m in ("divprune", "kcenter", "holov")]
    assert all(r["ms"] > 0 and r["k"] == round(r["n"] / 9) for r in rows)
    assert {r["method"] for r in rows if "reference_ms" in r} == {"divprune", "kcenter"} <= set(REFERENCES)
    assert all(r["same_as_before"] for r in rows if r["method"] == "divprune")
    for r in rows:  # fake layer timings for the plot and the table
        r.update(layer_ms=100.0, fraction_of_layer=r["ms"] / 100.0)
    rows += [{**rows[0], "method": "layer", "ms": 100.0, "peak_bytes": None}]
    report.plot(rows, str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 0
    table = report.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| divprune |" in table and "**one 7B layer**" in table
    summary = report.before_after(rows, "float32", 1)
    assert "| divprune | 36 |" in summary and "| yes |" in summary and "N = a: 100 ms" in summary


def test_sweep_restores_threads_and_shows_the_clustered_shape():
    """The sweep runs on the threads it is given and gives the caller's count back; a shape with a note (the
    clustered features) is labelled in the tables and kept off the plot's N axis."""
    from tokenprune.bench import selection_report as report
    from tokenprune.bench import selection_sweep as sweep

    previous = torch.get_num_threads()
    wanted = 2 if previous == 1 else 1
    shapes = (sweep.Shape("72-clustered", 72, 16, "llama-7b", note="clustered", clustered=True),)
    rows = sweep.sweep("float32", wanted, shapes, ("divprune", "kcenter"), layer=False, log=lambda line: None)
    assert torch.get_num_threads() == previous
    assert [r["threads"] for r in rows] == [wanted, wanted] and all(r["note"] == "clustered" for r in rows)
    assert "| 72 (clustered) |" in report.markdown(rows)


def test_memory_pass_measures_each_selector_again():
    """After the timed runs the sweep re-measures each selector's (and the previous implementation's) peak as the
    tensor memory it holds; the timed runs' resident-set peaks stay in the row. DivPrune at 576 tokens of width 256
    holds at least its fp32 unit rows and its whole similarity matrix."""
    from tokenprune.bench import selection_sweep as sweep

    shapes = (sweep.Shape("s", 576, 256, "llama-7b"),)
    before = {"divprune": lambda ctx: F.divprune(ctx.signal("features"), ctx.k)}
    rows = sweep.sweep("float32", 1, shapes, ("divprune", "holov"), before=before, layer=False, log=lambda line: None)
    sweep.memory_pass(rows, shapes, before, log=lambda line: None)
    divprune, holov = rows
    assert all("rss_peak_in_sweep_bytes" in r for r in rows)
    assert divprune["peak_bytes"] >= 576 * 256 * 4 + 576 * 576 * 4 <= divprune["before_peak_bytes"]
    assert "before_rss_peak_in_sweep_bytes" in divprune
    assert 0 < holov["peak_bytes"] < divprune["peak_bytes"]  # chunk-local


def test_tensor_peak_bytes_counts_what_a_call_holds_at_once():
    from tokenprune.bench.measure import tensor_peak_bytes

    def call() -> torch.Tensor:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB held
        del a
        return b + 1  # 8 MB held again, never 12

    assert 8_000_000 <= tensor_peak_bytes(call) < 8_001_000  # + the scalars' few bytes


def test_clustered_features_have_near_twins():
    """The clustered shape's tokens each have a near twin (nearest cosine about 0.8), the Gaussian ones none (about
    0.3 at D = 256): the two ends of DivPrune's first-pick cost."""
    from tokenprune.bench.selection_sweep import clustered_features

    def nearest(x: torch.Tensor) -> torch.Tensor:
        sim = F.cosine_distance(x).neg_().add_(1.0).fill_diagonal_(-1.0)
        return sim.max(dim=1).values

    clustered = nearest(clustered_features(360, 256, torch.float32))
    gaussian = nearest(torch.randn(360, 256, generator=torch.Generator().manual_seed(0)))
    assert clustered.min() > 0.6 > 0.4 > gaussian.max()


def test_verdict_quotes_each_size_and_the_floor():
    """The verdict's reasons give their figures at both sizes (N = 2,880 / 7,290), and the floor of an exact greedy
    (k fp32 rows in one product) as a share of each size's layer."""
    from tokenprune.bench.selection_report import verdict

    rows = []
    for n, layer in ((2880, 1000.0), (7290, 5000.0)):
        base = {"shape": str(n), "n": n, "d": 4096, "k": round(n / 9), "dtype": "bfloat16", "threads": 1,
                "memory_budget_bytes": 2 * n * 4096 * 4}
        rows += [{**base, "method": "layer", "ms": layer, "floor_fp32_ms": layer / 40, "floor_dtype_ms": layer / 200},
                 {**base, "method": "kcenter", "ms": layer / 10, "peak_bytes": 2**20, "reference_speedup": 4.0}]
    text = verdict(rows, "bfloat16", 1)
    assert "k N D = 3.8 / 24.2 G MACs" in text  # 320 x 2,880 x 4,096 and 810 x 7,290 x 4,096
    assert "N = 2,880: 25.0 ms = **2.50 %** of the layer (bfloat16: 5.0 ms = 0.50 %)" in text
    assert "N = 7,290: 125.0 ms = **2.50 %**" in text
    assert "| kcenter | 10.00 | 4.0 | no | 10.00 | 1 (228) | no |" in text


def test_docs_sweep_tables_are_generated_from_the_committed_results():
    """docs/selection_cost.md's tables and its summary are ``docs_section`` and ``summary`` of the committed sweep
    JSON, not hand-kept (``python benchmarks/selection_cost.py --docs`` rewrites them)."""
    import json
    from pathlib import Path

    from tokenprune.bench.selection_report import docs_section, summary

    root = Path(__file__).resolve().parent.parent
    rows = json.loads((root / "benchmarks/results/selection_sweep_scaled.json").read_text())["rows"]
    section = docs_section(rows)
    docs = (root / "docs/selection_cost.md").read_text()
    assert section in docs and summary(rows) in docs and summary(rows).count("| divprune | ") == 1
    assert all(section.count(f"| {name} | ") >= 2 for name in ("divprune", "kcenter", "cdpruner", "mmtok"))
