"""The serving benchmark's front end without vLLM: argument checks, the commands it would run (loopback only,
offline), its table and plot from a results record, and benchmarks/gpu.sh's dry mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenprune.cli import main as cli_main
from tokenprune.integrations.vllm.serve_bench import HOST, OFFLINE_ENV, Plan, check, serve_command
from tokenprune.integrations.vllm.serve_report import markdown, svg_ttft

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_type": "gemma3"}, "--model-type"),           # served, but serve-bench writes no Gemma 3 prompts
    ({"keeps": (0.5, 1.0)}, "--keeps"),
    ({"method": "fastv"}, "nearest method"),
    ({"model_type": "qwen2_5_vl", "method": "fastervlm"}, "without a [CLS] token"),
    ({"model_type": "llava_onevision", "method": "fastervlm"}, "without a [CLS] token"),  # SigLIP
    ({"concurrency": 8, "requests": 4}, "--concurrency"),
    ({"port": 80}, "--port"),
    ({"device": "tpu"}, "--device"),
])
def test_bad_arguments_are_refused_before_anything_starts(changes, message):
    plan = Plan(model="m", model_type="llava")
    check(plan)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check(Plan(**{"model": "m", "model_type": "llava", **changes}))


def test_server_listens_on_loopback_and_runs_offline():
    plan = Plan(model="m", model_type="qwen2_5_vl", method="hiprune", keeps=(0.25,))
    unpruned, pruned = serve_command(plan, None, "t.jinja"), serve_command(plan, 0.25, "t.jinja")
    assert unpruned[unpruned.index("--host") + 1] == HOST == "127.0.0.1"
    assert "--hf-overrides" not in unpruned
    overrides = json.loads(pruned[pruned.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["TokenpruneQwen2_5_VLForConditionalGeneration"],
                         "tokenprune": {"method": "hiprune", "keep": 0.25}}
    assert OFFLINE_ENV["HF_HUB_OFFLINE"] == "1" and OFFLINE_ENV["VLLM_NO_USAGE_STATS"] == "1"


def _results(ttft: dict[str, float]) -> dict:
    plan = {"model": "m", "model_type": "llava", "method": "divprune", "requests": 8, "concurrency": 2,
            "max_tokens": 4, "image_size": [336, 336], "device": "cpu"}
    server = {label: {"requests_per_s": 2.0 / t, "output_tokens_per_s": 8.0 / t, "ttft_p50_s": t,
                      "ttft_p99_s": 2 * t, "kv_blocks_peak": 40 * t} for label, t in ttft.items()}
    return {"plan": plan, "server": server, "offline": {}}


def test_table_gives_ratios_to_the_unpruned_row_and_the_plot_one_point_per_setting():
    ttft = {"unpruned": 0.8, "0.5": 0.4, "0.11": 0.1}
    table = markdown(_results(ttft))
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0.50 |" in rows["0.5"] and "| 0.12 |" in rows["0.11"]  # TTFT 0.4 / 0.8, 0.1 / 0.8 (rounded)
    assert rows["unpruned"].count("| 1.00 |") == 5
    svg = svg_ttft(_results(ttft))
    assert svg.count("<circle") == 2 * len(ttft) and svg.startswith("<svg")


def test_cli_dry_run_prints_one_server_per_setting(capsys):
    assert cli_main(["serve-bench", "--dry-run", "--model-type", "llava", "--method", "fastervlm",
                     "--keeps", "0.5", "0.25"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " --model " in line]
    assert len(lines) == 3 and sum("--hf-overrides" in line for line in lines) == 2


def test_gpu_script_dry_run_checks_its_arguments():
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    serves = [line for line in done.stdout.splitlines() if " --model " in line]
    assert len(serves) == 8  # 2 checkpoints x (unpruned + 3 keeps)
    assert all("--mm-encoder-attn-backend FLASH_ATTN" in line and "--dtype" not in line for line in serves)
    models = {line.split(" --model ")[1].split()[0] for line in serves}
    assert models == {"llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2.5-VL-7B-Instruct"}
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--keeps", "2"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--keeps" in bad.stderr


def test_two_turn_chat_template_continues_turn_one_and_the_table_reads_vllm_counters():
    """Turn 2's prompt is turn 1's prompt + the answer + the new question (what lets the prefix cache serve it), and
    the hit rate comes from vLLM's prefix-cache counters (summed over label sets, ``_total`` or not)."""
    import jinja2

    from tokenprune.integrations.vllm.serve_bench import TEMPLATE
    from tokenprune.integrations.vllm.serve_chat import markdown as two_turn_markdown
    from tokenprune.integrations.vllm.serve_chat import prefix_cache_counts

    render = jinja2.Template(TEMPLATE).render
    turn1 = render(messages=[{"role": "user", "content": "<image>\nq1"}])
    turn2 = render(messages=[{"role": "user", "content": "<image>\nq1"}, {"role": "assistant", "content": "a1"},
                             {"role": "user", "content": "q2"}])
    assert turn1 == "USER : <image>\nq1 ASSISTANT :"
    assert turn2 == turn1 + " a1USER : q2 ASSISTANT :"

    metrics = ('# HELP vllm:prefix_cache_hits_total hits\nvllm:prefix_cache_hits_total{engine="0",model_name="m"} '
               '96.0\nvllm:prefix_cache_queries_total{engine="0",model_name="m"} 128.0\n'
               'vllm:prefix_cache_queries_total{engine="1",model_name="m"} 32.0\n')
    assert prefix_cache_counts(metrics) == (96.0, 160.0)

    def row(turn2_ttft: float, hits: float) -> dict:
        return {"turn1_ttft_p50_s": 0.8, "turn2_ttft_p50_s": turn2_ttft, "turn1_prompt_tokens": 600,
                "turn2_prompt_tokens": 620, "turn1_hit_rate": 0.0, "turn2_hit_rate": hits}

    plan = {"model": "m", "model_type": "llava", "requests": 4, "max_tokens": 8, "image_size": [336, 336],
            "device": "cpu"}
    table = two_turn_markdown({"plan": plan, "two_turn": {"unpruned": row(0.2, 0.96), "cdpruner 0.25": row(0.4, 0)}})
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0.4 | 2.00 |" in rows["cdpruner 0.25"] and rows["cdpruner 0.25"].endswith("| 0% |")
    assert rows["unpruned"].endswith("| 96% |")
