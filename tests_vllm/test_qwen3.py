"""Qwen3-VL and Qwen3-VL-MoE in vLLM: keep-all bit-identical to vanilla vLLM, vanilla equal to HF ``generate``, and
each method equal to ``enable_pruning`` on the HF model (the same kept tokens, DeepStack rows and original M-RoPE
positions: logprobs within 1e-5); a batch of different images gives each request what it gets alone; videos are
refused at engine start while pruning."""

from __future__ import annotations

import re

import pytest
from cases import PROMPTS, image
from compare import TOL, assert_batch_equals_alone, assert_matches, max_diff, report
from engines import alone_and_together, start_error
from hf_reference import HFReference, enable_pruning_generate

from tokenprune.integrations.vllm import ARCHITECTURES, vllm_overrides
from tokenprune.tiny_models import random_image

N_TOKENS = 15  # 3 x 5 merged tokens (cases.IMAGE_SIZE)


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_vl_moe"])
def test_vanilla_matches_hf_and_keep_all_is_bit_identical(name, vllm_run, model_dirs):
    vanilla, ref = vllm_run(name), HFReference(model_dirs.get(name + "_hf", model_dirs[name]), name).generate()
    assert vanilla.prompt_len == ref.prompt_len and vanilla.tokens == ref.tokens
    report(f"vanilla vLLM vs HF generate, {name}", max_diff(vanilla, ref))
    assert max_diff(vanilla, ref) < TOL
    assert vllm_run(name, vllm_overrides(name, "divprune", keep=10_000)) == vanilla


CASES = [
    ("qwen3_vl", "divprune", 0.25, {}),
    ("qwen3_vl", "kcenter", 5, {}),
    ("qwen3_vl", "uniform", 6, {}),
    ("qwen3_vl", "hiprune", 6, {"object_layer": 0}),  # attention received in the ViT
    ("qwen3_vl", "visiondrop", 6, {}),              # merged tokens: DeepStack rows merged the same way
    ("qwen3_vl", "cdpruner", 5, {}),                # prompt-dependent
    ("qwen3_vl", "mmtok", 5, {}),
    ("qwen3_vl_moe", "divprune", 5, {}),
]


@pytest.mark.parametrize(("name", "method", "keep", "options"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_pruned_matches_enable_pruning(name, method, keep, options, vllm_run, model_dirs):
    ref_model = HFReference(model_dirs.get(name + "_hf", model_dirs[name]), name)
    vanilla, ref, record = enable_pruning_generate(ref_model, method, keep, **options)
    rows = len(record.kept) + record.n_merged
    ours = vllm_run(name, vllm_overrides(name, method, keep=keep, **options))
    assert rows < N_TOKENS
    assert ours.prompt_len == vllm_run(name).prompt_len - (N_TOKENS - rows)
    assert_matches(ours, ref, vanilla, f"pruned vLLM vs enable_pruning, {name} {method} keep={keep}")


def test_batch_of_different_images_equals_each_alone(model_dirs):
    name = "qwen3_vl"
    requests = [(PROMPTS[name], image(name)),
                (PROMPTS[name].replace("what is in the image ?", "how many red circle are there ?"), image(name)),
                (PROMPTS[name], random_image(64, 128, seed=11))]  # another grid (4 x 2)
    alone, together = alone_and_together(model_dirs[name], requests, vllm_overrides(name, "cdpruner", keep=5))
    runs = [run for run, _ in alone]
    assert_batch_equals_alone(together, runs)
    assert (runs[0].tokens, runs[0].logprobs) != (runs[1].tokens, runs[1].logprobs)  # the question matters


def test_videos_are_refused_at_engine_start(model_dirs):
    overrides = {"architectures": [ARCHITECTURES["qwen3_vl"][1]], "tokenprune": {"method": "divprune", "keep": 4}}
    text = start_error(model_dirs["qwen3_vl"], overrides, limit_mm_per_prompt={"image": 1, "video": 1})
    assert re.search(r"prunes images only", text)
