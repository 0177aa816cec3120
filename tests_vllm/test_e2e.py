"""End to end on the vLLM CPU build: vanilla vLLM == HF, keep=all == vanilla bit for bit, keep=k == HF reference."""

from __future__ import annotations

import pytest
from compare import TOL, assert_matches, max_diff, report
from hf_reference import HFReference, enable_pruning_generate

from tokenprune.integrations.vllm import vllm_overrides
from tokenprune.integrations.vllm.options import parse_options

MODELS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("name", MODELS)
def test_vanilla_vllm_matches_hf_generate(name, vllm_run, hf):
    ours, ref = vllm_run(name), hf(name).generate()
    assert ours.prompt_len == ref.prompt_len
    assert ours.tokens == ref.tokens
    report(f"vanilla vLLM vs HF generate, {name}", max_diff(ours, ref))
    assert max_diff(ours, ref) < TOL


@pytest.mark.parametrize(("name", "keep"), [("llava", 10_000), ("llava_next", 10_000), ("qwen2_vl", 10_000),
                                            ("qwen2_5_vl", 10_000), ("qwen2_5_vl", 1.0)])
def test_keep_all_is_bit_identical_to_vanilla(name, keep, vllm_run):
    """An int budget above the image's token count runs the whole pruning path (selection, position channels,
    position rewrite); keep=1.0 takes the stock path."""
    vanilla = vllm_run(name)
    pruned = vllm_run(name, vllm_overrides(name, "divprune", keep=keep))
    assert pruned == vanilla  # same prompt length, token ids and logprobs, exactly


CASES = [
    ("llava", "divprune", 10, {}),
    ("llava", "fastervlm", 10, {}),
    ("llava", "kcenter", 10, {}),        # pivot from the LAST CLIP layer, past vLLM's truncated tower
    ("llava", "random", 0.2, {"seed": 1}),
    ("llava", "holov", 60, {}),          # 53 kept + 7 zero rows (the official padding, quirks=True)
    ("llava", "hiprune", 12, {"object_layer": 0}),  # attention received at layer 0 and the feature layer
    ("llava", "fopru", 12, {}),          # attention map among image tokens
    ("llava", "visionzip", 12, {}),      # [CLS] + dominant + contextual tokens merged before the projector
    ("llava", "visiondrop", 12, {}),
    ("llava", "cdpruner", 12, {}),       # prompt-dependent: text after the image, embedded by vLLM's LLM
    ("llava", "mmtok", 12, {}),
    ("qwen2_vl", "divprune", 0.25, {}),
    ("qwen2_vl", "hiprune", 8, {"object_layer": 0}),  # attention received, full-attention blocks
    ("qwen2_5_vl", "divprune", 6, {}),
    ("qwen2_5_vl", "kcenter", 6, {"rule": "maxsum"}),
    ("qwen2_5_vl", "uniform", 8, {}),
    ("qwen2_5_vl", "hiprune", 8, {"object_layer": 0}),  # a windowed block (window order put back into raster order)
    ("qwen2_5_vl", "holov", 8, {}),
    ("qwen2_5_vl", "visiondrop", 8, {}),  # merged tokens in the slots of their first member
    ("qwen2_5_vl", "cdpruner", 8, {}),
    ("qwen2_5_vl", "mmtok", 8, {}),
]


@pytest.mark.parametrize(("name", "method", "keep", "options"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_pruned_matches_hf_reference(name, method, keep, options, vllm_run, hf):
    overrides = vllm_overrides(name, method, keep=keep, **options)
    pruning = parse_options(overrides["tokenprune"], cls_token=name == "llava")
    ref_model = hf(name)
    selection = ref_model.selection(pruning)
    n = ref_model.signals(None)[0].shape[0]
    k = pruning.kept(n)
    assert selection.features.shape[0] == k < n

    ours, ref = vllm_run(name, overrides), ref_model.pruned(selection)
    vanilla = vllm_run(name)
    assert ours.prompt_len == ref.prompt_len == vanilla.prompt_len - (n - k)
    assert_matches(ours, ref, vanilla, f"pruned vLLM vs HF reference, {name} {method} keep={keep}")
    if name.startswith("qwen"):  # ... and so do re-indexed positions (kept tokens must keep their own)
        assert max_diff(ours, ref_model.pruned(selection, reindex_positions=True)) > 10 * TOL


# LLaVA-NeXT: the reference is enable_pruning itself on the HF model (per-crop units, the newline rule, re-indexed
# positions): vLLM must give its tokens and logprobs.
NEXT_CASES = [("fastervlm", 0.5, {}), ("divprune", 0.3, {}), ("visionzip", 0.5, {}), ("cdpruner", 0.5, {})]


@pytest.mark.parametrize(("method", "keep", "options"), NEXT_CASES, ids=[c[0] for c in NEXT_CASES])
def test_llava_next_pruned_matches_enable_pruning(method, keep, options, vllm_run, model_dirs):
    vanilla, ref, image = enable_pruning_generate(HFReference(model_dirs["llava_next"], "llava_next"), method, keep,
                                                  **options)
    kept_rows = len(image.kept) + image.n_merged
    ours = vllm_run("llava_next", vllm_overrides("llava_next", method, keep=keep, **options))
    n = 52
    assert kept_rows < n
    assert ours.prompt_len == vllm_run("llava_next").prompt_len - (n - kept_rows)
    assert_matches(ours, ref, vanilla, f"pruned vLLM vs enable_pruning, llava_next {method} keep={keep}")
