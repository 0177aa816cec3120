"""Worked examples, computed by hand from the papers and official code, for the vision-stage library, exact."""

import math

import pytest
import torch

from tokenprune import functional as F
from tokenprune.functional.chunks import _chunk_score

X = torch.tensor([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [0.7, 0.7]], dtype=torch.float64)
FT = torch.tensor([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.3, 1], [0.5, 0.5, 0.5, 0.5]],
                  dtype=torch.float64)
V = torch.tensor([[1, 0, 0], [0.95, 0.05, 0], [0.85, 0.15, 0.05], [0, 1, 0], [0.3, 0.9, 0], [0, 0, 1]],
                 dtype=torch.float64)
HOLO_ATTN = torch.tensor([0.30, 0.25, 0.20, 0.08, 0.10, 0.07], dtype=torch.float64)


def _grid_scores(base, **peaks):
    s = torch.full((16,), base)
    for i, v in peaks.items():
        s[int(i[1:])] = v
    return s


DEEP = _grid_scores(0.04, t5=0.50, t15=0.30, t0=0.10)


def test_hiprune_worked_example():
    obj = _grid_scores(0.05, t5=0.30, t10=0.20)
    assert F.hiprune(obj, DEEP, 4, 6, 1).tolist() == [1, 4, 5, 6, 9, 15]
    assert F.hiprune(obj, DEEP, 4, 6, 1, quirks=False).tolist() == [1, 4, 5, 6, 9, 15]


def test_hiprune_corner_anchor_quirk_and_clean():
    obj = _grid_scores(0.05, t3=0.40)
    assert F.hiprune(obj, DEEP, 4, 6, 1).tolist() == [0, 2, 3, 4, 5, 7]  # row wrap (4) and clamp (-1 -> 0)
    assert F.hiprune(obj, DEEP, 4, 6, 1, quirks=False).tolist() == [0, 2, 3, 5, 7, 15]


def test_hiprune_anchor_count_and_small_budget():
    assert [F.hiprune_anchor_count(t) for t in (192, 128, 64)] == [4, 3, 1]
    obj = _grid_scores(0.05, t5=0.30, t10=0.20)
    assert F.hiprune(obj, DEEP, 4, 2, 1).tolist() == [1, 5]  # anchor set larger than k: best object scores


def test_visionzip_worked_example():
    cls_row = torch.tensor([0.05, 0.30, 0.10, 0.14, 0.25, 0.16])
    kept, merged = F.visionzip(cls_row, X, X, 1, 2)  # D = 2 incl. [CLS] -> 1 patch
    assert kept.tolist() == [1]
    torch.testing.assert_close(merged, torch.tensor([[1.0, 0.0], [0.0, 1.4667]]), atol=1e-4, rtol=0)


def test_visiondrop_stage_worked_example():
    rows = torch.tensor([[.20, 0, 0, 0, 0, 0], [.10, .30, 0, 0, 0, 0], [.05, .10, .40, 0, 0, 0],
                         [.05, .05, .30, .20, 0, 0], [.04, .06, .20, .10, .30, 0], [.02, .08, .10, .10, .20, .30]])
    torch.testing.assert_close(rows.mean(0), torch.tensor([.0767, .0983, .1667, .0667, .0833, .0500]), atol=1e-4,
                               rtol=0)
    kept, merged, assign = F.visiondrop(rows, X, X, 2, 2)
    assert kept.tolist() == [1, 2]
    torch.testing.assert_close(merged, torch.tensor([[1.4, 0.8], [-1.0, 0.0]]), atol=1e-4, rtol=0)
    assert assign.tolist() == [0, -1, -1, 0, 1, 0]


def test_holov_worked_examples():
    assert _chunk_score(HOLO_ATTN[:3].float(), FT[:3].float(), 0.09) == pytest.approx(272.50, abs=0.01)
    assert _chunk_score(HOLO_ATTN[3:].float(), FT[3:].float(), 0.09) == pytest.approx(90.83, abs=0.01)
    kept, pad = F.holov(HOLO_ATTN, FT, 3, chunks=2)
    assert kept.tolist() == [0, 1, 2] and pad == 0
    kept, pad = F.holov(torch.tensor([0.50, 0.01, 0.25, 0.24]), FT[:4], 2, chunks=2)
    assert kept.tolist() == [0, 1] and pad == 0  # global top-2 would be [0, 2]
    kept, pad = F.holov(HOLO_ATTN, FT, 4, chunks=3)
    assert kept.tolist() == [0, 1, 2] and pad == 1
    assert F.holov_chunk_count(2500, 278) == 15


def test_fopru_worked_examples():
    p = torch.tensor([0.02, 0.20, 0.03, 0.15, 0.05, 0.10, 0.25, 0.08, 0.12])
    attn = p.expand(9, 9)
    assert F.fopru(attn, 3).tolist() == [1, 3, 6]
    assert F.fopru(attn, 3, strategy="row", grid=(3, 3)).tolist() == [6, 7, 8]
    assert F.fopru(attn.T.contiguous(), 3).tolist() == [1, 3, 6]  # given-attention wins on larger variance


def test_mmtok_worked_example():
    text = torch.tensor([[0.0, 0.2, 1.0]], dtype=torch.float64)
    assert F.mmtok(V, text, 3).tolist() == [1, 3, 5]
    assert F.mmtok(V, text, 1).tolist() == [5]
    assert F.mmtok(V, text, 3, alpha=0.0).tolist() == [0, 1, 5]


def test_cdpruner_worked_example_and_sign_quirk():
    text = torch.tensor([[0.2, 0.5, 0.1, 0.7]], dtype=torch.float64)
    rel = F.instruction_relevance(FT, text)
    norm = (-rel - (-rel).min() + 1e-6) / ((-rel).max() - (-rel).min())
    torch.testing.assert_close(norm, torch.tensor([.8462, .7631, .3846, 1.0, .0781, 0.0]),
                               atol=1e-4, rtol=0)
    assert F.cdpruner(FT, rel, 3).tolist() == [0, 2, 3]
    assert F.cdpruner(FT, rel, 3, quirks=False).tolist() == [2, 4, 5]


def test_todre_kcenter_and_maxsum_worked_example():
    angles = torch.tensor([120.0, 90, 240, 75, 225, 285]) * math.pi / 180
    feats = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert F.kcenter(feats, 3, 0).tolist() == [0, 4, 5]
    assert F.kcenter(feats, 3, 0, rule="maxsum").tolist() == [0, 3, 5]


def _recoverable_example(centre=None):
    n = 30
    cls = torch.tensor([0.01 + 0.001 * i for i in range(n)], dtype=torch.float64)
    cls[4], cls[17], cls[25] = 0.20, 0.15, 0.12
    if centre is not None:
        cls[8] = centre
    txt = torch.tensor([0.10 + 0.002 * ((7 * i) % 30) for i in range(n)], dtype=torch.float64)
    txt[3], txt[17], txt[28] = 0.40, 0.35, 0.38
    return cls / cls.sum(), txt


def test_recoverable_worked_example():
    cls, txt = _recoverable_example()
    assert F.lof_outlier_fraction(cls, 20) == pytest.approx(0.1)
    masked = txt.clone()
    masked[[4, 17, 25]] = masked.min()
    assert F.lof_outlier_fraction(masked, 20) == pytest.approx(2 / 30)
    main, merged = F.recoverable(cls, txt, torch.randn(30, 8), torch.randn(30, 4))
    assert main.tolist() == [3, 4, 17, 25] and merged.shape == (0, 8)  # no centres: the lone extra token is dropped


def test_recoverable_centres_absorb_their_cluster_weighted_by_attention():
    cls, txt = _recoverable_example(centre=0.045)  # an outlier among the rest only -> one cluster centre
    hidden = torch.eye(30, dtype=torch.float64)  # one-hot rows: merged rows show who was folded in, with what weight
    keys = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    main, merged = F.recoverable(cls, txt, hidden, keys, cluster_size=3)
    assert main.tolist() == [3, 4, 17, 25] and merged.shape == (2, 30)  # one centre + the extra token
    centre, extra = merged[0].double(), merged[1].double()
    assert centre[8] == 1.0 and int((centre > 0).sum()) == 4  # the centre itself + its 3 best candidates
    members = (centre > 0).nonzero().squeeze(1)
    members = members[members != 8]
    torch.testing.assert_close(centre[members], cls[members], rtol=1e-6, atol=0)  # weights = [CLS] attention
    others = torch.ones(30, dtype=torch.bool)
    others[[3, 4, 17, 25, 8]] = False
    torch.testing.assert_close(extra[others], cls[others], rtol=1e-6, atol=0)
    assert float(extra[~others].abs().sum()) == 0.0


def test_lof_flags_an_isolated_value():
    assert F.lof_outlier_fraction(torch.tensor([0.0, 1, 2, 3, 4, 100]), 2) == pytest.approx(1 / 6)
    assert F.lof_outlier_fraction(torch.ones(10), 3) == 0.0


def test_flowcut_worked_example():
    cls_attn = torch.tensor([0.40, 0.05, 0.20, 0.05, 0.25, 0.05])
    sem = torch.tensor([0.10, 0.30, 0.10, 0.20, 0.20, 0.10])
    v1 = torch.tensor([1.0, 2.0, 1.5, 1.0, 0.5, 3.0])
    torch.testing.assert_close(F.flowcut_scores(cls_attn, sem, v1), torch.tensor([.5, .7, .45, .25, .225, .45]))
    prev = torch.full((6,), 0.5)
    kept, cum = F.flowcut_step(cls_attn, sem, v1, prev, length=7, target=3, remaining=4)
    torch.testing.assert_close(cum, torch.tensor([.5, .6, .475, .375, .3625, .475]))
    assert kept.tolist() == [0, 1, 2, 3, 5]  # r = round(0.627) = 1
    assert F.flowcut_step(cls_attn, sem, v1, prev, length=7, target=3, remaining=0)[0].tolist() == [0, 1]
    assert F.flowcut_step(cls_attn, sem, v1, prev, length=7, target=3, remaining=3)[0].tolist() == list(range(6))
    kept, cum = F.flowcut_step(torch.tensor([1.0, 0, 0]), sem[:3], v1[:3], None, length=4, target=2, remaining=2)
    assert bool(torch.isfinite(cum).all()) and kept.numel() >= 1  # zero attention: no NaN from 0 log 0
