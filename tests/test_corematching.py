"""CoreMatching: the worked examples of tokenprune/functional/corematching.py, the selector properties, and the
method's FFN patch on a tiny LLaVA (the four-family invariant matrix runs it in tests/test_decoder.py)."""

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import hook_and_attribute_census
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune import disable_pruning, enable_pruning
from tokenprune import functional as F
from tokenprune.budget import flops
from tokenprune.methods.corematching import CoreMatching
from tokenprune.patches.sparse_ffn import _core_ffn
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava

ACT = torch.tensor([[3.0, 2, 1, 0, -1, 0], [0, 5, 4, 1, 0, 0], [1, 0, 0, 0, 2, 0], [0, 1, 3, 0, 0, 0]])
GEN = dict(max_new_tokens=4, do_sample=False)


# --- worked examples (module docstring) --------------------------------------------------------------------------
def test_worked_example_core_neurons_and_match():
    expected = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0]])
    assert torch.equal(F.token_core_neurons(ACT, rho=0.5).long(), expected)
    core = F.core_neurons(ACT, rho=0.5, beta=0.5)
    assert core.tolist() == [1, 2] and core.dtype == torch.long
    assert F.core_match(ACT, core).tolist() == [2, 2, 0, 2]
    # beta=1: every neuron that is token-wise core for some token
    assert F.core_neurons(ACT, rho=0.5, beta=1.0).tolist() == [0, 1, 2, 4]


def test_worked_example_elbow_and_core_tokens():
    match = torch.tensor([1, 9, 0, 8, 2])
    assert F.elbow_value(match) == 2.0
    assert F.corematching(match, 4).tolist() == [1, 3]
    assert F.corematching(match, 1).tolist() == [1]                       # the cap keeps the largest match
    assert F.corematching(match, 3, adaptive=False).tolist() == [1, 3, 4]  # exactly k, no elbow
    assert F.corematching(match, 5).tolist() == [0, 1, 2, 3, 4]          # k >= N: everything


def test_degenerate_inputs():
    assert F.core_neurons(-ACT.abs() - 1).numel() == 0                 # nothing positive: no core neuron
    assert F.corematching(torch.full((6,), 3.0), 4).tolist() == [0, 1, 2, 3]  # a flat curve: ties to the lowest index
    assert F.corematching(torch.tensor([5.0, 1.0, 3.0]), 2).tolist() == [0]  # straight: the elbow is the top
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        F.corematching(torch.ones(3), 0)
    with pytest.raises(ValueError, match="tokens, neurons"):
        F.core_neurons(torch.ones(3))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), i=st.integers(1, 40), seed=st.integers(0, 10_000), rho=st.floats(0.05, 1.0),
       beta=st.floats(0.05, 1.0), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_core_neuron_properties(m, i, seed, rho, beta, dtype):
    act = torch.randn(m, i, generator=torch.Generator().manual_seed(seed)).to(dtype)
    core = F.core_neurons(act, rho, beta)
    union = F.token_core_neurons(act, rho).any(dim=0).nonzero().squeeze(1)
    assert core.dtype == torch.long and torch.equal(core, torch.unique(core))  # sorted, unique
    assert set(core.tolist()) <= set(union.tolist())
    assert core.numel() == min(union.numel(), math.ceil(beta * union.numel() - 1e-9))
    match = F.core_match(act, core)
    assert match.shape == (m,) and bool((match >= 0).all()) and bool((match <= core.numel()).all())
    assert torch.equal(F.core_neurons(act.float(), rho, beta), core)  # scores in fp32 whatever the dtype


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), k=st.integers(1, 60), seed=st.integers(0, 10_000), levels=st.integers(1, 6),
       adaptive=st.booleans())
def test_core_token_properties(n, k, seed, levels, adaptive):
    match = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(seed))  # many ties
    kept = F.corematching(match, k, adaptive)
    assert kept.dtype == torch.long and torch.equal(kept, torch.unique(kept))
    if k >= n:
        assert kept.tolist() == list(range(n))
        return
    assert 1 <= kept.numel() <= k and (adaptive or kept.numel() == k)
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[kept] = False
    if dropped.any():  # nothing dropped beats anything kept; among equals the lower index stays
        assert int(match[dropped].max()) <= int(match[kept].min())
        worst = int(match[kept].min())
        if bool((match[dropped] == worst).any()) and kept.numel() == k:
            assert int(dropped.nonzero()[match[dropped] == worst].min()) > int(kept[match[kept] == worst].max())


# --- the FFN patch on a tiny LLaVA ---------------------------------------------------------------------------------
@functools.cache
def _llava(attn):
    return tiny_llava(LlavaSize(text_layers=4), attn_implementation=attn)


def _inputs(processor, rows=(0,)):
    prompts = ["USER : <image>\nwhat is in the image ? ASSISTANT :",
               "USER : <image>\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"]
    images = [random_image(40, 70, seed=1), random_image(64, 48, seed=2)]
    return processor(images=[images[r] for r in rows], text=[prompts[r] for r in rows], return_tensors="pt",
                     padding=True)


def _generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_all_and_all_neurons_is_bit_identical_and_disable_leaves_nothing(attn):
    model, processor = _llava(attn)
    disable_pruning(model)
    inputs = _inputs(processor)
    ref = _generate(model, inputs)
    before = hook_and_attribute_census(model)  # after a generate: HF caches some attributes on first use
    enable_pruning(model, "corematching", keep=1.0, neuron_keep=1.0)
    assert all("forward" in layer.mlp.__dict__ for layer in model.model.language_model.layers)
    out = _generate(model, inputs)
    disable_pruning(model)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits, strict=True))
    assert hook_and_attribute_census(model) == before
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.language_model.layers)


@dataclass
class DenseDecode(CoreMatching):
    """The same core tokens, a dense decode."""

    def ffn_core(self, layer, act):
        return None


def test_decode_runs_on_the_core_neurons_only():
    """Same core tokens with and without the core-neuron decode: the same prefill, every decode step differs, and
    cached decoding equals the use_cache=False replay (the prompt dense, the generated tokens on the core).
    keep=1.0 prunes no token and leaves the model whole, neuron_keep=0.4 included."""
    model, processor = _llava("sdpa")
    disable_pruning(model)
    inputs = _inputs(processor)
    ref = _generate(model, inputs)
    runs, kept = {}, {}
    for name, method, keep in (("dense", DenseDecode(), 0.5), ("sparse", "corematching", 0.5),
                               ("whole", "corematching", 1.0)):
        handle = enable_pruning(model, method, keep=keep)
        try:
            runs[name] = _generate(model, inputs), _generate(model, inputs, use_cache=False)
            kept[name] = handle.last.images[0].kept
        finally:
            disable_pruning(model)
    dense, sparse = runs["dense"][0], runs["sparse"][0]
    assert torch.equal(kept["dense"], kept["sparse"]) and kept["sparse"].numel() < kept["whole"].numel()
    assert torch.equal(sparse.logits[0], dense.logits[0])  # the prefill's last-token logits: dense FFN
    assert all(not torch.equal(a, b) for a, b in zip(sparse.logits[1:], dense.logits[1:], strict=True))
    for cached, uncached in runs.values():
        assert torch.equal(cached.sequences, uncached.sequences)
        for a, b in zip(cached.logits, uncached.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(runs["whole"][0].logits, ref.logits, strict=True))


def test_core_ffn_equals_the_dense_ffn_with_the_other_neurons_zeroed():
    model, _ = _llava("sdpa")
    mlp = model.model.language_model.layers[1].mlp
    x = torch.randn(1, 3, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    width = model.config.text_config.intermediate_size
    core = torch.tensor([0, 5, 17, width // 2, width - 1])
    with torch.no_grad():
        inter = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        mask = torch.zeros(inter.shape[-1])
        mask[core] = 1
        torch.testing.assert_close(_core_ffn(mlp, x, core), mlp.down_proj(inter * mask), rtol=1e-5, atol=1e-5)
        assert torch.equal(_core_ffn(mlp, x, None), mlp(x))


def test_quantized_projections_run_the_core_ffn_masked():
    """A projection that is not a plain nn.Linear (a quantized layer) has no rows to gather: same result, masked."""
    model, _ = _llava("sdpa")
    mlp = model.model.language_model.layers[0].mlp
    x = torch.randn(1, 2, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(1))
    core = torch.tensor([1, 2, 40])
    with torch.no_grad():
        sliced = _core_ffn(mlp, x, core)
        down = mlp.down_proj
        mlp.down_proj = torch.nn.Sequential(down)  # same maths, not a plain Linear
        try:
            masked = _core_ffn(mlp, x, core)
        finally:
            mlp.down_proj = down
    torch.testing.assert_close(masked, sliced, rtol=1e-5, atol=1e-5)


def test_selection_is_the_match_with_core_neurons_of_the_scoring_ffn():
    """The kept tokens are what the functional rules pick from layer 1's FFN activations of the unpruned prompt."""
    model, processor = _llava("eager")
    disable_pruning(model)
    inputs = _inputs(processor)
    seen = {}
    mlp = model.model.language_model.layers[1].mlp

    def record(module, args, output):
        seen.setdefault("act", args[0][0].detach().clone())  # [M, I]: down_proj's input, the first call only

    hook = mlp.down_proj.register_forward_hook(record)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    core = F.core_neurons(seen["act"], 0.2, 0.4)
    expected = F.corematching(F.core_match(seen["act"], core)[visual], visual.numel() // 2)
    handle = enable_pruning(model, "corematching", keep=0.5)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        disable_pruning(model)
    assert torch.equal(handle.last.images[0].kept, expected)


def test_unsupported_ffn_and_bad_options_raise_clearly():
    model, _ = _llava("sdpa")
    disable_pruning(model)
    mlp = model.model.language_model.layers[2].mlp
    gate = mlp.gate_proj
    del mlp.gate_proj
    try:
        with pytest.raises(ValueError, match="dense SwiGLU FFN"):
            enable_pruning(model, "corematching", keep=0.5)
    finally:
        mlp.gate_proj = gate
    assert not any("forward" in layer.mlp.__dict__ for layer in model.model.language_model.layers)
    for bad in ({"rho": 0.0}, {"neuron_keep": 1.5}, {"layer": 0}):
        with pytest.raises(ValueError, match="corematching"):
            enable_pruning(model, "corematching", keep=0.5, **bad)
    with pytest.raises(ValueError, match="layer="):
        enable_pruning(model, "corematching", keep=0.5, layer=9)


def test_flops_count_the_sparse_ffn():
    shape = flops.preset("llava-1.5-7b")
    dense = flops.decode_flops(shape, 600)
    sparse = flops.decode_flops(shape, 600, ffn_share=0.4)
    assert dense - sparse == shape.num_layers * round(3 * shape.hidden_size * shape.intermediate_size * 0.6)


def test_flops_command_takes_the_ffn_share(capsys):
    import json

    from tokenprune.cli import main

    argv = ["flops", "--model", "llava-1.5-7b", "--tokens-per-layer", "600", "--json"]
    assert main(argv) == 0
    dense = json.loads(capsys.readouterr().out)["decode_gflops_per_token"]
    assert main([*argv, "--ffn-share", "0.4"]) == 0
    sparse = json.loads(capsys.readouterr().out)["decode_gflops_per_token"]
    shape = flops.preset("llava-1.5-7b")
    assert dense - sparse == pytest.approx(32 * 3 * shape.hidden_size * shape.intermediate_size * 0.6 / 1e9)
    with pytest.raises(SystemExit):
        main([*argv, "--ffn-share", "0"])
    assert "ffn_share must be a share" in capsys.readouterr().err
