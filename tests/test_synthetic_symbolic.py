"""Stage 2 ``symbolic`` of the synthetic recipe: scene tokens, the LM stage on them, the projector distillation."""

import json

import pytest
import torch
from conftest import assert_trains_projector_and_lm_only, moved_parameters

from benchmarks.synthetic.grounding import anchor_patch
from benchmarks.synthetic.symbolic_stage import FIELDS, scene_tokens
from tokenprune.bench.synthetic.scenes import GRID, PATCH, Scene, Shape, patch_labels


def _scene() -> Scene:
    # a large red square in the top-left quadrant and a small blue circle in the bottom-right one
    return Scene([Shape("red", "square", "large", 50.0, 50.0, 25.0), Shape("blue", "circle", "small", 180.0, 170.0,
                                                                              10.0)], {"kind": "plain"})


def test_scene_tokens_worked_example():
    """Field by field: colour / shape / size of the covering object (0 = background), the centre flag, row and column
    one-hots, zero padding up to the ViT's width."""
    scene = _scene()
    tokens = scene_tokens([scene], 128)[0]
    assert tokens.shape == (GRID * GRID, 128)
    owner = torch.from_numpy(patch_labels(scene))
    offsets, at = {}, 0
    for name, n in FIELDS.items():
        offsets[name] = at
        at += n
    assert (tokens[:, at:] == 0).all()  # padding
    # every patch: exactly one colour, one shape, one size class, one row, one column
    for name in ("color", "shape", "size", "row", "col"):
        assert torch.equal(tokens[:, offsets[name]:offsets[name] + FIELDS[name]].sum(-1), torch.ones(GRID * GRID))
    square = (owner == 1).nonzero().flatten()
    circle = (owner == 2).nonzero().flatten()
    background = (owner == 0).nonzero().flatten()
    assert len(square) > 9 and 0 < len(circle) <= 6
    # colour order red, orange, yellow, green, blue, purple (index 0 = background); shapes circle, square, ...
    assert (tokens[square, offsets["color"] + 1] == 1).all() and (tokens[circle, offsets["color"] + 5] == 1).all()
    assert (tokens[background, offsets["color"]] == 1).all()
    assert (tokens[square, offsets["shape"] + 2] == 1).all() and (tokens[circle, offsets["shape"] + 1] == 1).all()
    assert (tokens[square, offsets["size"] + 2] == 1).all() and (tokens[circle, offsets["size"] + 1] == 1).all()
    anchors = tokens[:, offsets["anchor"]].nonzero().flatten().tolist()
    assert anchors == sorted([anchor_patch(o) for o in scene.objects])
    assert anchors[0] == (50 // PATCH) * GRID + 50 // PATCH
    p = 5 * GRID + 11  # row 5, column 11
    assert tokens[p, offsets["row"] + 5] == 1 and tokens[p, offsets["col"] + 11] == 1
    with pytest.raises(ValueError, match="widen the ViT"):
        scene_tokens([scene], 32)


def test_symbolic_stage_trains_projector_and_lm_and_distillation_the_projector_only():
    """Real steps: stage 2a moves the projector and the LM, never the ViT; stage 2b moves only the projector and
    brings its output on the ViT's tokens closer to the stage-2a projector's output on the scene tokens."""
    from benchmarks.synthetic.model import build
    from benchmarks.synthetic.symbolic_stage import distill_projector, evaluate_symbolic, train_symbolic

    model, processor = build()
    lines: list[str] = []
    assert_trains_projector_and_lm_only(model, lambda: train_symbolic(model, processor, steps=2, batch=2, lr=1e-3,
                                                                      max_turns=2, log=lines.append))
    assert "symbolic" in lines[0]
    acc = evaluate_symbolic(model, processor, 2, seed=5)
    assert set(acc) >= {"color", "overall"} and 0 <= acc["overall"] <= 1

    lines.clear()
    moved = moved_parameters(model, lambda: distill_projector(model, processor, steps=12, batch=4, lr=3e-3,
                                                              log=lines.append))
    assert moved and all("multi_modal_projector" in n for n in moved)
    errors = [float(line.rsplit(" ", 1)[1]) for line in lines]
    assert errors[-1] < errors[0]


def test_model_card_describes_the_symbolic_stage():
    from benchmarks.synthetic.card import model_card
    from benchmarks.synthetic.model import ARCH
    from tokenprune.tiny_models import SYNTH_LLAVA

    info = json.loads((SYNTH_LLAVA / "training_log.json").read_text())
    info["arch"] = ARCH
    info["args"] = dict(info["args"], stage2="symbolic", symbolic_steps="1200", symbolic_lr="0.001",
                        distill_steps="200", distill_lr="0.002", retrieve="1.0")
    info.update(symbolic_seconds=600.0, distill_seconds=120.0, concurrent=True)
    card = model_card(info)
    assert "ground-truth scene tokens" in card and "projector distillation" in card
    assert "1200 steps" in card and "feature alignment" not in card and "Grounded VQA" not in card
    assert "object-retrieval loss" in card and "(with the same retrieval loss)" in card
    info["args"]["retrieve"] = "0.0"
    assert "retrieval" not in model_card(info)
