"""Selection rules of FEATHER, ToDRE, TransPrune and DART against hand-computed worked examples."""

import math

import pytest
import torch
from conftest import PROMPT

from tokenprune import functional as F
from tokenprune.functional.dart import dart, dart_count
from tokenprune.functional.feather import feather, feather_counts, feather_uniform, raster_coords
from tokenprune.functional.todre import todre_drop_all, todre_text_to_visual
from tokenprune.functional.transprune import transprune, transprune_scores, transprune_ttv
from tokenprune.methods import DART, FEATHER, ToDRE, TransPrune
from tokenprune.patches.attention_rows import attention_rows, attention_rows_no_rope
from tokenprune.patches.decoder_grids import visual_coords
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava


def _unit(degrees):
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_dart_worked_example_and_pivot_order():
    """§10: S={0,1}, V={2..9}, T={10,11,12}; 1+1 pivots, M=4 -> TOPK=2; the visiting order of the pivots matters."""
    norms = torch.tensor([0, 0, 3, 9, 1, 4, 2, 8, 5, 7, 2, 6, 1], dtype=torch.float)
    states = _unit([0, 0, 0, 10, 90, 180, 235, 100, 195, 290, 0, 60, 300])
    states[:2] = torch.tensor([1.0, 0.0])
    visual, text = torch.arange(2, 10), torch.arange(10, 13)
    k = dart_count(8, 4, image_pivots=1, text_pivots=1)
    assert k == 5  # 1 + 2 * TOPK
    image_first = dart(norms, states, visual, text, k, 2, 1, 1, order="image-first")
    assert (visual[image_first]).tolist() == [3, 5, 6, 8, 9]
    official = dart(norms, states, visual, text, k, 2, 1, 1, order="official")  # list(set([3, 11])) == [11, 3]
    assert (visual[official]).tolist() == [3, 5, 6, 7, 8]


def test_dart_counts_follow_the_official_budget_convention():
    """4 + 8 * (M // 8): 128 -> 132, 192 -> 196, 64 -> 68 of 576; keep=1.0 keeps everything."""
    method = DART()
    assert [method.counts(576, m, 32)[0] for m in (128, 192, 64)] == [132, 196, 68]
    assert method.counts(576, 0.222, 32) == [132]  # 0.222 * 576 = 127.9 -> M = 128
    assert method.counts(577, 1.0, 32) == [577] and method.counts(20, 0.5, 32) == [12]
    assert [(p.layer, p.score_layer) for p in method.plan(32)] == [(2, 1)]


def test_dart_fills_up_when_there_are_too_few_text_pivots():
    torch.manual_seed(0)
    states, norms = torch.randn(12, 6), torch.rand(12)
    visual, text = torch.arange(1, 11), torch.arange(11, 12)  # one text token for 4 text pivots
    kept = dart(norms, states, visual, text, 9, 1, 4, 4)
    assert kept.numel() == 9 and bool((kept[1:] > kept[:-1]).all())


def test_feather_worked_example_two_stages():
    """§5: 6x6 grid, rho=0.3, stride 3: stage 1 = top-10 U {0,3,18,21} (14); stage 2 keeps int(14*0.09)=1."""
    i = torch.arange(36)
    k1, _ = feather_counts(36, 0.3)
    assert k1 == 10  # int(10.8)
    uniform = feather_uniform(raster_coords(6, 6), 3)
    assert uniform.tolist() == [0, 3, 18, 21]
    s1 = ((7 * i) % 36).float() / 100
    kept = feather(s1, k1, uniform)
    assert kept.tolist() == [0, 3, 4, 5, 9, 10, 14, 15, 18, 20, 21, 25, 30, 35]
    method = FEATHER()
    k2 = method.stage_count(1, 36, kept.numel(), 0.3, 32)
    assert k2 == 1  # rho**2 of the STAGE-1 count, not of the original 36 (§5 pitfall 6)
    s2 = ((5 * kept) % 36).float() / 100  # uniform tokens are not protected at stage 2
    assert kept[feather(s2, k2)].tolist() == [14]
    assert kept[feather(s2, 3)].tolist() == [14, 21, 35]  # the larger-fraction variant of the example


def test_feather_schedule_and_budget_convention():
    method = FEATHER()
    assert [(p.layer, p.score_layer) for p in method.plan(32)] == [(8, 7), (16, 15)]
    assert method.counts(576, 0.3, 32) == [172, 15]  # int(172.8); stage-2 hint int(172 * 0.09)
    assert method.stage_count(1, 576, 230, 0.3, 32) == 20  # int(230 * 0.09) of what stage 1 left
    assert method.counts(729, 0.3, 32)[0] == 218  # §5 pitfall 4: 0.3 * 729 = 218.7 -> 218
    assert method.counts(576, 1.0, 32) == [576, 576]
    assert feather_uniform(raster_coords(24, 24), 3).numel() == 64
    assert feather_uniform(torch.full((20, 2), -1), 3).tolist() == [0, 9, 18]  # no raster: every 9th token
    assert feather_uniform(raster_coords(3, 5), 3).tolist() == [0, 3]  # Qwen 84 x 140: a 3 x 5 merged grid


def test_feather_scores_are_rope_free_and_normalised_over_image_keys():
    """The no-RoPE row equals a hand computation from the layer's projections; it sums to 1 over the image keys
    (FastV's row sums to less: its softmax covers every key) and differs from the RoPE row."""
    model, processor = tiny_llava(LlavaSize(text_layers=2))
    inputs = processor(images=[random_image(80, 96, seed=1)], text=[PROMPT], return_tensors="pt")
    layer, seen = model.model.language_model.layers[1], {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: seen.update(h=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    h, (cos, sin) = seen["h"], seen["pe"]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    last = torch.tensor([[h.shape[1] - 1]])
    got = attention_rows_no_rope(layer, h, last, image[None])[0].mean(dim=(0, 1))
    attn = layer.self_attn
    with torch.no_grad():
        x = layer.input_layernorm(h[0])
        q = attn.q_proj(x[-1]).view(-1, attn.head_dim)
        k = attn.k_proj(x[image]).view(image.numel(), -1, attn.head_dim).transpose(0, 1)
        k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # GQA
    expected = torch.softmax((q[:, None] * k).sum(-1) * attn.scaling, dim=-1).mean(0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert abs(float(got.sum()) - 1) < 1e-5
    with_rope = attention_rows(layer, h, last, cos, sin, torch.ones(1, h.shape[1], dtype=torch.bool))[0, :, 0, image]
    assert float(with_rope.mean(0).sum()) < 1 - 1e-3 and not torch.allclose(with_rope.mean(0), got)


def test_todre_worked_example_stage1_maxsum_vs_kcenter():
    """§6: unit features at [120, 90, 240, 75, 225, 285] degrees, pivot 0, k=3: max-sum {0,5,3}, k-center {0,5,4}."""
    features = _unit([120, 90, 240, 75, 225, 285])
    assert F.kcenter(features, 3, 0, rule="maxsum").tolist() == [0, 3, 5]
    assert F.kcenter(features, 3, 0, rule="kcenter").tolist() == [0, 4, 5]
    assert ToDRE().stages()[0].rule == "maxsum" and ToDRE(rule="kcenter").stages()[0].rule == "kcenter"


def test_todre_worked_example_stage2():
    """§6: S={0}, V={1,2}, T={3,4}; alpha_{t->v} = 0.07 < 0.10 (alpha_{v->t} = 0) -> drop every visual token."""
    rows = torch.tensor([[.70, .05, .03, .22, 0], [.60, .02, .04, .14, .20]])
    alpha = todre_text_to_visual(rows[None], torch.tensor([1, 2]))
    assert alpha == pytest.approx(0.07)
    assert todre_drop_all(alpha, 0.0, 0.10) and not todre_drop_all(alpha, 0.0, 0.05)
    relevance = ToDRE().stages()[1]
    assert [(p.layer, p.score_layer) for p in relevance.plan(32)] == [(29, 28)]  # l = 7L/8, pruned after it
    assert [(p.layer, p.score_layer) for p in relevance.plan(28)] == [(25, 24)]
    with pytest.raises(ValueError, match=r"todre-relevance: pruning layers \[4\].*set layer="):
        relevance.check_layers(4)  # 7L/8 = 3 is the last layer: refused (no shallow-model clamp), layer= is asked
    assert relevance.counts(576, 0.25, 32) == [0] and relevance.counts(576, 1.0, 32) == [576]
    assert ToDRE().stage_keeps(0.25) == (0.25, 0.25)
    with pytest.raises(ValueError, match="tau"):
        ToDRE(tau=0.0)
    with pytest.raises(ValueError, match="rule"):
        ToDRE(rule="kmeans")


def test_visual_coords_from_mrope_positions_and_square_llava_runs():
    image_of = torch.tensor([[-1, 0, 0, 0, 0, 0, 0, -1]])  # one 2 x 3 image after one text token
    t = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 4]])
    h = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 4]])
    w = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 4]])
    coords = visual_coords("qwen2_5_vl", image_of, torch.stack([t, t, h, w]))  # [4, B, N]: text row + t, h, w
    assert coords[0, 1:7].tolist() == raster_coords(2, 3).tolist() and coords[0, 0].tolist() == [-1, -1]
    square = visual_coords("llava", torch.tensor([[-1, 0, 0, 0, 0]]), None)
    assert square[0, 1:].tolist() == raster_coords(2, 2).tolist()
    assert bool((visual_coords("llava_next", torch.tensor([[0, 0, 0]]), None) == -1).all())


def test_transprune_worked_example():
    """§7: tokens 0 sys, 1-4 image, 5-6 text; one accumulating layer; score -> keep 2 -> {3,4} (IGA only {2,4},
    TTV only {2,3})."""
    attn_in = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1], [2, 0], [1, 0], [0, 1]], dtype=torch.float)
    attn_out = torch.tensor([[1, 0], [0, 1], [0, 2], [-3, 3], [-1, 0], [1, 1], [0, 1]], dtype=torch.float)
    ffn_in = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 1], [1, 0], [1, 0], [1, 0]], dtype=torch.float)
    ffn_out = torch.tensor([[2, 0], [1, 1], [0, 1], [0, 3], [1, 0.5], [1, 0], [1, 0]], dtype=torch.float)
    ttv = transprune_ttv(attn_in, attn_out) + transprune_ttv(ffn_in, ffn_out)
    torch.testing.assert_close(ttv, torch.tensor([.2848, .2716, .4244, .8148, .3559, .2237, .1715]), atol=1e-4, rtol=0)
    image = torch.arange(1, 5)
    torch.testing.assert_close(ttv[image] / ttv[image].sum(), torch.tensor([.1455, .2273, .4365, .1907]), atol=1e-4,
                               rtol=0)
    rows = torch.tensor([[.3, .1, .2, .05, .15, .2, 0], [.2, .05, .1, .05, .3, .1, .2]])
    iga = rows.mean(0)[image]
    torch.testing.assert_close(transprune_scores(ttv[image], iga), torch.tensor([.2955, .5273, .5365, .6407]),
                               atol=1e-4, rtol=0)
    assert (image[transprune(ttv[image], iga, 2)]).tolist() == [3, 4]
    assert (image[transprune(torch.ones(4), iga, 2)]).tolist() == [2, 4]  # IGA only (flat TTV)
    assert (image[transprune(ttv[image], torch.ones(4), 2)]).tolist() == [2, 3]  # TTV only
    # padding never enters the softmax: a padded copy gives the same TTV on the real tokens
    padded = transprune_ttv(torch.cat([torch.ones(2, 2), attn_in]), torch.cat([torch.ones(2, 2), attn_out]),
                            torch.tensor([False, False] + [True] * 7))
    torch.testing.assert_close(padded[2:], transprune_ttv(attn_in, attn_out))
    assert padded[:2].tolist() == [0.0, 0.0]


def test_transprune_schedule_and_budget_convention():
    """Official: first pruned layers 7/9/12, TTV from layers 6..11, 576 -> 504/360/72 (layer average 236.25)."""
    method = TransPrune()
    assert [(p.layer, p.score_layer) for p in method.plan(32)] == [(7, 7), (9, 9), (12, 12)]
    assert method.observed_layers(32) == (6, 7, 8, 9, 10, 11)
    assert method.counts(576, 236.25 / 576, 32) == [504, 360, 72]
    assert TransPrune(scale=1.0).counts(576, 0.5, 32) == [504, 360, 72]
    assert F.layer_average([504, 360, 72], (7, 9, 12), 576, 32) == 236.25
    assert method.counts(576, 1.0, 32) == [576, 576, 576]
    with pytest.raises(ValueError, match=r"pruning layers \[7, 9, 12\].*4-layer.*set layers="):
        TransPrune().check_layers(4)  # the official layers do not exist on 4 layers: the error asks for layers=


def _tiny_run(method, spy_module, spy_name, watch=None, **options):
    """Run ``method`` on a 4-layer tiny LLaVA with the rule ``spy_module.spy_name`` wrapped (and ``watch(model)``
    called first, e.g. to add hooks): ``(calls, out, model, inputs)``."""
    from tokenprune import disable_pruning, enable_pruning

    model, processor = tiny_llava(LlavaSize(text_layers=4))
    inputs = processor(images=[random_image(80, 96, seed=1)], text=[PROMPT], return_tensors="pt")
    calls, original = [], getattr(spy_module, spy_name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(spy_module, spy_name, spy)
    if watch is not None:
        watch(model)
    try:
        enable_pruning(model, method, keep=0.5, **options)
        with torch.no_grad():
            out = model(**inputs)
    finally:
        setattr(spy_module, spy_name, original)
        disable_pruning(model)
    return calls, out, model, inputs


def test_dart_scores_with_the_keys_the_layer_caches_and_the_final_norm():
    import tokenprune.methods.dart as module

    seen = {}

    def watch(model):
        layer = model.model.language_model.layers[1]
        layer.register_forward_hook(lambda m, a, o: seen.update(h=(o[0] if isinstance(o, tuple) else o)[0]))

    calls, out, model, _ = _tiny_run("dart", module, "dart", watch=watch, k=2)
    norms, states = calls[0][0], calls[0][1]
    cached = out.past_key_values.layers[1].keys[0]  # [H_kv, N, d_h] post-RoPE keys of layer K-1 = 1 (full prompt)
    torch.testing.assert_close(norms, cached.float().abs().sum(dim=(0, 2)), atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # layer K-1's output through the model's final norm (not the raw hidden states)
        torch.testing.assert_close(states, model.model.language_model.norm(seen["h"]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(states, seen["h"])


def test_transprune_accumulates_ttv_of_the_layers_before_each_boundary():
    """Boundary 1 of layers (1, 2, 3) sees the TTV of layer 0 alone: its attention and MLP sublayer in/outs."""
    import tokenprune.methods.transprune as module

    model, processor = tiny_llava(LlavaSize(text_layers=4))
    inputs = processor(images=[random_image(80, 96, seed=1)], text=[PROMPT], return_tensors="pt")
    seen, layer = {}, model.model.language_model.layers[0]
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, kw, o: seen.update(attn=(kw["hidden_states"][0], o[0][0])), with_kwargs=True),
        layer.mlp.register_forward_hook(lambda m, a, o: seen.update(mlp=(a[0][0], o[0])))]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    expected = transprune_ttv(*seen["attn"]) + transprune_ttv(*seen["mlp"])
    calls, *_ = _tiny_run("transprune", module, "transprune", layers=(1, 2, 3))
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    torch.testing.assert_close(calls[0][0], expected[image], atol=1e-5, rtol=1e-4)
    assert len(calls) == 3 and calls[1][0].numel() < calls[0][0].numel()  # re-indexed after the first prune
