"""VisionDrop's LLM stages: the worked example as a merge plan, the paper's schedule and budget convention
(VisionDrop, 2025)."""

import pytest
import torch

from tokenprune.functional.visiondrop_llm import visiondrop_fraction, visiondrop_merge_groups, visiondrop_stage_counts
from tokenprune.methods import VisionDropFull, VisionDropLLM

X = torch.tensor([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [0.7, 0.7]])
ROWS = torch.tensor([[.20, 0, 0, 0, 0, 0], [.10, .30, 0, 0, 0, 0], [.05, .10, .40, 0, 0, 0],
                     [.05, .05, .30, .20, 0, 0], [.04, .06, .20, .10, .30, 0], [.02, .08, .10, .10, .20, .30]])


def test_worked_example_as_a_merge_plan():
    kept, targets, groups = visiondrop_merge_groups(ROWS, X, X, 2, 2)
    assert kept.tolist() == [1, 2] and targets.tolist() == [0, 4]
    rows = torch.stack([w @ X[m] for m, w in groups])
    out = torch.cat([X[kept], rows])  # dominant (original order), then contextual (target order)
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.1], [0, 1], [1.4, 0.8], [-1, 0]]), atol=1e-4, rtol=0)
    assert sorted(groups[0][0].tolist()) == [0, 3, 5] and groups[1][0].tolist() == [4]


def test_paper_schedule_and_layer_average_budget():
    assert visiondrop_stage_counts(48, 19 / 48) == [(30, 5), (22, 4), (16, 3)]  # 48 -> 35 -> 26 -> 19
    assert visiondrop_stage_counts(48, 1.0) == [(48, 0)] * 3
    vision, fraction = VisionDropFull().stage_keeps(32 / 576)  # "32 tokens" = layer average on LLaVA-1.5
    assert round(vision * 576) == 48 and fraction == pytest.approx(19 / 48)
    assert VisionDropFull().stage_keeps(32) == (48, pytest.approx(19 / 48))
    assert VisionDropFull().stage_keeps(1.0) == (1.0, 1.0)
    vision, fraction = visiondrop_fraction(0.9)  # above 2/3: the ViT keeps all, the LLM fraction is solved
    schedule = [48] + [d + c for d, c in visiondrop_stage_counts(48, fraction)]
    assert vision == 1.0 and sum(schedule) / 4 / 48 == pytest.approx(0.9, abs=0.02)
    assert VisionDropLLM().counts(48, 19 / 48, 32) == [30, 22, 16]
    assert [p.layer for p in VisionDropLLM().plan(32)] == [8, 16, 24]
    assert [p.score_layer for p in VisionDropLLM().plan(32)] == [8, 16, 24]


def test_a_stage_projects_the_score_layers_keys_once():
    """The stage reads attention rows AND post-RoPE keys of its score layer: one key projection of the sequence
    serves both (plus the layer's own forward on the kept tokens), not one per signal."""
    from dataclasses import replace

    from tokenprune import disable_pruning, enable_pruning
    from tokenprune.tiny_models import TINY, random_image, tiny_llava

    model, processor = tiny_llava(replace(TINY, text_layers=4), attn_implementation="sdpa", seed=0)
    inputs = processor(images=[random_image(80, 96, seed=1)], text=["USER : <image>\nwhat is it ? ASSISTANT :"],
                       return_tensors="pt")
    layer = model.model.language_model.layers[1]
    calls = []
    handle = layer.self_attn.k_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape[1]))
    enable_pruning(model, "visiondropllm", keep=0.5, layers=(1, 2, 3))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        disable_pruning(model)
        handle.remove()
    n = inputs["input_ids"].shape[1]
    assert len(calls) == 2 and calls[0] == n and calls[1] < n  # the stage's projection, then the layer's forward
