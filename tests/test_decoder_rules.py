"""Selection rules of FEATHER, ToDRE, TransPrune and DART against the worked examples of specs/methods_llm.md."""

import math

import torch

from tokenprune.functional.dart import dart, dart_count
from tokenprune.methods import DART


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
