"""The object-retrieval auxiliary loss of the synthetic recipe: which words name which object, and the loss."""

import torch

from benchmarks.synthetic.retrieval import FIELDS, RetrievalHeads, mentions, retrieval_rows
from tokenprune.bench.synthetic.questions import QA
from tokenprune.bench.synthetic.scenes import GRID, Scene, Shape


def _scene() -> Scene:
    # a large red square at the top left, a small blue circle at the bottom right, a green circle at the top right
    return Scene([Shape("red", "square", "large", 50.0, 50.0, 25.0),
                  Shape("blue", "circle", "small", 180.0, 170.0, 10.0),
                  Shape("green", "circle", "large", 170.0, 40.0, 22.0)], {"kind": "plain"})


def test_mentions_worked_example():
    """Each question type: the index of the word that closes the object's name, and the object."""
    scene = _scene()
    cases = [
        (QA("color", "what color is the square ?", "red"), [(4, 0)]),
        (QA("shape", "what shape is the blue object ?", "circle"), [(5, 1)]),
        (QA("exist", "is there a green circle ?", "yes"), [(4, 2)]),
        (QA("exist", "is there a red circle ?", "no"), []),  # absent: nothing to look up
        (QA("count", "how many circles are there ?", "two"), []),
        (QA("position", "is the blue circle on the left or right ?", "right"), [(3, 1)]),
        (QA("top", "what color is the object at the top ?", "red"), []),  # two objects in the top band: ambiguous
        (QA("relative", "is the red square left of the green circle ?", "yes"), [(3, 0), (8, 2)]),
        (QA("relative", "is the blue circle above the red square ?", "no"), [(3, 1), (7, 0)]),
        (QA("small", "what shape is the small object ?", "circle"), [(5, 1)]),
    ]
    for qa, want in cases:
        assert mentions(scene, qa) == want, qa.question
        for word, _ in want:  # the word closes a name: a shape, "object" or "top"
            assert qa.question.split()[word] in {"square", "circle", "object", "top"}


def test_retrieval_rows_point_at_the_name_tokens_of_a_conversation():
    from benchmarks.synthetic.model import build
    from benchmarks.synthetic.vqa_stage import conversation_layout

    model, processor = build()
    tok = processor.tokenizer
    turns = [QA("color", "what color is the square ?", "red"),
             QA("relative", "is the red square left of the green circle ?", "yes")]
    layout = conversation_layout(tok, turns, model.config.image_token_id, GRID * GRID)
    rows = retrieval_rows([(_scene(), turns)], [layout])
    assert rows.shape == (3, 2 + len(FIELDS))
    words = tok.convert_ids_to_tokens(layout[0])
    assert [words[p] for p in rows[:, 1].tolist()] == ["square", "square", "circle"]
    # colour (red 0, green 3), shape (square 1, circle 0), size (large 1), centre row and column (pixel // 14)
    assert rows[0, 2:].tolist() == [0, 1, 1, 3, 3]
    assert rows[2, 2:].tolist() == [3, 0, 1, 2, 12]


def test_retrieval_loss_trains_only_the_layers_below_its_heads():
    """Gradient of the loss reaches the embeddings and the first ``layer`` LM layers, never the layers above."""
    from benchmarks.synthetic.model import build

    model, _ = build()
    lm = model.model.language_model
    heads = RetrievalHeads(model.config.text_config.hidden_size, layer=2)
    out = lm(inputs_embeds=torch.randn(2, 20, model.config.text_config.hidden_size), output_hidden_states=True)
    rows = torch.tensor([[0, 5, 1, 2, 0, 3, 4], [1, 19, 5, 3, 1, 15, 0]])
    loss = heads.loss(out.hidden_states, rows)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grad = {i: layer.self_attn.q_proj.weight.grad for i, layer in enumerate(lm.layers)}
    assert grad[0] is not None and grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0
    assert grad[2] is None and grad[3] is None
    assert heads.loss(out.hidden_states, rows[:0]).item() == 0.0  # no mention in the batch: no loss
