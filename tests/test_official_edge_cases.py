"""Edge cases where a rounding, tie or indexing rule of the official code decides the result. Each expected value is
worked out from the official code's arithmetic on a small hand-made input (file and function in each docstring)."""

from fractions import Fraction

import torch

from tokenprune import functional as F
from tokenprune.functional.visiondrop_llm import visiondrop_merge_groups
from tokenprune.methods import (
    CLS_ATTENTION,
    CLS_HIDDEN,
    VISION_HIDDEN,
    VISION_KEYS,
    SelectionContext,
    TransPrune,
    VisionZip,
)


def _recoverable_input():
    """7 patches, hidden width 3: the LOF fractions (2 neighbours) are 1/6 on the [CLS] attention (visual filter
    keeps token 4) and 2/5 on the rest (int(3 * 0.4) = 1 cluster centre: token 2); text similarity constant (no
    text recovery). Rest list = tokens [0, 1, 2, 3, 5]: rest-list position 4 holds token 5."""
    attn = torch.tensor([0.1, 0.502, 0.906, 0.131, 0.91, 0.106])
    sim = torch.zeros(6)
    hidden = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]])
    keys = torch.tensor([[0.5, 1.0], [-1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.1]])
    return attn, sim, hidden, keys


def test_recoverable_merges_with_the_official_key_gather_under_quirks():
    """Official ``llava/model/multimodal_encoder/clip_encoder.py``,
    ``token_recycling_with_text_in_vision_and_clustring``: ``Key_others = gather(Key_wo_cls, idx)`` and
    ``non_topk_Key = gather(Key_wo_cls, compl)`` index the patch keys by REST-LIST position. The centre (token 2,
    position 2) gets key[2] = (1, 0); the candidates 0, 1, 3, 5 get key[0], key[1], key[3] and key[4] (position 4),
    cosines 0.447, -1, 0.707, 0 -> with a cluster of one, token 3 joins the centre: row = x[2] + attn[3] * x[3].
    With each token's own key (quirks=False) token 5 (key (1, 0.1), cosine 0.995) joins instead."""
    attn, sim, hidden, keys = _recoverable_input()
    kw = {"neighbors": 2, "rest_neighbors": 2, "cluster_size": 1}
    assert F.lof_outlier_fraction(attn, 2) == 1 / 6 and F.lof_outlier_fraction(attn[[0, 1, 2, 3, 5]], 2) == 0.4
    others = attn[[0, 1, 3, 5], None] * hidden[[0, 1, 3, 5]]  # the attention-weighted sum of the non-centres
    main, merged = F.recoverable(attn, sim, hidden, keys, **kw)
    assert main.tolist() == [4]
    expected = torch.stack([hidden[2] + attn[3] * hidden[3], others.sum(dim=0)])
    torch.testing.assert_close(merged, expected)
    main_clean, merged_clean = F.recoverable(attn, sim, hidden, keys, quirks=False, **kw)
    assert main_clean.tolist() == [4]  # the quirk changes the merged rows, never the kept indices
    # quirks=False also counts centres of the rest tokens, int(5 * 0.4) = 2: tokens 2 and 1
    assert merged_clean.shape[0] == 3


def test_recoverable_quirk_is_invisible_when_the_rest_list_is_0_to_r():
    """When the main tokens are the last ones, rest-list position p IS patch p: both key rules agree."""
    attn, sim, hidden, keys = _recoverable_input()
    order = torch.tensor([0, 1, 2, 3, 5, 4])  # move the visual token (0.91) to the end
    kw = {"neighbors": 2, "rest_neighbors": 2, "cluster_size": 1}
    main, merged = F.recoverable(attn[order], sim, hidden[order], keys[order], **kw)
    assert main.tolist() == [5]
    x, a = hidden[order], attn[order]
    torch.testing.assert_close(merged[0], x[2] + a[4] * x[4])  # own key: (1, 0.1) of token 5, now at index 4


def test_vflowopt_vision_count_rounds_half_to_even():
    """Official ``llava_qwen_training_free.py`` (``prepare_inputs_labels_for_multimodal``): ``reduce_tokens =
    round(image_token_length * (1 - illava_vit_r))`` with Python's ``round``: 36 * 0.125 = 4.5 -> 4 (half up
    would give 5); ``num_merged_tokens = int(36 / 7**2) = 0``. The 4 least important (0..3) are removed, all in one
    7 x 7 cell, recycled into the most important member, token 3."""
    kept, groups = F.vflowopt_recycle(torch.arange(36.0), (6, 6), 0.875, 7.0)
    assert kept.tolist() == list(range(3, 36))
    assert [(rep, members.tolist()) for rep, members, _ in groups] == [(3, [0, 1, 2, 3])]


def test_vflowopt_llm_counts_round_half_to_even_on_the_current_count():
    """Official patched ``transformers/models/qwen2/modeling_qwen2.py``, ``Qwen2Model.forward_illava``:
    ``r = round(image_token_length * (1 - r_val))``, then ``image_token_length -= r``: 66 * 0.25 = 16.5 -> 16
    removed (50 left), 50 * 0.5 = 25 -> 25 left; 42 * 0.25 = 10.5 -> 10 removed (32 left)."""
    assert F.vflowopt_llm_counts(66, (0.75, 0.5)) == [50, 25]
    assert F.vflowopt_llm_counts(42, (0.75, 1.0)) == [32, 32]


def test_vflowopt_llm_removes_the_lower_index_on_a_tie_at_the_cut():
    """Official ``forward_illava``: ``low_k = torch.sort(combined_attn).indices[:r]`` removes the ``r`` least
    important by an ascending sort: of the tied 0.2 at indices 1 and 2, index 1 is removed, index 2 kept."""
    importance = torch.tensor([0.5, 0.2, 0.2, 0.9])
    assert F.vflowopt_llm(importance, 3).tolist() == [0, 2, 3]
    assert F.vflowopt_llm(torch.full((5,), 0.3), 2).tolist() == [3, 4]
    assert F.vflowopt_llm(importance, 4).tolist() == [0, 1, 2, 3]


def test_transprune_counts_truncate_as_the_official_int():
    """Official ``llava/model/modeling_llama_transprune.py``: ``keep_length = [int(cur_image_token *
    image_token_ratio_list[cur_num + 1]) ...]``: 2880 * 0.35 = 1007.999... -> 1007; 576 * 0.875 = 504."""
    assert F.transprune_counts(2880, (0.35,)) == [1007]
    assert F.transprune_counts(576, (0.875, 0.625, 0.125)) == [504, 360, 72]
    assert F.transprune_counts(100, (0.001,)) == [1]  # the floor of one (officially 0 tokens)


def test_transprune_layer_average_budget_gives_the_official_schedule_exactly():
    """The solved scale for the official layer average (236.25 / 576 on 32 layers) is exactly 1, so the truncating
    counts are the official 504 / 360 / 72 and not one less from bisection noise."""
    assert F.transprune_scale(0.41015625, (0.875, 0.625, 0.125), (7, 9, 12), 32) == 1.0
    assert TransPrune().counts(576, 0.41015625, 32) == [504, 360, 72]


def _merge_input(n):
    g = torch.Generator().manual_seed(0)
    scores = torch.linspace(1.0, 0.0, n)[torch.randperm(n, generator=g)]
    return scores, torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


def test_visionzip_splits_when_dominant_plus_contextual_reaches_n():
    """Official ``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``): 30 dominant + 6 contextual of
    36 patches: the 6 remaining tokens give ``step = max(1, 6 // 6) = 1``, ``target_indices = [0..5]``, nothing to
    merge, so each contextual token is its own remaining token (``target_hidden + 0``), in raster order."""
    scores, hidden, keys = _merge_input(36)
    kept, merged, assign = F.visionzip_with_assign(scores, hidden, keys, 30, 6)
    top = torch.sort(torch.argsort(scores, descending=True)[:30]).values
    rest = torch.tensor(sorted(set(range(36)) - set(top.tolist())))
    assert kept.tolist() == top.tolist()
    torch.testing.assert_close(merged, hidden[rest])
    assert assign[rest].tolist() == list(range(6)) and bool((assign[top] == -1).all())
    # more contextual tokens asked than remain (the official code fails on the shapes): one per remaining token
    kept, merged, _ = F.visionzip_with_assign(scores, hidden, keys, 32, 6)
    assert kept.numel() == 32 and merged.shape[0] == 4
    kept, merged, _ = F.visionzip_with_assign(scores, hidden, keys, 36, 6)  # dominant >= N: every token as it is
    assert kept.tolist() == list(range(36)) and merged.shape[0] == 0


def test_visiondrop_vision_and_llm_stages_split_the_same_way():
    """Official VisionDrop (``llava/model/modeling_llama_visiondrop.py`` LLM stages and the VisionZip code of its
    ViT stage): the same ``step`` / ``target_indices`` rule, so 30 + 5 of 35 makes the 5 remaining tokens 5
    contextual tokens, each its own target with weight 1 and no other member."""
    scores, hidden, keys = _merge_input(35)
    attention = scores[None].repeat(3, 1)  # [Q, N] rows whose column mean is the score
    kept, merged, _ = F.visiondrop(attention, hidden, keys, 30, 5)
    rest = torch.tensor(sorted(set(range(35)) - set(kept.tolist())))
    assert kept.numel() == 30
    torch.testing.assert_close(merged, hidden[rest])
    kept_llm, targets, groups = visiondrop_merge_groups(attention, hidden, keys, 30, 5)
    assert kept_llm.tolist() == kept.tolist() and targets.tolist() == rest.tolist()
    assert [(m.tolist(), w.tolist()) for m, w in groups] == [([int(t)], [1.0]) for t in rest]


def test_pdrop_counts_truncate_as_the_official_int():
    """Official ``llava/model/modeling_llama_pdrop.py`` (``LlamaModel.forward``): ``keep_length =
    [int(cur_image_token * image_token_ratio_list[cur_num + 1]) ...]``: 2880 * 0.35 = 1007.999... -> 1007; the
    solved lambda for the paper's layer average (270 / 576 on 32 layers) is exactly 0.5 -> 288 / 144 / 72."""
    assert F.pdrop_counts(2880, 0.35, 1) == [1007]
    assert F.pdrop_ratio(0.46875, (8, 16, 24), 32) == 0.5
    assert F.pdrop_counts(576, F.pdrop_ratio(0.46875, (8, 16, 24), 32), 3) == [288, 144, 72]


def test_feather_counts_truncate_the_official_float_products():
    """Official ``prismatic/models/backbones/llm/llama2_models.py``: stage 1 ``topk(int(len(image_indices) *
    fastV_ratio))``, stage 2 ``int(len(image_indices) * (fastV_ratio * fastV_ratio))`` in floats: 360 * 0.35 =
    125.99999999999999 -> 125; 400 * (0.35 * 0.35) = 48.99999999999999 -> 48. An int keep (a Fraction) is exact."""
    assert F.feather_counts(360, 0.35)[0] == 125
    assert F.feather_counts(400, 0.35)[1] == 48
    assert F.feather_counts(576, 0.3) == (172, 51)
    assert F.feather_counts(22, Fraction(15, 22))[0] == 15


def test_visionzip_method_full_budget_keeps_the_image_or_splits_as_official():
    """Official ``visionzip/main.py`` + ``clip_encoder.py`` with ``dominant=4, contextual=2`` on 6 patches (the
    budget covers every patch: ``dominant + contextual == N``): ``dominant_num = 3`` patches by summed [CLS]
    attention -> 0.30, 0.25, 0.16 = patches 1, 4, 5 (raster order after [CLS]); the rest list is patches 0, 2, 3,
    ``step = max(1, 3 // 2) = 1``, ``target_indices = [0, 1]`` -> targets 0 and 2; patch 3, key (0.1, 0.9), has
    cosine 0.110 with (1, 0) and 0.994 with (0, 1): it joins target 2. Contextual tokens: x0 + 0 = (1, 0) and
    x2 + x3 = (0.1, 1.9). Layout: [CLS], x1, x4, x5, (1, 0), (0.1, 1.9) -- six tokens, not the image unchanged.
    By default (``split_full_budget=False``) the same budget keeps the six patches as they are (``keep=1.0``
    bit-identical), a declared deviation."""
    x = torch.tensor([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [0.7, 0.7]])
    signals = {CLS_ATTENTION: torch.tensor([[0.05, 0.30, 0.10, 0.14, 0.25, 0.16]]), VISION_HIDDEN: x,
               VISION_KEYS: x[None], CLS_HIDDEN: torch.tensor([0.5, 0.5])}
    ctx = SelectionContext(k=6, n=6, signals=signals)
    sel = VisionZip(dominant=4, contextual=2, split_full_budget=True).select(ctx)
    assert sel.kept.tolist() == [1, 4, 5] and sel.lead == 1
    torch.testing.assert_close(sel.merged, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.1, 1.9]]))
    assert sel.assign.tolist() == [1, -1, 2, 2, -1, -1]  # merged row 0 is [CLS]
    assert VisionZip(dominant=4, contextual=2).select(ctx).tolist() == list(range(6))
    assert any(d.restore == "split_full_budget=True" for d in VisionZip.deviations)
