"""Qwen3.5 (and Qwen3.5-MoE) in vLLM, in bfloat16 (vLLM 0.32's CPU Gated DeltaNet runs in bf16 only, with
linear-attention head dims of 64; the checkpoint uses 64): keep-all bit-identical to vanilla vLLM, each method keeps
``enable_pruning``'s indices on the HF model in bf16 (the same image and prompt), the pruned prompt is the unpruned
one minus the dropped tokens, a batch of different requests gives each what it gets alone.

Indices, not logprobs: vLLM's and HF's bf16 kernels round differently (Gated DeltaNet, attention), so two correct
engines differ by far more than the fp32 tests' 1e-5; the fp32 logprob equality of the same hooks is
tests_vllm/test_qwen3.py's (Qwen3-VL, the model class Qwen3.5 extends in vLLM).
"""

from __future__ import annotations

import pytest
import torch
from cases import PROMPTS, Run
from compare import max_diff, report
from engines import alone_and_together, run_alone
from hf_reference import HFModel

from tokenprune.integrations.vllm import vllm_overrides
from tokenprune.integrations.vllm.checkpoints import save_tiny_checkpoint
from tokenprune.tiny_models import random_image

NAME = "qwen3_5"
PROMPT = PROMPTS["qwen3_vl"]
N_TOKENS = 15  # 96 px wide, 160 px tall -> 3 x 5 merged tokens (patch 16)


def _image(seed: int = 3):
    return random_image(160, 96, seed=seed)


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory) -> str:
    return save_tiny_checkpoint(NAME, str(tmp_path_factory.mktemp("qwen3_5") / NAME))


def _run_alone(path: str, overrides: dict | None = None) -> tuple[Run, list[list[int]]]:
    return run_alone(path, (PROMPT, _image()), overrides, dtype="bfloat16")


def _hf_kept(path: str, method: str, keep, prompt: str = PROMPT, image=None, **options) -> list[int]:
    """``enable_pruning``'s kept indices on the HF model in bf16, for the same image and prompt."""
    from tokenprune import disable_pruning, enable_pruning

    hf = HFModel(path, prompt, _image() if image is None else image, dtype=torch.bfloat16)
    handle = enable_pruning(hf.model, method=method, keep=keep, **options)
    try:
        with torch.no_grad():
            hf.model.generate(**hf.inputs, max_new_tokens=1, do_sample=False)
        return handle.last.images[0].kept.tolist()
    finally:
        disable_pruning(hf.model)


@pytest.fixture(scope="module")
def vanilla(qwen35_dir) -> Run:
    return _run_alone(qwen35_dir)[0]


def test_keep_all_is_bit_identical_in_bf16(qwen35_dir, vanilla):
    assert _run_alone(qwen35_dir, vllm_overrides(NAME, "divprune", keep=1.0))[0] == vanilla


@pytest.mark.parametrize(("method", "keep", "options"), [("divprune", 5, {}), ("hiprune", 6, {"object_layer": 0})],
                         ids=["divprune", "hiprune"])
def test_pruned_keeps_enable_pruning_indices(method, keep, options, qwen35_dir, vanilla):
    ours, kept = _run_alone(qwen35_dir, vllm_overrides(NAME, method, keep=keep, **options))
    assert kept == [_hf_kept(qwen35_dir, method, keep, **options)]
    assert ours.prompt_len == vanilla.prompt_len - (N_TOKENS - len(kept[0]))


def test_batch_equals_alone_and_prompt_dependent_indices(qwen35_dir):
    question = PROMPT.replace("what is in the image ?", "how many red circle are there ?")
    requests = [(PROMPT, _image()), (question, _image()), (PROMPT, random_image(64, 128, seed=11))]  # 4 x 2 tokens
    # alone: each image in its own encoder call
    alone, together = alone_and_together(qwen35_dir, requests, vllm_overrides(NAME, "cdpruner", keep=5),
                                         dtype="bfloat16")
    for a, (b, _) in zip(together, alone, strict=True):
        assert a.tokens == b.tokens
        report("bf16 batch vs alone, qwen3_5 cdpruner", max_diff(a, b))
    kept = [k for _, k in alone]
    assert kept == [[_hf_kept(qwen35_dir, "cdpruner", 5, p, im)] for p, im in requests]


def test_moe_keeps_enable_pruning_indices(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_5_moe")
    path = save_tiny_checkpoint("qwen3_5_moe", str(root / "vllm"))  # experts in the hub layout vLLM reads
    hf_path = save_tiny_checkpoint("qwen3_5_moe", str(root / "hf"), for_vllm=False)  # transformers' own layout
    vanilla = _run_alone(path)[0]
    ours, kept = _run_alone(path, vllm_overrides("qwen3_5_moe", "divprune", keep=5))
    assert kept == [_hf_kept(hf_path, "divprune", 5)]
    assert ours.prompt_len == vanilla.prompt_len - (N_TOKENS - 5)
