"""Requests that pass precomputed image embeddings instead of pixels: pruned by the methods that select on the
projected features (the same selection as on the features the tower would give, == the HF reference), refused with
a clear message, when the request is processed, by the methods that read the vision tower. LLaVA-NeXT and
LLaVA-OneVision embeddings come packed (newline tokens merged, no image size): DivPrune (one pool over the packed
image) prunes them as ``enable_pruning`` prunes the pixels' packed features, per-crop methods refuse them."""

from __future__ import annotations

import gc

import pytest
from cases import PROMPTS, Run
from compare import assert_matches
from engines import engine, generate
from hf_reference import HFReference, enable_pruning_generate

from tokenprune.integrations.vllm import vllm_overrides
from tokenprune.integrations.vllm.options import parse_options


def _embeds_request(name: str, ref: HFReference) -> tuple:
    """The prompt with its image as the tower's output, computed on the HF side: LLaVA ``[1, n, D]`` after the
    projector; Qwen ``[n, D]`` and the image's grid ``[1, 3]``."""
    features = ref.signals(None)[0].detach()
    if name == "llava":
        return PROMPTS[name], features[None]
    return PROMPTS[name], {"image_embeds": features, "image_grid_thw": ref.inputs["image_grid_thw"]}


def _run(path: str, request: tuple, overrides: dict | None) -> Run:
    llm = engine(path, overrides, max_num_seqs=2, enable_mm_embeds=True)
    error = None
    try:
        run = generate(llm, [request])[0][0]
    except ValueError as refused:  # re-raised below without its traceback, which holds on to the engine
        error = str(refused)
    del llm
    gc.collect()
    if error is not None:
        raise ValueError(error)
    return run


CASES = [("qwen2_5_vl", "divprune", 6), ("qwen2_5_vl", "cdpruner", 6), ("llava", "divprune", 10),
         ("llava", "cdpruner", 12)]


@pytest.mark.parametrize(("name", "method", "keep"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_embeddings_are_pruned_as_the_hf_reference(name, method, keep, hf, model_dirs):
    ref_model = hf(name)
    overrides = vllm_overrides(name, method, keep=keep)
    selection = ref_model.selection(parse_options(overrides["tokenprune"], cls_token=name == "llava"))
    ours, ref = _run(model_dirs[name], _embeds_request(name, ref_model), overrides), ref_model.pruned(selection)
    assert ours.prompt_len == ref.prompt_len
    assert_matches(ours, ref, ref_model.generate(),
                   f"image embeddings, pruned vLLM vs HF reference, {name} {method} keep={keep}")


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


def _packed_request(name: str, ref: HFReference) -> tuple:
    """The prompt with its image as the packed features ``[1, n, D]`` the HF model computes (base tile, unpadded
    crops and newline tokens merged), which is what vLLM's LLaVA-NeXT / OneVision take as ``image_embeds``."""
    inputs = {k: v for k, v in ref.inputs.items() if k in ("pixel_values", "image_sizes", "batch_num_images")}
    packed = ref.model.model.get_image_features(**inputs).pooler_output
    packed = packed[0] if isinstance(packed, (list, tuple)) else packed
    return PROMPTS[name], packed.detach()[None]


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_packed_embeddings_are_pruned_as_enable_pruning(name, hf, model_dirs):
    ref_model = hf(name)
    request = _packed_request(name, ref_model)
    n = request[1].shape[1]
    vanilla, ref, record = enable_pruning_generate(ref_model, "divprune", 0.3)
    assert record.n == n and len(record.kept) < n
    ours = _run(model_dirs[name], request, vllm_overrides(name, "divprune", keep=0.3))
    assert ours.prompt_len == vanilla.prompt_len - (n - len(record.kept))  # HF's prompt_len: before pruning
    assert_matches(ours, ref, vanilla,
                   f"packed image embeddings, pruned vLLM vs enable_pruning, {name} divprune keep=0.3")


def test_per_crop_methods_refuse_packed_embeddings(hf, model_dirs):
    name = "llava_next"
    with pytest.raises(ValueError, match=r"arrive packed .* 'uniform'.*scope='crop'.* Send the image's pixels.*"
                                         r"\['divprune'\]"):
        _run(model_dirs[name], _packed_request(name, hf(name)), vllm_overrides(name, "uniform", keep=0.3))
