"""Requests that pass precomputed image embeddings instead of pixels: pruned by the methods that select on the
projected features (the same selection as on the features the tower would give, == the HF reference), refused with
a clear message, when the request is processed, by the methods that read the vision tower. LLaVA-NeXT and
LLaVA-OneVision embeddings come packed (newline tokens merged, no image size): DivPrune (one pool over the packed
image) prunes them as ``enable_pruning`` prunes the pixels' packed features, per-crop methods refuse them."""

from __future__ import annotations

import functools
import gc

import pytest
from cases import MAX_TOKENS, PROMPTS
from hf_reference import HFReference
from test_e2e import TOL, max_diff, report

from tokenprune.integrations.vllm import vllm_overrides
from tokenprune.integrations.vllm.options import parse_options


@pytest.fixture(scope="module")
def hf(model_dirs):
    return functools.cache(lambda name: HFReference(model_dirs[name], name))


def _embeds_request(name: str, ref: HFReference) -> dict:
    """The prompt with its image as the tower's output, computed on the HF side: LLaVA ``[1, n, D]`` after the
    projector; Qwen ``[n, D]`` and the image's grid ``[1, 3]``."""
    features = ref.signals(None)[0].detach()
    if name == "llava":
        return {"prompt": PROMPTS[name], "multi_modal_data": {"image": features[None]}}
    grid = ref.inputs["image_grid_thw"]
    return {"prompt": PROMPTS[name], "multi_modal_data": {"image": {"image_embeds": features, "image_grid_thw": grid}}}


def _run(path: str, request: dict, overrides: dict | None):
    from cases import Run
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", max_model_len=1024, max_num_seqs=2, enforce_eager=True, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0}, distributed_executor_backend="uni", enable_mm_embeds=True,
              **({"hf_overrides": overrides} if overrides else {}))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    error = None
    try:
        out = llm.generate([request], params, use_tqdm=False)[0]
    except ValueError as refused:  # re-raised below without its traceback, which holds on to the engine
        error = str(refused)
    del llm
    gc.collect()
    if error is not None:
        raise ValueError(error)
    c = out.outputs[0]
    return Run(len(out.prompt_token_ids), list(c.token_ids),
               [s[t].logprob for s, t in zip(c.logprobs, c.token_ids, strict=True)])


CASES = [("qwen2_5_vl", "divprune", 6), ("qwen2_5_vl", "cdpruner", 6), ("llava", "divprune", 10),
         ("llava", "cdpruner", 12)]


@pytest.mark.parametrize(("name", "method", "keep"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_embeddings_are_pruned_as_the_hf_reference(name, method, keep, hf, model_dirs):
    ref_model = hf(name)
    overrides = vllm_overrides(name, method, keep=keep)
    selection = ref_model.selection(parse_options(overrides["tokenprune"], cls_token=name == "llava"))
    ours, ref = _run(model_dirs[name], _embeds_request(name, ref_model), overrides), ref_model.pruned(selection)
    assert ours.prompt_len == ref.prompt_len
    assert ours.tokens == ref.tokens
    report(f"image embeddings, pruned vLLM vs HF reference, {name} {method} keep={keep}", max_diff(ours, ref))
    assert max_diff(ours, ref) < TOL
    assert max_diff(ref_model.generate(), ref) > 100 * TOL  # the comparison can fail


def test_embeddings_with_everything_kept_are_bit_identical_to_vanilla(hf, model_dirs):
    name = "qwen2_5_vl"
    request = _embeds_request(name, hf(name))
    assert _run(model_dirs[name], request, vllm_overrides(name, "divprune", keep=10_000)) == _run(
        model_dirs[name], request, None)


@pytest.mark.parametrize(("name", "method", "options"), [("qwen2_5_vl", "hiprune", {"object_layer": 0}),
                                                       ("llava", "fastervlm", {}), ("llava", "mmtok", {})])
def test_tower_methods_refuse_embeddings_with_a_clear_message(name, method, options, hf, model_dirs):
    with pytest.raises(ValueError, match=r"passes image embeddings .* reads \[.*\] inside it.* 'divprune'"):
        _run(model_dirs[name], _embeds_request(name, hf(name)), vllm_overrides(name, method, keep=8, **options))


def _packed_request(name: str, ref: HFReference) -> dict:
    """The prompt with its image as the packed features ``[1, n, D]`` the HF model computes (base tile, unpadded
    crops and newline tokens merged), which is what vLLM's LLaVA-NeXT / OneVision take as ``image_embeds``."""
    inputs = {k: v for k, v in ref.inputs.items() if k in ("pixel_values", "image_sizes", "batch_num_images")}
    packed = ref.model.model.get_image_features(**inputs).pooler_output
    packed = packed[0] if isinstance(packed, (list, tuple)) else packed
    return {"prompt": PROMPTS[name], "multi_modal_data": {"image": packed.detach()[None]}}


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_packed_embeddings_are_pruned_as_enable_pruning(name, hf, model_dirs):
    from tokenprune import disable_pruning, enable_pruning

    ref_model = hf(name)
    request, vanilla = _packed_request(name, ref_model), ref_model.generate()
    n = request["multi_modal_data"]["image"].shape[1]
    handle = enable_pruning(ref_model.model, method="divprune", keep=0.3)
    try:
        ref = ref_model.generate()
        record = handle.last.images[0]
    finally:
        disable_pruning(ref_model.model)
    assert record.n == n and len(record.kept) < n
    ours = _run(model_dirs[name], request, vllm_overrides(name, "divprune", keep=0.3))
    assert ours.prompt_len == vanilla.prompt_len - (n - len(record.kept))  # HF's prompt_len: before pruning
    assert ours.tokens == ref.tokens
    report(f"packed image embeddings, pruned vLLM vs enable_pruning, {name} divprune keep=0.3", max_diff(ours, ref))
    assert max_diff(ours, ref) < TOL
    assert max_diff(vanilla, ref) > 100 * TOL  # the comparison can fail


def test_per_crop_methods_refuse_packed_embeddings(hf, model_dirs):
    name = "llava_next"
    with pytest.raises(ValueError, match=r"arrive packed .* 'uniform'.*scope='crop'.* Send the image's pixels.*"
                                         r"\['divprune'\]"):
        _run(model_dirs[name], _packed_request(name, hf(name)), vllm_overrides(name, "uniform", keep=0.3))
