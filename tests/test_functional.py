"""The papers' worked examples (computed by hand from the papers and official code) and the selector contract."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune import functional as F

X = torch.tensor([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [0.7, 0.7]], dtype=torch.float64)
CLS_ROWS = torch.tensor([[0.30, 0.05, 0.20, 0.10, 0.25, 0.10], [0.10, 0.15, 0.40, 0.05, 0.20, 0.10]])


def test_fastervlm_worked_example():
    assert F.fastervlm(CLS_ROWS, 3).tolist() == [0, 2, 4]


def test_fastervlm_averages_heads_after_softmax_and_accepts_one_row():
    assert F.fastervlm(CLS_ROWS.mean(0), 3).tolist() == [0, 2, 4]
    assert F.fastervlm(CLS_ROWS, 1).tolist() == [2]


def test_fastervlm_ties_go_to_lowest_index():
    assert F.fastervlm(torch.tensor([[0.1, 0.3, 0.3, 0.3]]), 2).tolist() == [1, 2]


def test_divprune_step0_scores():
    dist = F.cosine_distance(X)
    nearest_other = torch.sort(dist, dim=0).values[1]
    expected = torch.tensor([0.0061, 0.0061, 0.0061, 0.0061, 1.0, 0.2191])
    assert torch.allclose(nearest_other, expected, atol=1e-4)


@pytest.mark.parametrize("k, expected", [(1, [4]), (2, [0, 4]), (3, [0, 2, 4]), (4, [0, 2, 4, 5])])
def test_divprune_worked_example(k, expected):
    assert F.divprune(X, k).tolist() == expected


def test_divprune_half_precision_gives_the_same_selection():
    assert F.divprune(X.to(torch.bfloat16), 4).tolist() == [0, 2, 4, 5]


def test_divprune_keeps_k_distinct_tokens_even_with_duplicates():
    dup = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    kept = F.divprune(dup, 4)
    assert kept.tolist() == sorted(set(kept.tolist())) and kept.numel() == 4


@pytest.mark.parametrize("fn", ["fastervlm", "divprune", "random", "uniform"])
def test_k_at_least_n_keeps_everything(fn):
    n = 6
    call = {
        "fastervlm": lambda k: F.fastervlm(CLS_ROWS, k),
        "divprune": lambda k: F.divprune(X, k),
        "random": lambda k: F.random(n, k),
        "uniform": lambda k: F.uniform((2, 3), k),
    }[fn]
    assert call(6).tolist() == list(range(6))
    assert call(50).tolist() == list(range(6))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_k_is_rejected(bad):
    with pytest.raises(ValueError, match="k must be an int"):
        F.divprune(X, bad)


def test_random_is_reproducible_with_a_seed_and_varies_across_seeds():
    a = F.random(100, 10, generator=torch.Generator().manual_seed(0))
    b = F.random(100, 10, generator=torch.Generator().manual_seed(0))
    c = F.random(100, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_square_grid_takes_cell_centres():
    assert F.uniform((4, 4), 4).tolist() == [5, 7, 13, 15]
    kept = F.uniform((24, 24), 64)
    rows, cols = kept // 24, kept % 24
    assert sorted(set(rows.tolist())) == list(range(1, 24, 3)) == sorted(set(cols.tolist()))


def test_uniform_without_grid_spreads_along_the_line():
    assert F.uniform(None, 3, n=9).tolist() == [1, 4, 7]


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), frac=st.floats(0.01, 1.0))
def test_uniform_contract(h, w, frac):
    k = max(1, round(frac * h * w))
    kept = F.uniform((h, w), k)
    assert kept.numel() == k and kept.dtype == torch.long
    assert bool((kept[1:] > kept[:-1]).all()) and int(kept.min()) >= 0 and int(kept.max()) < h * w


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 8), k=st.integers(1, 45), seed=st.integers(0, 10_000))
def test_selector_contract(n, d, k, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    attn = torch.rand(3, n, generator=g)
    for kept in (F.divprune(feats, k), F.fastervlm(attn, k), F.random(n, k, generator=g)):
        assert kept.dtype == torch.long and kept.ndim == 1
        assert kept.numel() == min(k, n)
        assert bool((kept[1:] > kept[:-1]).all()) and int(kept.min()) >= 0 and int(kept.max()) < n
