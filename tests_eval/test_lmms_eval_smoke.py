"""The real lmms-eval CLI on tiny saved models and a generated local task: pruned models run end to end and the
results say what was pruned. Runs in .venv-eval (``make eval-test``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TASK, save_tiny_gemma3, save_tiny_internvl, save_tiny_onevision, save_tiny_qwen

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


def doc_sizes(task_dir: Path) -> list[tuple[int, int]]:
    """(height, width) of every doc's picture, in doc order."""
    from datasets import load_from_disk

    return [(im.height, im.width) for im in load_from_disk(str(task_dir.parent / "data"))["test"]["image"]]


def expected_onevision_tokens(height: int, width: int, pinpoints: list[list[int]], tile: int = 32, side: int = 4,
                              max_crops: int = 9) -> int:
    """LLaVA-OneVision's visual tokens for one image (LLaVA-NeXT's AnyRes, ``anyres_max_9``): the base tile's
    ``side**2`` tokens, then the crop grid of the pinpoint that keeps the most of the image (least waste on ties),
    unpadded to the image's aspect ratio, bilinearly shrunk when it holds more than ``1.1**2 x max_crops`` tiles'
    worth, and one newline per row."""
    def fit(pin: list[int]) -> tuple[int, int]:
        scale = min(pin[1] / width, pin[0] / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        return effective, -(pin[0] * pin[1] - effective)

    best = max(pinpoints, key=fit)
    rows, cols = side * best[0] // tile, side * best[1] // tile
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * cols / width, 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * rows / height, 7))) // 2)
    ratio = math.sqrt(rows * cols / (max_crops * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side**2 + rows * cols + rows


def expected_internvl_tiles(height: int, width: int, max_tiles: int, tile: int = 64) -> int:
    """InternVL's dynamic tiling (``crop_to_patches``): the grid (columns x rows, at most ``max_tiles``, by area) whose
    aspect ratio is closest to the image's, ties going to the larger grid while the image covers more than half of
    it; plus a thumbnail when there is more than one tile."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
                   key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff or (diff == best_diff and width * height > 0.5 * tile * tile * cols * rows):
            best, best_diff = (cols, rows), diff
    n = best[0] * best[1]
    return n + 1 if n > 1 else n


def check_half_kept(samples: list[dict], expected: list[int], results: dict, pad_multiple: int = 1) -> None:
    """Visual tokens per doc as ``expected``, half of them kept (rounded half up), the prompt shortened by the
    pruned ones (and by its left padding when the wrapper pads prompts to a multiple of ``pad_multiple``: a lone
    pruned row needs none)."""
    by_doc = {s["doc_id"]: r for s, r in zip(samples, pruning_records(samples), strict=True)}
    assert [by_doc[i]["visual_tokens"] for i in range(N_DOCS)] == expected
    assert [by_doc[i]["kept_tokens"] for i in range(N_DOCS)] == [round(n / 2 + 1e-9) for n in expected]
    for r in by_doc.values():
        padding = r["seq_len_before"] - r["seq_len_after"] - (r["visual_tokens"] - r["kept_tokens"])
        assert 0 <= padding < pad_multiple and r["seq_len_before"] % pad_multiple == 0
    assert "accuracy,none" in results["results"][TASK]


def test_onevision_pruned_run_through_llava_hf(task_dir, workdir):
    """LLaVA-OneVision through ``tokenprune_llava_hf`` (lmms-eval's ``llava_hf`` loads
    ``LlavaOnevisionForConditionalGeneration`` by the config's model_type): image-only ``LlavaOnevisionProcessor``
    without torchvision, AnyRes token counts per picture, pruned to half."""
    from tokenprune.tiny_onevision import ONEVISION_PINPOINTS

    pretrained = save_tiny_onevision(workdir / "tiny_onevision")
    args = f"pretrained={pretrained},device=cpu,device_map=cpu,dtype=float32,method=divprune,keep=0.5"
    results, samples = run_lmms_eval("tokenprune_llava_hf", args, task_dir, workdir / "out_onevision")
    expected = [expected_onevision_tokens(h, w, ONEVISION_PINPOINTS) for h, w in doc_sizes(task_dir)]
    assert len(set(expected)) > 1
    check_half_kept(samples, expected, results)


def test_internvl_pruned_run_with_tiles(large_task_dir, workdir):
    """InternVL3 through ``tokenprune_internvl_hf`` (chat; image-only ``InternVLProcessor`` without torchvision):
    ``max_patches=6`` tiles the 128 px wide pictures into 2 x 2 or 2 x 3 tiles plus a thumbnail, 16 tokens per tile."""
    from tokenprune.tiny_internvl import TOKENS_PER_TILE

    pretrained = save_tiny_internvl(workdir / "tiny_internvl")
    args = f"pretrained={pretrained},device=cpu,device_map=cpu,max_patches=6,method=divprune,keep=0.5"
    results, samples = run_lmms_eval("tokenprune_internvl_hf", args, large_task_dir, workdir / "out_internvl")
    tiles = [expected_internvl_tiles(h, w, max_tiles=6) for h, w in doc_sizes(large_task_dir)]
    assert sorted(set(tiles)) == [5, 7]
    check_half_kept(samples, [TOKENS_PER_TILE * n for n in tiles], results)


def test_gemma3_pruned_run(task_dir, workdir):
    """Gemma 3 through ``tokenprune_gemma3`` (simple; the real ``Gemma3Processor``): every picture resized to the
    tower's square input, its patches average-pooled to ``mm_tokens_per_image`` tokens, pruned to half."""
    from tokenprune.tiny_gemma3 import IMAGE_SIZE, PATCH

    pretrained = save_tiny_gemma3(workdir / "tiny_gemma3")
    config = json.loads((pretrained / "config.json").read_text())
    pooled_side = math.isqrt(config["mm_tokens_per_image"])
    assert (IMAGE_SIZE // PATCH) % pooled_side == 0
    args = f"pretrained={pretrained},device=cpu,device_map=cpu,method=divprune,keep=0.5"
    results, samples = run_lmms_eval("tokenprune_gemma3", args, task_dir, workdir / "out_gemma3")
    check_half_kept(samples, [pooled_side**2] * N_DOCS, results, pad_multiple=8)  # lmms-eval's gemma3 pads to 8


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
