"""Qwen3-VL and Qwen3-VL-MoE in vLLM: keep-all bit-identical to vanilla vLLM, vanilla equal to HF ``generate``, and
each method equal to ``enable_pruning`` on the HF model (the same kept tokens, DeepStack rows and original M-RoPE
positions: logprobs within 1e-5); a batch of different images gives each request what it gets alone; videos are
refused at engine start while pruning."""

from __future__ import annotations

import gc
import re

import pytest
from cases import MAX_TOKENS, PROMPTS, image
from hf_reference import HFReference
from test_e2e import TOL, max_diff, report

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
    from tokenprune import disable_pruning, enable_pruning

    ref_model = HFReference(model_dirs.get(name + "_hf", model_dirs[name]), name)
    vanilla = ref_model.generate()
    handle = enable_pruning(ref_model.model, method=method, keep=keep, **options)
    try:
        ref = ref_model.generate()
        record = handle.last.images[0]
        rows = len(record.kept) + record.n_merged
    finally:
        disable_pruning(ref_model.model)
    ours = vllm_run(name, vllm_overrides(name, method, keep=keep, **options))
    assert rows < N_TOKENS
    assert ours.prompt_len == vllm_run(name).prompt_len - (N_TOKENS - rows)
    assert ours.tokens == ref.tokens
    report(f"pruned vLLM vs enable_pruning, {name} {method} keep={keep}", max_diff(ours, ref))
    assert max_diff(ours, ref) < TOL
    assert max_diff(vanilla, ref) > 100 * TOL  # the comparison can fail: the unpruned prompt gives other logprobs


def _generate(llm, batch) -> list[tuple[list[int], list[float]]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": im}} for p, im in batch], params, use_tqdm=False)
    return [(list(c.token_ids), [s[t].logprob for s, t in zip(c.logprobs, c.token_ids, strict=True)])
            for c in (o.outputs[0] for o in outs)]


def test_batch_of_different_images_equals_each_alone(model_dirs):
    from vllm import LLM

    name = "qwen3_vl"
    llm = LLM(model=model_dirs[name], dtype="float32", max_model_len=1024, max_num_seqs=4, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0}, distributed_executor_backend="uni",
              hf_overrides=vllm_overrides(name, "cdpruner", keep=5))
    requests = [(PROMPTS[name], image(name)),
                (PROMPTS[name].replace("what is in the image ?", "how many red circle are there ?"), image(name)),
                (PROMPTS[name], random_image(64, 128, seed=11))]  # another grid (4 x 2)
    try:
        alone = [_generate(llm, [r])[0] for r in requests]
        together = _generate(llm, requests)
    finally:
        del llm
        gc.collect()
    for a, b in zip(together, alone, strict=True):
        assert a[0] == b[0]
        assert max(abs(x - y) for x, y in zip(a[1], b[1], strict=True)) < TOL
    assert alone[0] != alone[1]  # the question matters


def test_videos_are_refused_at_engine_start(model_dirs):
    from vllm import LLM

    overrides = {"architectures": [ARCHITECTURES["qwen3_vl"][1]], "tokenprune": {"method": "divprune", "keep": 4}}
    with pytest.raises(Exception) as info:  # noqa: PT011 - vLLM may wrap the plugin's ValueError
        LLM(model=model_dirs["qwen3_vl"], dtype="float32", max_model_len=1024, enforce_eager=True,
            limit_mm_per_prompt={"image": 1, "video": 1}, distributed_executor_backend="uni", hf_overrides=overrides)
    gc.collect()
    text, cause = str(info.value), info.value.__cause__
    while cause is not None:
        text, cause = text + " | " + str(cause), cause.__cause__
    assert re.search(r"prunes images only", text)
