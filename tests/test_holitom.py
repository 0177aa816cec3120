"""HoliTom (video token merging) as functions: the worked examples of tokenprune/functional/holitom.py, property
tests of the outer (segmentation, DPC-KNN merge) and inner (attention-ranked merge) stages, the options and the FLOPs
schedule. The method on tiny models with videos: tests/test_holitom_models.py."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenprune.functional.holitom import (
    cluster_centers,
    cluster_merge,
    frame_similarity,
    holitom_inner,
    holitom_outer,
    static_windows,
)
from tokenprune.methods import HoliTom, HoliTomMerge

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- worked examples (module docstring of tokenprune/functional/holitom.py) ----------------------------------------
def test_segmentation_worked_example():
    sim = torch.tensor([[0.9, 0.1], [0.9, 0.9], [0.1, 0.9]])
    assert static_windows(sim, 0.8) == ([(0, 0), (1, 2), (3, 3)], 2)
    assert static_windows(sim, 0.8, max_window=1) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)


def test_dpc_knn_worked_example():
    x = torch.tensor([[1.0], [2.0], [4.0], [11.0]])
    centers = cluster_centers(x, 2, knn=2)
    assert centers.tolist() == [0, 1]
    merged, assign = cluster_merge(x, centers, beta=0.6)
    assert assign.tolist() == [0, 1, 1, 1]
    torch.testing.assert_close(merged, torch.tensor([[1.0], [0.6 * 2 + 0.4 * 7.5]]))


def test_outer_worked_example():
    features = torch.tensor([[1.0, 2, 4, 11], [1, 2, 4, -11]])[..., None]
    out = holitom_outer(features, torch.rand(2, 4), 0.25)
    assert out.segments == ((0, 1),) and out.ratio == pytest.approx(0.4)
    assert out.kept.tolist() == [3, 7]  # the dynamic position, once per frame
    torch.testing.assert_close(out.merged, torch.tensor([[0.6 * 1 + 0.4 * 3]]))  # 1.8
    assert out.assign.tolist() == [0, 0, 0, -1, 0, 0, 0, -1]
    assert out.order.tolist() == [2, 0, 1]  # [static cluster, frame 0, frame 1]


def test_inner_worked_example():
    attention = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.05])
    hidden = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1], [1, -0.1]])
    kept, weights = holitom_inner(attention, hidden, 2)
    assert kept.tolist() == [0, 2]
    # token 0 absorbs 1 then 4: ((h0 + h1) / 2 + h4) / 2; token 2 absorbs 3
    assert weights.tolist() == [[0.25, 0.25, 0, 0, 0.5], [0, 0, 0.5, 0.5, 0]]


def test_a_ratio_of_one_keeps_every_token_unchanged():
    out = holitom_outer(torch.ones(3, 4, 2), torch.rand(3, 4), 1.0)
    assert out.kept.tolist() == list(range(12)) and out.merged.shape[0] == 0


# --- properties --------------------------------------------------------------------------------------------------
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def videos(draw):
    frames, n, dim = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 3))
    values = draw(st.lists(st.sampled_from([-1.0, 1.0, 2.0, 3.0]), min_size=frames * n * dim,
                           max_size=frames * n * dim))
    features = torch.tensor(values).reshape(frames, n, dim)
    sources = draw(st.lists(st.integers(0, frames - 1), min_size=frames, max_size=frames))
    features = features[torch.tensor(sorted(sources))]  # repeated frames: static windows
    attention = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=frames * n,
                                           max_size=frames * n))).reshape(frames, n)
    return features, attention


@settings(max_examples=60, deadline=None)
@given(videos(), st.floats(0.01, 0.99), st.sampled_from([0.0, 0.5]), st.sampled_from([0.5, 0.8, 0.95]), DTYPES)
def test_outer_contract(video, ratio, d, tau, dtype):
    features, attention = video
    frames, n, _ = features.shape
    out = holitom_outer(features.to(dtype), attention.to(dtype), ratio, tau=tau, d=d)
    again = holitom_outer(features.to(dtype), attention.to(dtype), ratio, tau=tau, d=d)
    assert torch.equal(out.kept, again.kept) and torch.equal(out.merged, again.merged)  # deterministic (ties)
    starts = [s for s, _ in out.segments]
    assert starts[0] == 0 and out.segments[-1][1] == frames - 1
    assert all(e + 1 == s2 for (_, e), (s2, _) in zip(out.segments[:-1], out.segments[1:], strict=True))
    k, m, total = out.kept.numel(), out.merged.shape[0], frames * n
    assert out.kept.dtype == torch.long and bool((out.kept[1:] > out.kept[:-1]).all())
    assert k == 0 or 0 <= int(out.kept.min()) <= int(out.kept.max()) < total
    assert sorted(out.order.tolist()) == list(range(k + m)) and k + m >= 1
    assert out.merged.dtype == torch.float32 and bool(torch.isfinite(out.merged).all())
    assert bool((out.assign[out.kept] == -1).all())
    assert torch.bincount(out.assign[out.assign >= 0], minlength=m).min() >= 1 if m else True  # no empty merge
    if out.ratio < 1 and d == 0:
        # sum over windows of round(S r') + W ceil(L r'), with r' (T - saved) = ratio T
        slack = 0.5 * len(out.segments)
        assert ratio * total - slack - 1e-6 <= k + m <= max(1, ratio * total + slack + frames + 1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 6), st.integers(1, 6), st.floats(0.05, 0.95))
def test_identical_frames_form_one_window_and_distinct_frames_none(frames, n, ratio):
    base = torch.arange(1.0, n * 2 + 1).reshape(n, 2)
    same = holitom_outer(base.expand(frames, n, 2), torch.ones(frames, n), ratio)
    assert same.segments == ((0, frames - 1),)  # every position static: one window
    clusters = round(n * min(ratio / (n / (frames * n)), 1))
    assert same.merged.shape[0] == clusters and same.kept.numel() == (0 if clusters else 1)  # 0: degenerate guard
    flipped = base[None] * torch.tensor([(-1.0) ** f for f in range(frames)])[:, None, None]  # cosine -1
    apart = holitom_outer(flipped, torch.ones(frames, n), ratio)
    assert apart.segments == tuple((f, f) for f in range(frames)) and apart.merged.shape[0] == 0
    assert apart.kept.numel() == frames * math.ceil(n * ratio)  # ties: the first tokens of each frame
    assert apart.kept.tolist() == [f * n + j for f in range(frames) for j in range(math.ceil(n * ratio))]


def test_one_frame_and_the_similarity_shape():
    x = torch.randn(1, 5, 3)
    assert frame_similarity(torch.randn(4, 5, 3)).shape == (3, 5)
    out = holitom_outer(x, torch.tensor([[0.1, 0.9, 0.3, 0.9, 0.0]]), 0.4)
    assert out.segments == ((0, 0),) and out.kept.tolist() == [1, 3]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), DTYPES, st.integers(0, 2**16))
def test_inner_contract(n, k, dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, dim), generator=generator).to(dtype)
    attention = torch.randint(0, 3, (n,), generator=generator).to(dtype)
    kept, weights = holitom_inner(attention, hidden, k)
    assert kept.numel() == min(k, n) and bool((kept[1:] > kept[:-1]).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(kept.numel()))
    nonzero = weights != 0
    rest = torch.ones(n, dtype=torch.bool)
    rest[kept] = False
    assert bool((nonzero[:, rest].sum(dim=0) == 1).all())  # each merged token lands in exactly one kept token
    assert torch.equal(nonzero[:, kept], torch.eye(kept.numel(), dtype=torch.bool))


def test_options_and_the_flops_schedule():
    with pytest.raises(ValueError, match="merge_ratio"):
        HoliTom(merge_ratio=1.0)
    with pytest.raises(ValueError, match="tau"):
        HoliTom(tau=2.0)
    assert HoliTom().stage_keeps(1.0) == (1.0, 1.0) and HoliTom().stage_keeps(0.15) == (0.15, 0.5)
    inner = HoliTomMerge()
    assert inner.counts(941, 0.5, 28) == [470] and inner.counts(941, 1.0, 28) == [941]  # round(470.5) = 470
    assert inner.layer_tokens(100, 6272, 941, 28) == [1041] * 18 + [570] * 10
    assert HoliTom().layer_tokens(100, 6272, 941, 28) == inner.layer_tokens(100, 6272, 941, 28)
    from tokenprune.budget.flops import PRESETS, prefill_flops
    from tokenprune.budget.flops_targets import prefill_cost

    shape = PRESETS["llava-onevision-7b"]  # the paper's headline: 32 frames x 196 tokens, keep=0.10
    ratio = prefill_cost(shape, HoliTom(), 0, 6272, 627) / prefill_flops(shape, 6272)
    assert 0.06 < ratio < 0.08  # the paper: 6.9 % of the FLOPs (627 tokens in layers 0-17, 314 after)
