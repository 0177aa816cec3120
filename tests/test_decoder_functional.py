"""Decoder-stage selection rules and row recomputation against hand-computed worked examples."""

import pytest
import torch
from conftest import PROMPT

from tokenprune import functional as F
from tokenprune.methods import FEATHER, AdaptInfer, FastV, PyramidDrop, SparseVLM, TransPrune
from tokenprune.methods.todre import ToDRERelevance
from tokenprune.methods.vflowopt import VFlowOptLLM
from tokenprune.patches.attention_rows import attention_rows
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava


def test_fastv_worked_example_softmax_over_all_keys():
    """§2: N=11, S={0,1}, V={2..7}, T={8,9,10}; 2 heads; R=50% -> k=3 -> image {4,5,6}."""
    logits = torch.tensor([[6, 0, 3, 2.8, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0, 0.9, 0.8, 0, 0.5, 0, 0]])
    rows = torch.softmax(logits, dim=-1)  # per head over ALL 11 keys
    torch.testing.assert_close(
        rows.mean(0)[2:8], torch.tensor([0.0536, 0.0495, 0.0858, 0.0777, 0.0704, 0.0323]), atol=1e-4, rtol=0
    )
    assert (F.fastv(rows[:, 2:8], 3) + 2).tolist() == [4, 5, 6]
    # the normalisation mistake (softmax over the image keys only) picks {2,3,4}: the test above would catch it
    wrong = torch.softmax(logits[:, 2:8], dim=-1)
    assert (F.fastv(wrong, 3) + 2).tolist() == [2, 3, 4]


def test_fastv_ties_go_to_the_lowest_index():
    assert F.fastv(torch.ones(2, 1, 6), 2).tolist() == [0, 1]
    assert F.fastv(torch.rand(3, 5), 9).tolist() == [0, 1, 2, 3, 4]


def test_pdrop_worked_example():
    """§4: V={3..10}, lambda=0.5 -> 4, 2, 1 of the ORIGINAL 8; stage scores -> {3,5,7,9}, {3,9}, {3}."""
    assert F.pdrop_counts(8, 0.5, 3) == [4, 2, 1]
    visual = torch.arange(3, 11)
    s1 = torch.tensor([.10, .05, .20, .02, .15, .08, .30, .01])
    kept = visual[F.fastv(s1, 4)]
    assert kept.tolist() == [3, 5, 7, 9]
    kept = kept[F.fastv(torch.tensor([.3, .1, .2, .4]), 2)]
    assert kept.tolist() == [3, 9]
    assert kept[F.fastv(torch.tensor([.6, .4]), 1)].tolist() == [3]


def test_pdrop_budget_conventions():
    """lambda=0.5 on (8, 16, 24) of 32 layers: 576 -> 288/144/72, layer average 270 (PDrop Tab. 1)."""
    assert F.pdrop_counts(576, 0.5, 3) == [288, 144, 72]
    assert F.layer_average([288, 144, 72], (8, 16, 24), 576, 32) == 270
    assert F.pdrop_ratio(270 / 576, (8, 16, 24), 32) == pytest.approx(0.5, abs=1e-12)
    method = PyramidDrop()
    assert method.boundaries(32) == (8, 16, 24) and method.boundaries(28) == (7, 14, 21)
    assert method.counts(576, 270 / 576, 32) == [288, 144, 72]  # solved lambda, no rounding loss
    assert method.counts(576, 270, 32) == [288, 144, 72]        # int keep = layer-average token count
    assert PyramidDrop(ratio=0.5).counts(576, 0.1, 32) == [288, 144, 72]  # explicit lambda wins
    assert method.counts(576, 1.0, 32) == [576, 576, 576]


def test_layer_plans_are_validated():
    assert [(p.layer, p.score_layer) for p in FastV(k=2).check_layers(32)] == [(2, 1)]
    with pytest.raises(ValueError, match=r"fastv: pruning layers \[2\].*the paper's default.*'llava' model's "
                                         r"2-layer language model \(layers 0..1, prunable 1..1\); set k="):
        FastV(k=2).check_layers(2, "llava")
    with pytest.raises(ValueError, match=r"layers=\(0, 1\)\) do not exist"):
        PyramidDrop(layers=(0, 1)).check_layers(4)


@pytest.mark.parametrize("method, plan28", [
    (FEATHER(), [(8, 7), (16, 15)]), (TransPrune(), [(7, 7), (9, 9), (12, 12)]),
    (SparseVLM(), [(3, 2), (7, 6), (16, 15)]), (AdaptInfer(), [(2, 1), (11, 10), (21, 20)]),
    (VFlowOptLLM(), [(9, 9), (18, 18)]), (ToDRERelevance(), [(25, 24)]),
])
def test_official_layers_are_never_moved_to_fit_the_model(method, plan28):
    """The papers' absolute layers are used as they are on any depth (Qwen's 28 layers included) and refused with
    the option to set where they do not exist; ToDRE's 7L/8 is the paper's own depth rule, refused when no layer
    runs after it (no shallow-model clamp)."""
    assert [(p.layer, p.score_layer) for p in method.check_layers(28)] == plan28
    with pytest.raises(ValueError, match=rf"{method.name}: .*the paper's default.*'qwen2_vl' model's 4-layer .*"
                                         rf"set {method.layer_option}="):
        method.check_layers(4, "qwen2_vl")
    with pytest.raises(ValueError, match="k"):
        FastV(k=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_rows_equal_the_kernels_weights(attn):
    """Oracle: eager's own attention weights (asked for HERE only) of layer 1, rows recomputed from its input."""
    model, processor = tiny_llava(LlavaSize(text_layers=2), attn_implementation="eager")
    inputs = processor(images=[random_image(80, 96, seed=1), random_image(64, 64, seed=2)],
                       text=[PROMPT, "USER : <image>\nhow many dog ? ASSISTANT :"], return_tensors="pt", padding=True)
    assert bool((inputs["attention_mask"] == 0).any())  # left padding in row 1
    seen = {}
    layer = model.model.language_model.layers[1]

    def grab(module, args, kwargs):
        seen["h"], seen["pe"] = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]

    hook = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    hook.remove()
    weights = out.attentions[1]  # [B, H, L, L]
    valid = inputs["attention_mask"].bool()
    last = torch.full((2, 1), valid.shape[1] - 1)
    rows = torch.cat([last, last - 3], dim=1)
    got = attention_rows(layer, seen["h"], rows, *seen["pe"], valid)
    expected = torch.stack([weights[b, :, rows[b]] for b in range(2)])
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-4)
