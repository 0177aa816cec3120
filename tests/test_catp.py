"""CATP (AAAI 2026): the worked examples, the selectors' properties, the budget split and the per-layer schedule,
the options, and the paired-text rule. Multi-image in-context prompts on models: tests/test_catp_multi_image.py."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune import functional as F
from tokenprune.budget import kept_count
from tokenprune.methods import METHODS
from tokenprune.methods.catp import CATP
from tokenprune.patches.paired_text import paired_text_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")

K = 6  # the paper's layer for the 7B models (LLaVA-NeXT-7B: 32 layers, Qwen2.5-VL-7B: 28)


# --- worked examples ----------------------------------------------------------------------------------------------
def test_stage1_worked_example():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8], [0.6, -0.8]])
    text = torch.tensor([[0.6, 0.8]])
    assert F.catp_submodular(x, text, 3).tolist() == [0, 1, 2]
    # the first greedy round is the alignment-weighted facility gain of the example: token 1 (4.386) wins
    assert F.catp_submodular(x, text, 1).tolist() == [1]
    assert F.catp_submodular(x, text, 2).tolist() == [1, 2]


def _unit_rows(cosines):
    return torch.tensor([[c, math.sqrt(1 - c * c)] for c in cosines])


def test_stage2_worked_example():
    a_k = torch.tensor([0.10, 0.02, 0.05, 0.08, 0.01, 0.03])
    a_prev = torch.tensor([0.04, 0.03, 0.01, 0.08, 0.00, 0.05])
    hidden, query = _unit_rows([0.2, 0.9, 0.1, 0.35, 0.5, 0.0]), torch.tensor([1.0, 0.0])
    scores = F.catp_context_scores(a_k, a_prev, hidden, query)
    assert torch.allclose(scores, torch.tensor([0.18, 0.54, 0.10, 0.21, 0.31, 0.0]), atol=1e-6)
    assert F.catp_context(a_k, a_prev, hidden, query, 3).tolist() == [1, 3, 4]
    # heads are averaged: two heads whose mean is the example's row give the same choice
    two = torch.stack([a_k * 2, torch.zeros(6)])
    assert F.catp_context(two, torch.stack([a_prev, a_prev]), hidden, query, 3).tolist() == [1, 3, 4]


def test_query_stage_keeps_the_tokens_closest_to_the_context():
    hidden = _unit_rows([0.1, 0.9, -0.5, 0.7])
    assert F.catp_query(hidden, torch.tensor([2.0, 0.0]), 2).tolist() == [1, 3]


# --- properties ---------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(kept, n, k):
    assert kept.dtype == torch.long and kept.ndim == 1
    assert bool((kept[1:] > kept[:-1]).all())
    assert kept.numel() == min(k, n)
    if kept.numel():
        assert 0 <= int(kept.min()) and int(kept.max()) < n
    if k >= n:
        assert kept.tolist() == list(range(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), d=st.integers(1, 6), k=st.integers(1, 30), seed=st.integers(0, 1000),
       kind=st.sampled_from(["random", "equal", "zero"]), dtype=st.sampled_from(DTYPES))
def test_selectors_contract(n, d, k, seed, kind, dtype):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        feats, attn = torch.randn(n, d, generator=g), torch.rand(2, n, generator=g)
    elif kind == "equal":  # every decision is a tie: the lowest indices win
        feats, attn = torch.ones(n, d), torch.full((2, n), 1.0 / n)
    else:  # zero vectors: cosine 0 to everything
        feats, attn = torch.zeros(n, d), torch.zeros(2, n)
    feats, attn = feats.to(dtype), attn.to(dtype)
    text = torch.randn(3, d, generator=g).to(dtype)
    for kept in (F.catp_submodular(feats, text, k), F.catp_context(attn, attn.flip(1), feats, text[0], k),
                 F.catp_query(feats, text[0], k)):
        _check(kept, n, k)
        if kind != "random" and k < n:
            assert kept.tolist() == list(range(k))
    assert torch.equal(F.catp_submodular(feats, text, k), F.catp_submodular(feats.float(), text.float(), k))


def test_degenerate_inputs():
    empty = torch.zeros(0, 4)
    assert F.catp_submodular(empty, torch.ones(1, 4), 3).numel() == 0
    assert F.catp_context(torch.zeros(0), torch.zeros(0), empty, torch.ones(4), 2).numel() == 0
    assert F.catp_query(empty, torch.ones(4), 2).numel() == 0
    with pytest.raises(ValueError, match="paired text"):
        F.catp_submodular(torch.ones(3, 4), torch.zeros(0, 4), 2)
    with pytest.raises(ValueError, match="same tokens"):
        F.catp_context(torch.rand(3), torch.rand(4), torch.rand(3, 2), torch.ones(2), 1)
    with pytest.raises(ValueError, match="k must be"):
        F.catp_query(torch.rand(3, 2), torch.ones(2), 0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), d=st.integers(2, 16), k=st.integers(1, 12), seed=st.integers(0, 1000),
       duplicates=st.booleans())
def test_stage1_is_the_greedy_maximiser_of_its_objective(n, d, k, seed, duplicates):
    """Every greedy step adds the token of largest marginal gain of F(Y) = facility location + lambda1 alignment,
    recomputed from scratch (the selector updates the gains incrementally); duplicated tokens tie."""
    g = torch.Generator().manual_seed(seed)
    x, text = torch.randn(n, d, generator=g), torch.randn(4, d, generator=g)
    if duplicates:
        x[n // 2:] = x[: n - n // 2].clone()
    unit = x / x.norm(dim=1, keepdim=True)
    sim = (unit @ unit.T + 1) / 2
    v = text.mean(0)
    align = (unit @ (v / v.norm()) + 1) / 2

    def objective(chosen):
        return (sim[chosen].max(0).values.sum() + 0.7 * align[chosen].sum()) if chosen else torch.tensor(0.0)

    chosen = []
    for _ in range(min(k, n)):
        gains = [float(objective(chosen + [i]) - objective(chosen)) if i not in chosen else -1e9 for i in range(n)]
        best = max(gains)
        chosen.append(next(i for i in range(n) if gains[i] >= best - 1e-5))  # near ties: the lowest index
    assert F.catp_submodular(x, text, k).tolist() == sorted(chosen)


# --- budget and options -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0.333, 0.222, 0.101, 0.25, 1.0])
def test_one_ratio_split_half_per_stage(keep):
    vision, decoder = CATP().stage_keeps(keep)
    r = 1 - keep
    assert vision == pytest.approx(1 - r / 2) and vision * decoder == pytest.approx(keep)
    with pytest.raises(ValueError, match="float ratio"):
        CATP().stage_keeps(64)


def test_options_are_checked():
    with pytest.raises(ValueError, match="query_image"):
        CATP(query_image="last")
    with pytest.raises(ValueError, match="layer"):
        CATP(layer=0)
    assert METHODS["catp"] is CATP
    plan = CATP().stages()[1].plan(32)
    assert [(p.layer, p.score_layer) for p in plan] == [(K + 1, K), (K + 2, K + 1)]
    assert [p.score_layer for p in CATP().stages()[1].plan(40)] == [10, 11]  # the paper's 13B setting


def test_schedule_counts_both_stages():
    """The per-layer visual tokens at the paper's headline setting (4 examples + query, R = 77.8%, 32 layers):
    stage 1 keeps 61.1% of every image up to layer K = 6, the pool is cut from layer 7, the query from layer 8."""
    schedule = CATP().schedule([576] * 5, 0.222, 32)
    assert schedule == [5 * 352] * 7 + [4 * 128 + 352] + [5 * 128] * 24
    assert CATP().schedule([576], 0.222, 32) == [352] * 8 + [128] * 24  # one image: 0-shot, no pool
    assert CATP().schedule([576] * 3, 1.0, 32) == [3 * 576] * 32
    assert CATP(query_image=0).schedule([100, 576], 0.222, 32)[8] == kept_count(0.222 / 0.611, 61) + 128
    with pytest.raises(ValueError, match="query_image=2"):
        CATP(query_image=2).schedule([576, 576], 0.222, 32)


# --- the paired-text rule -----------------------------------------------------------------------------------------
class _Model(torch.nn.Module):
    """Just what :func:`paired_text_embeddings` reads: a config and the input embeddings (id -> [id])."""

    def __init__(self, **config):
        super().__init__()
        self.config = type("Config", (), config)()
        self.embed = torch.nn.Embedding(20, 1)
        self.embed.weight.data = torch.arange(20.0)[:, None]

    def get_input_embeddings(self):
        return self.embed


def test_paired_text_is_the_text_up_to_the_next_image_without_block_delimiters():
    model = _Model(vision_start_token_id=1, vision_end_token_id=2)
    # 3 | <s> 9 9 </s> | 4 5 | <s> 9 </s> | 6 7 (pad 0 masked)
    ids = torch.tensor([[3, 1, 9, 9, 2, 4, 5, 1, 9, 2, 6, 7, 0]])
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    first = paired_text_embeddings(model, ids, mask, 0, 3, (9,))
    last = paired_text_embeddings(model, ids, mask, 0, 8, (9,))
    assert first.squeeze(1).tolist() == [4.0, 5.0] and last.squeeze(1).tolist() == [6.0, 7.0]
    adjacent = torch.tensor([[3, 9, 9, 1, 2, 9, 4]])
    with pytest.raises(ValueError, match="image 0 of prompt row 0 has no paired text: found another image"):
        paired_text_embeddings(model, adjacent, None, 0, 2, (9,))
