"""The synthetic VQA data, the shipped trained model and the accuracy-retention benchmark."""

import json

import numpy as np
import pytest
import torch

from tokenprune.bench.synthetic.questions import (
    NUMBERS,
    QUESTION_TYPES,
    TEST_SEED,
    TRAIN_SEED,
    candidates,
    eval_split,
    training_example,
    vocabulary,
)
from tokenprune.bench.synthetic.scenes import GRID, IMAGE_SIZE, patch_labels, render, sample_scene


def test_scenes_are_deterministic_by_seed_and_splits_differ():
    a, qa = training_example(TRAIN_SEED, 5)
    b, qb = training_example(TRAIN_SEED, 5)
    assert a == b and qa == qb
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert TRAIN_SEED != TEST_SEED
    train = [training_example(TRAIN_SEED, i)[0] for i in range(20)]
    test = [s for s, _ in eval_split(3)]
    assert not any(t == s for t in train for s in test)
    assert eval_split(3) == eval_split(3)


def test_every_question_type_is_present_and_answers_are_single_words():
    items = eval_split(6)
    assert [q.qtype for _, q in items] == [t for t in QUESTION_TYPES for _ in range(6)]
    vocab = set(vocabulary())
    for scene, q in items:
        assert q.answer in vocab and " " not in q.answer
        assert set(q.question.split()) <= vocab
        assert render(scene).size == (IMAGE_SIZE, IMAGE_SIZE)
    relative = [q.answer for _, q in items if q.qtype == "relative"]
    assert relative.count("yes") == relative.count("no")


def test_answers_match_the_scene():
    rng = np.random.default_rng(3)
    for _ in range(30):
        scene = sample_scene(rng)
        c = candidates(scene, rng)
        count = [q for q in c["count"] if q.question == "how many objects are there ?"][0]
        assert count.answer == NUMBERS[len(scene.objects)]
        for q in c["color"]:
            shape = q.question.split()[-2]
            assert [o.color for o in scene.objects if o.shape == shape] == [q.answer]
        for q in c["top"]:
            top = min(scene.objects, key=lambda o: o.y)
            assert q.answer in (top.color, top.shape)
        labels = patch_labels(scene)
        assert labels.shape == (GRID * GRID,) and labels.max() <= len(scene.objects)


@pytest.fixture(scope="module")
def trained():
    from tokenprune.tiny_models import trained_llava

    return trained_llava()


def test_shipped_model_is_llava_with_256_visual_tokens(trained):
    from transformers import LlavaForConditionalGeneration

    from tokenprune.tiny_models import SYNTH_LLAVA, synthetic_demo

    model, processor = trained
    assert isinstance(model, LlavaForConditionalGeneration)
    assert (SYNTH_LLAVA / "model.safetensors").stat().st_size <= 25 * 2**20
    image, prompt, _ = synthetic_demo()
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
    assert model.config.vision_feature_layer == -2 and model.config.text_config.num_hidden_layers >= 4


def test_shipped_model_answers_test_questions(trained):
    """A real check: greedy answers on 64 test questions (this can fail). The shipped model is under-trained (47% on
    the 800-question test split, model card): the bar is "clearly above chance" (about 33%), not the 90% target."""
    from tokenprune.bench.accuracy import batches, score

    model, processor = trained
    torch.manual_seed(0)
    result = score(model, processor, batches(8, 16, processor))
    assert result["n"] == 8 * len(QUESTION_TYPES)
    assert result["accuracy"]["overall"] >= 0.40, result["accuracy"]


def test_accuracy_benchmark_end_to_end(tmp_path):
    from tokenprune.bench.accuracy import run, write
    from tokenprune.cli import main

    result = run(n_per_type=1, keeps=(0.25,), methods=["divprune", "fastv"], batch=8)
    assert 0 <= result["unpruned_accuracy"] <= 1
    assert {(r["method"], r["keep"]) for r in result["rows"]} == {("divprune", 0.25), ("fastv", 0.25)}
    for row in result["rows"]:
        assert set(row["per_type"]) == set(QUESTION_TYPES)
        assert 0 < row["flops_ratio"] < 1 and row["tflops"] > 0
    paths = write(result, tmp_path)
    assert json.loads(paths[0].read_text())["rows"] == result["rows"]
    assert "| divprune |" in paths[1].read_text() and paths[2].stat().st_size > 0
    assert main(["bench-accuracy", "--per-type", "1", "--keep", "0.5", "--method", "random", "--out",
                 str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "accuracy_retention.json").read_text())["rows"][0]["method"] == "random"


def test_vision_pretraining_targets_and_position_init():
    """Stage 1 of the recipe: shape / size losses only on object patches (a background-dominated loss taught no
    shape), and the 2-D sin-cos start of CLIP's position embeddings tells every patch its row and column."""
    from tokenprune.bench.synthetic.scenes import COLORS, SHAPES
    from tokenprune.bench.synthetic.train import dense_losses, sincos_2d, vision_targets

    table = sincos_2d(128, GRID)
    assert table.shape == (1 + GRID * GRID, 128) and torch.all(table[0] == 0)
    nearest = torch.cdist(table[1:], table[1:]).argmin(-1)
    assert torch.equal(nearest, torch.arange(GRID * GRID))  # every position distinct

    scene = training_example(TRAIN_SEED, 3, max_turns=0)[0]
    _, _, color, shape, size = (torch.tensor(np.asarray(t))[None] for t in vision_targets(scene))
    nc, ns = len(COLORS) + 1, len(SHAPES) + 1
    dense = torch.randn(1, GRID * GRID, nc + ns + 3 + 2 * GRID)
    base = dense_losses(dense, color, shape, size)
    moved = dense.clone()
    moved[0, color[0] == 0, nc:nc + ns + 3] += 5 * torch.randn_like(moved[0, color[0] == 0, nc:nc + ns + 3])
    after = dense_losses(moved, color, shape, size)
    assert torch.allclose(base["shape"], after["shape"]) and torch.allclose(base["size"], after["size"])
    assert not torch.allclose(base["color"], dense_losses(moved * 2, color, shape, size)["color"])
