"""Tensor parallelism, run: ``tensor_parallel_size=2`` on the vLLM CPU build (two worker processes, gloo and vLLM's
CPU communicator; ``VLLM_CPU_OMP_THREADS_BIND=nobind`` so that two ranks fit on a 2-core machine) gives the same
pruned generation as TP=1, token for token: every rank selects the same tokens from signals whose heads were
gathered (CLIP) or summed (Qwen attention received) across the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cases import Run

from tokenprune.integrations.vllm import vllm_overrides

HERE = Path(__file__).resolve().parent
CASES = [("qwen2_5_vl", "hiprune", 8, {"object_layer": 0}), ("llava", "fastervlm", 10, {})]


@pytest.mark.parametrize(("name", "method", "keep", "options"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_tp2_pruned_generation_equals_tp1(name, method, keep, options, model_dirs, vllm_run):
    overrides = vllm_overrides(name, method, keep=keep, **options)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    done = subprocess.run([sys.executable, str(HERE / "tp_run.py"), model_dirs[name], name, json.dumps(overrides)],
                          env=env, cwd=HERE, capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RUN ")]
    assert done.returncode == 0 and lines, f"TP=2 did not run (exit {done.returncode}):\n{done.stderr[-4000:]}"
    tp2 = Run(**json.loads(lines[-1][4:]))
    tp1 = vllm_run(name, overrides)
    assert tp2.prompt_len == tp1.prompt_len < vllm_run(name).prompt_len
    assert tp2.tokens == tp1.tokens
    # the all-reduce sums in another order than one rank does: fp32 noise, not a different selection
    assert max(abs(a - b) for a, b in zip(tp2.logprobs, tp1.logprobs, strict=True)) < 1e-4
