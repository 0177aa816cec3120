"""The real lmms-eval CLI on tiny saved models and a generated local task: pruned models run end to end and the
results say what was pruned. Runs in .venv-eval (``make eval-test``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TASK, save_tiny_qwen

N_DOCS = 6
TINY_LLAVA_TOKENS = 64  # 8x8 patches per image


def run_lmms_eval(model: str, model_args: str, task_dir: Path, out: Path) -> tuple[dict, list[dict]]:
    """``python -m lmms_eval eval ...``; returns the results JSON and the logged samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", model, "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "1", "--output_path", str(out),
           "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"lmms-eval failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = sorted(out.rglob("*_results.json"))
    assert len(results) == 1, f"expected one results file under {out}: {results}\n{proc.stdout[-2000:]}"
    samples = sorted(out.rglob(f"*samples_{TASK}*.jsonl"))
    assert len(samples) == 1, f"expected one samples file under {out}: {list(out.rglob('*'))}"
    lines = samples[0].read_text().splitlines()
    return json.loads(results[0].read_text()), [json.loads(line) for line in lines]


def pruning_records(samples: list[dict]) -> list[dict]:
    return [s["token_counts"][0]["tokenprune"] for s in samples]


@pytest.fixture(scope="module")
def llava_pruned(llava_dir, task_dir, workdir):
    args = f"pretrained={llava_dir},device=cpu,device_map=cpu,dtype=float32,method=divprune,keep=0.25"
    return run_lmms_eval("tokenprune_llava_hf", args, task_dir, workdir / "out_llava_divprune")


def test_llava_pruned_run_logs_the_pruning_record(llava_pruned):
    results, samples = llava_pruned
    assert "accuracy,none" in results["results"][TASK]
    assert "method=divprune,keep=0.25" in results["config"]["model_args"]
    assert len(samples) == N_DOCS
    records = pruning_records(samples)
    assert [r["visual_tokens"] for r in records] == [TINY_LLAVA_TOKENS] * N_DOCS
    assert [r["kept_tokens"] for r in records] == [16] * N_DOCS  # 0.25 * 64
    for sample, r in zip(samples, records, strict=True):
        assert r["seq_len_before"] - r["seq_len_after"] == TINY_LLAVA_TOKENS - 16
        assert r["prefill_ms"] > 0
        assert sample["token_counts"][0]["input_tokens"] == r["seq_len_after"]
    throughput = results["throughput"]
    assert throughput["avg_tokenprune_kept_tokens"] == 16
    assert throughput["avg_tokenprune_visual_tokens"] == TINY_LLAVA_TOKENS


def test_llava_token_count_and_hyperparameter_reach_the_method(llava_dir, task_dir, workdir):
    args = f"pretrained={llava_dir},device=cpu,device_map=cpu,dtype=float32,method=random,keep=5,seed=3"
    results, samples = run_lmms_eval("tokenprune_llava_hf", args, task_dir, workdir / "out_llava_random")
    assert [r["kept_tokens"] for r in pruning_records(samples)] == [5] * N_DOCS


def test_llava_unpruned_run_records_the_full_count(llava_dir, task_dir, workdir):
    args = f"pretrained={llava_dir},device=cpu,device_map=cpu,dtype=float32"
    results, samples = run_lmms_eval("tokenprune_llava_hf", args, task_dir, workdir / "out_llava_unpruned")
    records = pruning_records(samples)
    assert [r["kept_tokens"] for r in records] == [TINY_LLAVA_TOKENS] * N_DOCS
    assert all(r["seq_len_before"] == r["seq_len_after"] for r in records)


def expected_qwen_tokens(task_dir: Path, max_pixels: int, patch: int = 14, min_pixels: int = 3136) -> list[int]:
    """Visual tokens per doc: one per ``2 patch`` x ``2 patch`` px (28 for Qwen2, 32 for Qwen3) of the image after
    qwen_vl_utils' smart resize."""
    from datasets import load_from_disk

    from tokenprune.integrations.qwen_images import smart_resize

    docs = load_from_disk(str(task_dir.parent / "data"))["test"]
    factor = 2 * patch
    sizes = [smart_resize(im.height, im.width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
             for im in docs["image"]]
    return [h * w // factor**2 for h, w in sizes]


@pytest.mark.parametrize("model", ["tokenprune_qwen2_vl", "tokenprune_qwen2_5_vl"])
def test_qwen_pruned_run_without_torchvision(model, qwen2_dir, qwen25_dir, task_dir, workdir):
    """The Qwen wrappers on this CPU venv (no torchvision): image-only processor and vision info, pruned."""
    pretrained = qwen2_dir if model == "tokenprune_qwen2_vl" else qwen25_dir
    max_pixels = 112 * 112
    args = (f"pretrained={pretrained},device=cpu,device_map=cpu,min_pixels=3136,max_pixels={max_pixels},"
            "method=divprune,keep=0.5")
    results, samples = run_lmms_eval(model, args, task_dir, workdir / f"out_{model}")
    records = pruning_records(samples)
    expected = expected_qwen_tokens(task_dir, max_pixels)
    by_doc = {s["doc_id"]: r for s, r in zip(samples, records, strict=True)}
    assert [by_doc[i]["visual_tokens"] for i in range(N_DOCS)] == expected
    assert [by_doc[i]["kept_tokens"] for i in range(N_DOCS)] == [round(n / 2 + 1e-9) for n in expected]
    assert "accuracy,none" in results["results"][TASK]


@pytest.mark.parametrize("model", ["tokenprune_qwen3_vl", "tokenprune_qwen3_5"])
def test_qwen3_pruned_run_without_torchvision(model, large_task_dir, workdir):
    """The Qwen3-VL and Qwen3.5 wrappers (chat) on this CPU venv: image-only ``Qwen3VLProcessor`` and vision info,
    patch 16 (one visual token per 32x32 px), pruned to half.

    lmms-eval's chat ``qwen3_vl``/``qwen3_5`` give images neither ``min_pixels`` nor ``max_pixels`` (only videos get
    them) and call the processor with ``do_resize=False``: images get qwen_vl_utils' default bounds (4 to 16384
    tokens), so the 112-176 x 128 px pictures keep their size: 16 or 24 tokens (20-30 at Qwen2's 28 px)."""
    pretrained = save_tiny_qwen(workdir / f"tiny_{model}", model.removeprefix("tokenprune_"))
    args = f"pretrained={pretrained},device=cpu,device_map=cpu,method=divprune,keep=0.5"
    results, samples = run_lmms_eval(model, args, large_task_dir, workdir / f"out_{model}")
    records = pruning_records(samples)
    expected = expected_qwen_tokens(large_task_dir, 16384 * 32**2, patch=16, min_pixels=4 * 32**2)
    assert sorted(set(expected)) == [16, 24]
    by_doc = {s["doc_id"]: r for s, r in zip(samples, records, strict=True)}
    assert [by_doc[i]["visual_tokens"] for i in range(N_DOCS)] == expected
    assert [by_doc[i]["kept_tokens"] for i in range(N_DOCS)] == [n // 2 for n in expected]
    for r in records:
        assert r["seq_len_before"] - r["seq_len_after"] == r["visual_tokens"] - r["kept_tokens"]
    assert "accuracy,none" in results["results"][TASK]


def test_aggregator_renders_the_smoke_runs(llava_pruned, workdir, tmp_path):
    """The paper-table aggregator on the smoke run's output folders (pruned and unpruned LLaVA)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lmms_eval" / "aggregate.py"
    spec = importlib.util.spec_from_file_location("aggregate", path)
    aggregate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aggregate)
    folders = [workdir / "out_llava_divprune", workdir / "out_llava_unpruned"]
    assert all(f.is_dir() for f in folders)
    table_json = tmp_path / "table.json"
    assert aggregate.main([*map(str, folders), "--metric", f"{TASK}=nonempty", "--json", str(table_json)]) == 0
    table = json.loads(table_json.read_text())
    rows = {r["setting"]: r for r in table["rows"]}
    assert set(rows) == {"unpruned", "divprune keep=0.25"}
    assert rows["unpruned"]["kept_tokens"] == TINY_LLAVA_TOKENS and rows["divprune keep=0.25"]["kept_tokens"] == 16
    scores = {}
    for folder in folders:
        (results_file,) = folder.rglob("*_results.json")
        scores[folder.name] = json.loads(results_file.read_text())["results"][TASK]["nonempty,none"]
    assert rows["divprune keep=0.25"][TASK] == scores["out_llava_divprune"]
    if scores["out_llava_unpruned"]:
        expected = 100 * scores["out_llava_divprune"] / scores["out_llava_unpruned"]
        assert abs(rows["divprune keep=0.25"][f"{TASK} %"] - expected) < 1e-9
        assert rows["unpruned"]["avg %"] == 100.0
    assert all(r["prefill_ms"] > 0 for r in rows.values())
    text = aggregate.render(table["tasks"], table["rows"])
    assert "| tiny_llava | divprune keep=0.25 |" in text and "prefill ms" in text.splitlines()[0]
