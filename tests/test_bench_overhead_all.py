"""The all-methods overhead harness (benchmarks/overhead_all.py) on a tiny 32-layer LLaVA: each kind of limit is
the pruned model's own work with the kept tokens given (same logits, same kept tokens, nothing left installed),
and the run is resumable and writes its table, CSV and plot."""

import json

import pytest
import torch

from tokenprune.api import disable_pruning, enable_pruning
from tokenprune.bench import overhead_all as oa
from tokenprune.bench.limits import limit_for, prefill
from tokenprune.bench.models import load


@pytest.fixture(scope="module")
def deep_tiny():
    return load("tiny", layers=32)  # every decoder-stage method's default layers exist


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("method, kind", [("divprune", "vision"), ("flowcut", "encoder"), ("transprune", "decoder"),
                                          ("todre", "vision+decoder")])
def test_limit_is_the_pruned_prefill_with_the_kept_tokens_given(deep_tiny, method, kind):
    model, inputs = deep_tiny.model, deep_tiny.inputs
    handle = enable_pruning(model, method, keep=0.25)
    try:
        with torch.inference_mode():
            pruned = prefill(model, inputs).logits
            kept = [r.kept.clone() for r in handle.last.images]
            hooks = _hooks(model)
            limit = limit_for(handle, model, inputs)
            assert limit.kind == kind
            limit.enter()
            try:
                assert torch.equal(limit.run().logits, pruned)  # the same LLM work on the same kept tokens
                if kind == "decoder":  # the loop replayed the recorded choices: the same record (two-stage records
                    # are relative to the k-token input the limit starts from)
                    assert all(
                        torch.equal(a, b) for a, b in zip(kept, [r.kept for r in handle.last.images], strict=True))
            finally:
                limit.leave()
            if kind == "encoder":  # the tower's schedule with the kept patches given = the features the LLM got
                given = limit.tower()
                assert all(torch.equal(a, b) for a, b in zip(
                    given, limit.inputs["mm_encoder_outputs"]["image"].pooler_output, strict=True))
            method_obj = handle._adapter.decoder.method if handle._adapter.decoder else handle._adapter.method
            assert "select_stage" not in vars(method_obj) and "observed_layers" not in vars(method_obj)
            assert _hooks(model) == hooks
            assert torch.equal(prefill(model, inputs).logits, pruned)  # the method selects again after leave()
    finally:
        disable_pruning(model)


def test_run_all_is_resumable_and_writes_its_report(deep_tiny, tmp_path):
    torch.set_num_threads(1)
    path, lines = tmp_path / "o.json", []
    data = oa.run_all(deep_tiny, path, ["divprune", "fastv"], [0.25], repeats=1, warmup=0, log=lines.append)
    rows = data["rows"]
    assert [(r["method"], r["keep"]) for r in rows] == [("divprune", 0.25), ("fastv", 0.25)]
    for r in rows:
        assert r["overhead"] == pytest.approx(r["prefill_ms_pruned"] / r["prefill_ms_limit"])
        assert r["selection_ms"] > 0 and r["kept_tokens"] < r["visual_tokens"] == 64
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(rows))
    lines.clear()
    again = oa.run_all(deep_tiny, path, ["divprune", "fastv", "random"], [0.25], repeats=1, warmup=0,
                       log=lines.append)
    assert [line.split("]")[1].split(":")[0].strip() for line in lines] == ["random keep=0.25"]  # only the new one
    assert len(again["rows"]) == 3
    with pytest.raises(ValueError, match="measured on"):
        oa.run_all(deep_tiny, path, ["divprune"], [0.25], repeats=2, warmup=0, log=lines.append)
    md, csv_path, png = oa.write_outputs(again, [0.25, 0.5], tmp_path / "o")
    table = md.read_text()
    assert "| divprune | vision |" in table and "| fastv | decoder |" in table and "not run" in table
    assert csv_path.read_text().count("\n") == 4 and png.read_bytes()[:4] == b"\x89PNG"


def test_side_by_side_puts_two_runs_of_a_method_next_to_each_other():
    context = {"model": "m", "threads": 1, "repeats": 3, "warmup": 1}

    def run(ratio, ms):
        return {"context": context, "rows": [{"method": "fopru", "keep": 0.11, "overhead": ratio,
                                              "selection_ms": ms}]}

    table = oa.side_by_side(run(1.066, 0.2), run(1.031, 0.2), [0.11, 0.5])
    assert "| fopru | vision | **1.066** (0.2) | 1.031 (0.2) | not run | not run |" in table
    assert table.count("m; 1 threads, median of 3") == 2  # both runs' contexts
