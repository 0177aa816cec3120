"""Merged / recycled tokens inside the LLM (``Recycled``), SparseVLM and AdaptInfer: the spec's worked examples
(SparseVLM v1.5, AdaptInfer) and the loop's layout, positions and hidden states of extra tokens."""

import dataclasses

import pytest
import torch

from tokenprune import disable_pruning, enable_pruning
from tokenprune import functional as F
from tokenprune.methods import METHODS, AdaptInfer, DecoderMethod, Recycled, SparseVLM, StagePlan
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava, tiny_qwen

# --- worked examples ------------------------------------------------------------------------------------------


def test_sparsevlm_raters_worked_example():
    visual = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0.5, 0]])
    text = torch.tensor([[2.0, 0], [0, 0.1], [1, 1]])
    p = torch.softmax(visual @ text.T, dim=-1).mean(0)
    torch.testing.assert_close(p, torch.tensor([0.4611, 0.1438, 0.3952]), atol=1e-4, rtol=0)
    assert F.sparsevlm_raters(visual, text).tolist() == [0, 2]  # text tokens 5 and 7
    assert F.sparsevlm_raters(torch.zeros(3, 2), text).numel() == 0  # all equal: the method lets every text token rate


def test_sparsevlm_stage_worked_example_keeps_and_recycles():
    rows = torch.tensor([[.50, .10, .05, .20, .05, .10, 0, 0], [.30, .20, .06, .10, .04, .10, .10, .10]])  # 5, 7
    relevance = rows.mean(0)[1:5]
    torch.testing.assert_close(relevance, torch.tensor([0.15, 0.055, 0.15, 0.045]))
    kept = F.fastv(rows[:, 1:5], 2)  # top-2 of the rater mean
    assert kept.tolist() == [0, 2]  # visual tokens {1, 3}
    hidden = torch.arange(8.0).reshape(4, 2)
    centers, members = F.sparsevlm_recycle(relevance, kept, hidden)
    assert centers.tolist() == [1] and [m.tolist() for m in members] == [[1]]  # cand = top-(int(0.6)+1) = {2}


def test_dpc_knn_worked_example():
    x = torch.tensor([(0, 0), (0.3, 0), (0, 0.5), (4, 4), (4.2, 4.4), (3.8, 4.3), (-5, 3), (-5.6, 3.1), (-5.2, 2.6)])
    centers, assign = F.dpc_knn(x, 3)
    assert centers.tolist() == [5, 0, 6]
    assert assign.tolist() == [1, 1, 1, 0, 0, 0, 2, 2, 2]
    merged = torch.stack([x[assign == c].mean(0) for c in range(3)])
    torch.testing.assert_close(merged, torch.tensor([(4.0, 4.2333), (0.1, 0.1667), (-5.2667, 2.9)]), atol=1e-4,
                               rtol=0)


def test_adaptinfer_worked_example_differs_from_the_plain_mean():
    text_text = torch.tensor([[[.15, 0, 0], [.05, .35, 0], [.05, .30, .10]]])
    text_visual = torch.tensor([[[.55, .05, .05, .05], [.02, .05, .20, .03], [.02, .05, .25, .03]]])
    torch.testing.assert_close(F.adaptinfer_scores(text_text, text_visual),
                               torch.tensor([.1605, .0700, .2650, .0470]), atol=1e-4, rtol=0)
    assert F.adaptinfer(text_text, text_visual, 1).tolist() == [2]  # visual token 3
    assert F.adaptinfer(text_text, text_visual, 2).tolist() == [0, 2]  # {1, 3}
    assert F.fastv(text_visual, 1).tolist() == [0]  # the plain mean over text rows would keep {1}


def test_paper_tables_and_budget_convention():
    assert SparseVLM().counts(576, 192, 32) == [300, 200, 110]
    assert SparseVLM().counts(576, 64, 32) == [66, 30, 17]
    assert SparseVLM().counts(576, 0.5 / 1.5, 32) == [300, 200, 110]  # ratio 1/3 = "192"
    assert SparseVLM().counts(2880, 960, 32) == [1500, 1000, 550]  # rescaled by n / 576 (LLaVA-NeXT)
    assert SparseVLM().counts(576, 1.0, 32) == [576, 576, 576]
    assert AdaptInfer().counts(576, 128, 32) == [290, 72, 18]
    assert AdaptInfer().counts(576, 32, 32) == [40, 12, 1]  # official 0 -> at least one token
    assert [p.layer for p in SparseVLM().plan(32)] == [3, 7, 16]
    assert [p.score_layer for p in SparseVLM().plan(32)] == [2, 6, 15]
    assert [p.layer for p in AdaptInfer().plan(32)] == [2, 11, 21]
    assert [p.layer for p in SparseVLM().plan(28)] == [3, 7, 16]  # the official layers on any depth (Qwen: 28)
    with pytest.raises(ValueError, match=r"sparsevlm: pruning layers \[3, 7, 16\].*4-layer.*set layers="):
        SparseVLM().check_layers(4)
    assert [p.layer for p in SparseVLM(layers=(0, 1, 2)).check_layers(4)] == [1, 2, 3]
    with pytest.raises(ValueError, match="3 strictly increasing"):
        SparseVLM(layers=(2, 6))


# --- the loop: extra tokens' place, hidden state and position ---------------------------------------------------


@dataclasses.dataclass
class _FirstAndRecycle(DecoderMethod):
    """Test method: keeps the first ``k - 1`` visual tokens in place and the LAST one with a new hidden state
    (2x itself), and appends one extra token standing for the token before it, 0.25 / 0.75 of the two tokens
    before the last; one stage at layer 1 (scored on layer 0)."""

    name = "testrecycle"
    paper = "test"
    positions = "reindex"

    def plan(self, n_layers):
        return (StagePlan(layer=1, score_layer=0),)

    def counts(self, n, keep, n_layers):
        return [n if keep == 1.0 else 4]

    def select_stage(self, stage, row, images):
        out = []
        for slots, k in images:
            n = slots.numel()
            kept = torch.cat([torch.arange(k - 1), torch.tensor([n - 1])])
            groups = [(k - 1, torch.tensor([n - 1]), torch.tensor([2.0])),
                      (k, torch.tensor([n - 3, n - 2]), torch.tensor([0.25, 0.75]))]
            out.append(Recycled.merge_groups(kept, torch.tensor([n - 2]), groups, n))
        return out


def _capture(model):
    seen = {}

    def out0(module, args, output):
        seen.setdefault("h0", (output[0] if isinstance(output, tuple) else output).detach())  # first call only

    def pre1(module, args, kwargs):
        seen.setdefault("h1", (args[0] if args else kwargs["hidden_states"]).detach())
        seen.setdefault("cos1", kwargs["position_embeddings"][0].detach())

    def pre0(module, args, kwargs):
        seen.setdefault("cos0", kwargs["position_embeddings"][0].detach())

    layers = model.model.language_model.layers
    return seen, [layers[0].register_forward_hook(out0), layers[1].register_forward_pre_hook(pre1, with_kwargs=True),
                  layers[0].register_forward_pre_hook(pre0, with_kwargs=True)]


@pytest.mark.parametrize("family", ["llava", "qwen2.5"])
def test_extra_tokens_placed_after_the_kept_ones_with_mixed_states_and_positions(monkeypatch, family):
    monkeypatch.setitem(METHODS, _FirstAndRecycle.name, _FirstAndRecycle)
    if family == "llava":
        model, processor = tiny_llava(LlavaSize(text_layers=4))
        inputs = processor(images=[random_image(40, 70, seed=1)], text=["USER : <image>\nwhat is it ? ASSISTANT :"],
                           return_tensors="pt")
        image_token = model.config.image_token_id
    else:
        model, processor = tiny_qwen("2.5", text_layers=4)
        inputs = processor(text=["USER : <|vision_start|><|image_pad|><|vision_end|>what is it ? ASSISTANT :"],
                           images=[random_image(56, 84, seed=1)])
        image_token = model.config.image_token_id
    ids = inputs["input_ids"][0]
    vis = (ids == image_token).nonzero().squeeze(1)
    v0, n = int(vis[0]), vis.numel()
    handle = enable_pruning(model, "testrecycle", keep=0.5)
    seen, hooks = _capture(model)
    try:
        with torch.no_grad():
            model(**inputs)
            cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        disable_pruning(model)
    assert torch.equal(cached, uncached)
    h0, h1 = seen["h0"][0], seen["h1"][0]
    rest = torch.arange(v0 + n, ids.numel())
    order = torch.cat([torch.arange(v0 + 3), torch.tensor([v0 + n - 1, v0 + n - 2]), rest])  # kept, last, extra
    assert h1.shape[0] == order.numel()
    torch.testing.assert_close(h1[: v0 + 3], h0[: v0 + 3], rtol=0, atol=0)
    torch.testing.assert_close(h1[v0 + 3], (2.0 * h0[v0 + n - 1].float()).to(h1.dtype))
    torch.testing.assert_close(h1[v0 + 4], (0.25 * h0[v0 + n - 3].float() + 0.75 * h0[v0 + n - 2].float()))
    torch.testing.assert_close(h1[v0 + 5:], h0[rest], rtol=0, atol=0)
    cos0, cos1 = seen["cos0"][0], seen["cos1"][0]
    if family == "llava":  # REINDEX: 0..N'-1, the extra token right after the last kept one
        assert torch.equal(cos1, cos0[: order.numel()])
    else:  # Qwen: KEEP, the extra token at its representative's M-RoPE position
        assert torch.equal(cos1, cos0[order])
    record = handle.last
    assert record.images[0].n_merged == 1 and record.images[0].kept.tolist() == [0, 1, 2, n - 1]
    assert record.visual_per_layer == (n, 5, 5, 5) and record.n_kept == 5


def test_sparsevlm_recycled_tokens_on_a_32_layer_llava():
    """The official layers on a 32-layer LLM: full prompt up to layer 2, the table's counts plus the recycled
    tokens after layers 2 / 6 / 15 (64 visual tokens: the "192" table, keep=1/3, rescaled by 64/576)."""
    model, processor = tiny_llava(LlavaSize(text_layers=32))
    inputs = processor(images=[random_image(40, 70, seed=1)], text=["USER : <image>\nwhat is it ? ASSISTANT :"],
                       return_tensors="pt")
    handle = enable_pruning(model, "sparsevlm", keep=1 / 3)
    with torch.no_grad():
        out = model(**inputs)
    disable_pruning(model)
    n = handle.last.images[0].n
    kept = SparseVLM().counts(n, 1 / 3, 32)
    assert kept == [round(c * n / 576) for c in (300, 200, 110)]
    per_layer = handle.last.visual_per_layer
    assert per_layer[:3] == (n,) * 3
    stages = [per_layer[3], per_layer[7], per_layer[16]]
    assert len(set(per_layer[3:7])) == len(set(per_layer[7:16])) == len(set(per_layer[16:])) == 1
    recycled = [s - k for s, k in zip(stages, kept, strict=True)]
    assert all(r >= 1 for r in recycled)  # every stage recycles at least one token (int(0.3 m) + 1 candidates)
    image = handle.last.images[0]
    assert image.n_merged >= recycled[-1] and image.kept.numel() + image.n_merged == per_layer[-1]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == list(handle.last.tokens_per_layer)


# --- VFlowOpt -------------------------------------------------------------------------------------------------


def test_vflowopt_worked_example():
    from tokenprune.functional.vflowopt import vflowopt_config

    attention = torch.tensor([[.10, .50, .10, .10, .10, .10], [.05, .60, .05, .10, .10, .10],
                              [.10, .40, .20, .10, .10, .10], [.10, .50, .05, .05, .20, .10],
                              [.20, .30, .10, .10, .20, .10], [.30, .20, .10, .10, .10, .20]])
    entropy = torch.tensor([1, 2, 3, 0.5, 4, 2.5])
    imp = F.vflowopt_importance(attention, 2.0, entropy, alpha_v=0.5)  # G = {1}
    torch.testing.assert_close(imp, torch.tensor([.0638, .6375, .1518, .1084, .3768, .1618]), atol=1e-4, rtol=0)
    kept, groups = F.vflowopt_recycle(imp, (2, 3), 0.5, 2.0)  # reduce 3 + n_merge 1: remove [0, 3, 2, 5]
    assert kept.tolist() == [1, 3, 4, 5]
    assert [(rep, m.tolist()) for rep, m, _ in groups] == [(3, [0, 3]), (5, [2, 5])]
    torch.testing.assert_close(groups[0][2], torch.tensor([.3705, .6295]), atol=1e-4, rtol=0)
    torch.testing.assert_close(groups[1][2], torch.tensor([.4842, .5158]), atol=1e-4, rtol=0)
    assert F.vflowopt_llm_counts(4, (1.0, 0.5)) == [4, 2]
    assert F.vflowopt_llm(imp[kept], 2).tolist() == [0, 2]  # layer 18 keeps {1, 4}
    flat = torch.full((6, 6), 1 / 6)  # no global token above t x mean: every row counts (no NaN)
    torch.testing.assert_close(F.vflowopt_importance(flat, 2.0), torch.full((6,), 1 / 6))
    assert vflowopt_config(0.10).llm_r == (1.0, 0.6011) and vflowopt_config(1.0).r_vit == 1.0


def test_vflowopt_needs_the_vit_attention_map_and_a_ratio():
    model, _ = tiny_qwen("2", text_layers=4)
    with pytest.raises(ValueError, match="attention_map.*qwen2_vl"):
        enable_pruning(model, "vflowopt", keep=0.25)
    model, _ = tiny_llava(LlavaSize(text_layers=4))
    with pytest.raises(ValueError, match="layer-averaged share"):
        enable_pruning(model, "vflowopt", keep=64)


def test_vflowopt_calibration_search_returns_a_config_within_budget():
    from tokenprune.calibration import search_vflowopt
    from tokenprune.methods import VFlowOpt

    model, processor = tiny_llava(LlavaSize(text_layers=4))
    batches = [processor(images=[random_image(40, 70, seed=s)], text=["USER : <image>\nwhat is it ? ASSISTANT :"],
                         return_tensors="pt") for s in (1, 2)]
    # 4 layers and 64 tokens round coarsely: the shipped 25% config averages ~27% here, hence the tolerance
    best, rows = search_vflowopt(model, batches, budget=0.25, trials=3, seed=0, tolerance=0.05, layers=(1, 3))
    assert len(rows) == 3 and rows[0]["accepted"] and all(r["kl"] >= 0 for r in rows)
    assert [r["kl"] for r in rows if r["accepted"]] == sorted(r["kl"] for r in rows if r["accepted"])
    assert any(r["r_vit"] == 0.2651 for r in rows)  # the shipped 25% config is always a candidate
    assert rows[0]["kl"] > 0  # pruning changed the next-token distribution: the cost measures something
    handle = enable_pruning(model, VFlowOpt.from_config(best, layers=(1, 3)), keep=0.25)
    with torch.no_grad():
        model(**batches[0])
    disable_pruning(model)
    n = int((batches[0]["input_ids"] == model.config.image_token_id).sum())
    assert handle.last.average_visual / n <= 0.25 + 0.05
