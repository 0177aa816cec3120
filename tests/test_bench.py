"""tokenprune flops / bench / bench-selection: output schema and the correctness of what they report (not speed)."""

import csv
import io
import json

import pytest
import torch

from tokenprune import disable_pruning, enable_pruning
from tokenprune import functional as F
from tokenprune.bench import selection
from tokenprune.bench.measure import cache_bytes, peak_memory
from tokenprune.bench.models import load
from tokenprune.bench.plots import plot_sweep
from tokenprune.bench.references import REFERENCES, cdpruner_naive, divprune_naive, kcenter_naive, mmtok_naive
from tokenprune.bench.report import COLUMNS
from tokenprune.bench.run import prefill, vision_tower
from tokenprune.budget.flops import kv_bytes, prefill_flops, preset
from tokenprune.cli import main

REQUIRED = ("method", "keep", "visual_tokens", "kept_tokens", "tflops_unpruned", "tflops_pruned",
            "prefill_ms_unpruned", "prefill_ms_pruned", "prefill_ms_limit", "decode_ms_unpruned", "decode_ms_pruned",
            "peak_mem_unpruned", "peak_mem_pruned", "kv_bytes_unpruned", "kv_bytes_pruned")


@pytest.mark.parametrize("command", ["flops", "bench", "bench-selection", "bench-decoder"])
def test_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: tokenprune {command}" in capsys.readouterr().out


def test_flops_command_json_and_line(capsys):
    argv = ["flops", "--model", "llava-1.5-7b", "--tokens-per-layer", "576x2,288x30", "--formula", "pdrop"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tflops"] == pytest.approx(2.0075, abs=1e-4)
    assert out["tflops_unpruned"] == pytest.approx(3.8172, abs=1e-4)
    assert out["kv_bytes"] == 512 * 1024 // 32 * (576 * 2 + 288 * 30) and out["schedule"] == "576x2,288x30"
    assert len(out["tokens_per_layer"]) == 32 and out["avg_tokens"] == 306
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "2.007 TFLOPs" in line and "52.6%" in line and "KV cache 160.4 MB fp16" in line
    assert main(["flops", "--model", "qwen2-vl-7b", "--tokens-per-layer", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_bytes"] == 1000 * 56 * 1024


@pytest.mark.parametrize("argv, message", [
    (["--tokens-per-layer", "576x31"], "31 layers"), (["--model", "llava-9b"], "presets: llava-1.5-7b"),
    (["--formula", "f5"], "unknown FLOPs formula"), (["--tokens-per-layer", "a,b"], "576x2,288x30"),
])
def test_flops_command_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["flops", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_end_to_end_on_a_tiny_model(tmp_path, capsys):
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    argv = ["bench", "--model", "tiny", "--method", "divprune,fastervlm", "--keep", "16", "--flops", "0.5",
            "--repeats", "2", "--warmup", "0", "--decode-tokens", "3", "--threads", "1", "--no-progress",
            "--json", str(json_path), "--csv", str(csv_path)]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # restored
    table = capsys.readouterr().out
    assert "unpruned" in table and "divprune keep=16" in table and "fastervlm flops=0.5" in table
    rows = json.loads(json_path.read_text())
    assert [(r["method"], r["keep"], r["flops"]) for r in rows] == [
        ("divprune", 16, None), ("fastervlm", 16, None), ("divprune", None, 0.5), ("fastervlm", None, 0.5)]
    shape = preset("llava-1.5-7b").__class__.from_config(load("tiny").model.config)
    for r in rows:
        budget_given = {"keep"} if r["flops"] is None else set()  # keep is empty for a flops= row (and vice versa)
        assert all(c in r for c in REQUIRED)
        assert [c for c in REQUIRED if r[c] is None] == ([] if budget_given else ["keep"])
        assert r["visual_tokens"] == 64 and r["seq_len_pruned"] == r["seq_len_unpruned"] - 64 + r["kept_tokens"]
        assert r["tflops_unpruned"] == pytest.approx(prefill_flops(shape, r["seq_len_unpruned"]) / 1e12)
        assert r["tflops_pruned"] == pytest.approx(prefill_flops(shape, r["seq_len_pruned"]) / 1e12)
        for kind, length in (("unpruned", r["seq_len_unpruned"]), ("pruned", r["seq_len_pruned"])):
            assert r[f"kv_bytes_{kind}"] == r[f"kv_bytes_analytic_{kind}"] == kv_bytes(shape, length, 4)
        for t in ("prefill_ms_unpruned", "prefill_ms_pruned", "prefill_ms_limit", "decode_ms_pruned", "ttft_ms_pruned"):
            assert 0 < r[f"{t}_min"] <= r[t] <= r[f"{t}_max"]
        assert r["overhead"] == pytest.approx(r["prefill_ms_pruned"] / r["prefill_ms_limit"])
        assert r["speedup"] == pytest.approx(r["prefill_ms_unpruned"] / r["prefill_ms_pruned"])
        assert r["repeats"] == 2 and r["threads"] == 1 and "tiny" in r["model"]
    assert [r["kept_tokens"] for r in rows[:2]] == [16, 16]
    assert all(r["tflops_pruned"] <= 0.5 * r["tflops_unpruned"] for r in rows[2:])
    parsed = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert tuple(parsed[0]) == COLUMNS and [p["kept_tokens"] for p in parsed] == [str(r["kept_tokens"]) for r in rows]
    pngs = plot_sweep(rows, tmp_path, "tiny")
    assert [p.name for p in pngs] == ["tiny_flops_vs_latency.png", "tiny_tokens_vs_latency.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_limit_run_is_the_pruned_model_without_selection():
    """The limit's LLM input is the pruned call itself (same logits); its vision part is the full tower."""
    bm = load("tiny")
    model, inputs = bm.model, bm.inputs
    handle = enable_pruning(model, "divprune", keep=9)
    try:
        with torch.no_grad():
            pruned = prefill(model, inputs).logits
            limit_inputs = handle._adapter.prune(dict(inputs)).kwargs
            assert "pixel_values" not in limit_inputs and int(limit_inputs["input_ids"].eq(
                model.config.image_token_id).sum()) == 9
            assert torch.equal(prefill(model, limit_inputs).logits, pruned)
            features = vision_tower(model, inputs)().pooler_output
    finally:
        disable_pruning(model)
    assert [f.shape[0] for f in features] == [64]


def test_bench_config_file_and_bad_method(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "tiny", "method": "uniform", "keep": [8], "repeats": 1, "warmup": 0,
                                  "decode_tokens": 1, "threads": 1, "no_progress": True}))
    assert main(["bench", "--config", str(config), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["method"] == "uniform" and row["kept_tokens"] == 8 and row["decode_ms_pruned"] is None
    with pytest.raises(SystemExit):
        main(["bench", "--method", "fastv9"])
    assert "known methods" in capsys.readouterr().err


def test_peak_memory_and_cache_bytes():
    peak = peak_memory(lambda: torch.ones(16 * 2**20).sum(), torch.device("cpu"))  # 64 MiB
    assert peak is not None and 48 * 2**20 <= peak < 256 * 2**20
    bm = load("tiny")
    with torch.no_grad():
        cache = prefill(bm.model, bm.inputs).past_key_values
    assert cache_bytes(cache) == 2 * 2 * 2 * 32 * bm.inputs["input_ids"].shape[1] * 4  # 2 layers, K+V, 2 heads x 32


@pytest.mark.parametrize("seed, n, k, duplicates", [(0, 50, 7, False), (1, 40, 39, False), (2, 30, 12, True)])
def test_divprune_naive_reference_matches(seed, n, k, duplicates):
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    if duplicates:
        x[10:20] = x[0]
    assert torch.equal(divprune_naive(x, k), F.divprune(x, k))


@pytest.mark.parametrize("seed", range(6))
def test_greedy_naive_references_match(seed):
    """k-center (both rules), CDPruner (both signs) and MMTok (with and without text) == their textbook greedy.
    CDPruner only on a full-rank kernel (D > N, no duplicates): past the kernel's rank the residuals are rounding
    noise and both implementations pick by it."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(8, 70, (1,), generator=g))
    k = int(torch.randint(1, n, (1,), generator=g))
    x, text, vh = torch.randn(n, 80, generator=g), torch.randn(3, 80, generator=g), torch.randn(n, 24, generator=g)
    if seed % 2:
        x[1:4] = x[0]  # duplicates: exact ties
    pivot = int(torch.randint(n, (1,), generator=g))
    assert torch.equal(kcenter_naive(x, k, pivot), F.kcenter(x, k, pivot))
    assert torch.equal(kcenter_naive(x, k, pivot, "maxsum"), F.kcenter(x, k, pivot, rule="maxsum"))
    y = torch.randn(n, 80, generator=g)
    relevance = F.instruction_relevance(y, text)
    assert torch.equal(cdpruner_naive(y, relevance, k), F.cdpruner(y, relevance, k))
    assert torch.equal(cdpruner_naive(y, relevance, k, quirks=False), F.cdpruner(y, relevance, k, quirks=False))
    assert torch.equal(mmtok_naive(x, text, k, vh, tv_temp=0.05), F.mmtok(x, text, k, vh, tv_temp=0.05))
    assert torch.equal(mmtok_naive(x, text[:0], k), F.mmtok(x, text[:0], k))


def test_mmtok_lazy_greedy_refreshes_past_ties():
    """Many tokens with equal gains (more than one refresh block): the lazy greedy still picks the lowest index."""
    x = torch.eye(6).repeat_interleave(20, dim=0)  # 120 tokens, 6 groups of 20 identical ones
    assert F.mmtok(x, x[:0], 6).tolist() == mmtok_naive(x, x[:0], 6).tolist() == [0, 20, 40, 60, 80, 100]


def test_selection_micro_benchmark_covers_every_method():
    rows = selection.run(sizes=(64,), d=32, repeats=1, warmup=0, layer=False, progress=False)
    from tokenprune.methods import METHODS

    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    div = next(r for r in rows if r["method"] == "divprune")
    assert div["k"] == 7 and div["ms"] > 0 and div["reference_ms"] > 0  # the same-output check ran
    assert {r["method"] for r in rows if "reference_speedup" in r} == set(REFERENCES) >= {
        "divprune", "kcenter", "cdpruner", "mmtok"}
    assert "divprune" in selection.format_table(rows)
    layer = selection.layer_ms(8, torch.float32, selection.Timer(torch.device("cpu")), 0, 1, hidden=64,
                               intermediate=128, heads=4)
    assert len(layer) == 1 and layer[0] > 0


def test_selection_micro_benchmark_reports_methods_it_cannot_run(monkeypatch):
    from dataclasses import dataclass

    from tokenprune.methods import METHODS, PruningMethod

    @dataclass
    class NeedsAudio(PruningMethod):
        name = "needsaudio"
        paper = "test"
        needs = frozenset({"audio"})

    @dataclass
    class Broken(PruningMethod):
        name = "broken"
        paper = "test"

        def select(self, ctx):
            raise NotImplementedError("not yet")

    monkeypatch.setitem(METHODS, "needsaudio", NeedsAudio)
    monkeypatch.setitem(METHODS, "broken", Broken)
    rows = selection.run(sizes=(16,), d=8, repeats=1, warmup=0, layer=False, progress=False,
                         methods=["needsaudio", "broken", "random"])
    assert [r.get("skipped") for r in rows] == [
        "no synthetic generator for signal 'audio'", "NotImplementedError: not yet", None]


def test_decoder_cost_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """Every decoder-stage method runs; the recomputation is timed inside the prefill, the eager route agrees."""
    from tokenprune.bench.decoder_cost import decoder_methods

    json_path, md_path = tmp_path / "d.json", tmp_path / "d.md"
    assert main(["bench-decoder", "--layers", "32", "--keep", "16", "--repeats", "1", "--warmup", "0",
                 "--no-progress", "--json", str(json_path), "--markdown", str(md_path)]) == 0
    rows = json.loads(json_path.read_text())
    assert [r["method"] for r in rows] == decoder_methods() and {"fastv", "pdrop"} <= set(decoder_methods())
    assert not [r for r in rows if "skipped" in r]  # 32 layers: every decoder method's default plan fits
    for r in rows:
        assert r["visual_tokens"] == 64 and 0 < r["kept_tokens"] < 64 and r["visual_per_layer"][0] == 64
        assert 0 < r["prefill_ms_pruned"] and r["prefill_ms_unpruned"] > 0
        assert 0 <= r["rows_ms"] <= r["select_ms"] < r["prefill_ms_pruned"]
        assert 0 <= r["rows_fraction"] <= r["select_fraction"] < 1
        if r["rows_calls"]:  # a method scoring by attention rows: the eager route ran and agrees (fp32)
            assert r["score_layers_ms_eager"] > 0 and r["score_layers_ms_sdpa"] > 0
            assert r["scores_max_abs_diff"] < 1e-5 and r["selection_identical"] and r["kept_agreement"] == 1.0
    fastv = next(r for r in rows if r["method"] == "fastv")
    assert fastv["stages"] == [[2, 1]] and fastv["kept_tokens"] == 16 and fastv["rows_calls"] == 1
    table = md_path.read_text()
    assert table.startswith("| method |") and "| fastv | (2, 1) | 16/64 |" in table
    with pytest.raises(SystemExit):
        main(["bench-decoder", "--method", "divprune"])
    assert "not decoder-stage methods" in capsys.readouterr().err


def test_decoder_cost_probe_leaves_the_mechanism_as_it_was():
    import tokenprune.patches.decoder_loop as decoder
    import tokenprune.patches.decoder_select as decoder_select
    from tokenprune.bench.decoder_cost import Probe

    before = decoder.select_stage, decoder_select.attention_rows
    with Probe(lambda: None).installed():
        assert (decoder.select_stage, decoder_select.attention_rows) != before
    assert (decoder.select_stage, decoder_select.attention_rows) == before


def test_decoder_cost_reports_a_method_whose_plan_does_not_fit():
    from tokenprune.bench import decoder_cost

    rows = decoder_cost.run(load("tiny", layers=2), ["fastv"], 16, repeats=1, warmup=0, unpruned=False,
                            progress=False)
    assert rows[0]["method"] == "fastv"
    assert "do not exist in the 'llava' model's 2-layer language model" in rows[0]["skipped"]
    assert "| fastv | skipped: ValueError" in decoder_cost.format_markdown(rows)


def test_width_divisor_narrows_the_preset_llm_and_keeps_the_head_dim():
    from tokenprune.bench.models import load

    bm = load("llava-1.5-7b", layers=1, vision_layers=1, width_divisor=8)
    text = bm.model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads, text.head_dim) == (512, 1376, 4, 128)
    assert bm.shape.hidden_size == 512 and "d=512" in bm.description
    with pytest.raises(ValueError, match="width_divisor must divide"):
        load("llava-1.5-7b", layers=1, vision_layers=1, width_divisor=3)
    with pytest.raises(ValueError, match="applies to the presets"):
        load("tiny", width_divisor=2)
