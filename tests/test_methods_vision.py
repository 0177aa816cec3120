"""Method dataclasses: budget splits, family support, merged spans end to end, and the text signal."""

from dataclasses import dataclass

import pytest
import torch
from conftest import PROMPT, TWO_IMAGES, encode

from tokenprune import enable_pruning
from tokenprune import functional as F
from tokenprune.methods import (
    CLS_ATTENTION,
    CLS_HIDDEN,
    FEATURES,
    METHODS,
    TEXT_EMBEDDINGS,
    VISION_HIDDEN,
    VISION_KEYS,
    HiPrune,
    HoloV,
    PruningMethod,
    SelectionContext,
    SignalRequest,
    VisionDrop,
    VisionZip,
    make_method,
)
from tokenprune.tiny_models import random_image, tiny_llava

X = torch.tensor([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0], [0.7, 0.7]])
NO_CLS_UNSUPPORTED = {"flowcut", "fastervlm", "fopru", "recoverable", "visionzip"}  # vflowopt: SigLIP's map


def test_paper_budget_splits():
    assert [VisionZip().split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert VisionDrop().split(48) == (42, 6)


def test_visionzip_method_reproduces_the_worked_example_with_cls_first():
    signals = {CLS_ATTENTION: torch.tensor([[0.05, 0.30, 0.10, 0.14, 0.25, 0.16]]), VISION_HIDDEN: X,
               VISION_KEYS: X[None], CLS_HIDDEN: torch.tensor([0.5, 0.5])}
    sel = VisionZip(dominant=2, contextual=2).select(SelectionContext(k=4, n=6, signals=signals))
    assert sel.kept.tolist() == [1] and sel.lead == 1 and sel.space == VISION_HIDDEN
    torch.testing.assert_close(sel.merged, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.4667]]), atol=1e-4, rtol=0)
    assert sel.assign.tolist() == [1, -1, 2, 2, 2, 2]  # targets 0 and 3 -> merged rows 1 and 2 ([CLS] is row 0)


def test_holov_official_zero_padding_is_optional():
    attn = torch.tensor([[0.30, 0.25, 0.20, 0.08, 0.10, 0.07]])
    feats = torch.tensor([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.3, 1.0],
                          [0.5, 0.5, 0.5, 0.5]])
    ctx = SelectionContext(k=4, n=6, signals={CLS_ATTENTION: attn, FEATURES: feats})
    sel = HoloV(chunks=3).select(ctx)
    assert sel.kept.tolist() == [0, 1, 2] and torch.equal(sel.merged, torch.zeros(1, 4))
    assert HoloV(chunks=3, quirks=False).select(ctx).tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_on_cls_towers_and_says_what_happens_without_cls(name):
    method = make_method(name)
    needs = method.stages()[0].needs if method.stage == "two-stage" else method.needs  # its vision stage's
    assert {r.name for r in method.requests(cls_token=True)} <= set(needs)
    if name in NO_CLS_UNSUPPORTED:
        with pytest.raises(ValueError, match="without a \\[CLS\\] token.*(instead|use)"):
            method.check_family(cls_token=False)
    else:
        method.check_family(cls_token=False)
        assert all(r.name not in {CLS_ATTENTION, CLS_HIDDEN} for r in method.requests(cls_token=False))


def test_hiprune_layers_follow_the_paper_per_family():
    from tokenprune.methods import ATTENTION_RECEIVED

    assert HiPrune().requests(True) == (SignalRequest(ATTENTION_RECEIVED, 8), SignalRequest(ATTENTION_RECEIVED))
    assert HiPrune().requests(False)[0] == SignalRequest(ATTENTION_RECEIVED, 15)


def test_missing_layer_on_a_small_tower_is_a_clear_error():
    model, _ = tiny_llava()
    with pytest.raises(ValueError, match="vision tower has 3 layers"):  # at enable time, before touching the model
        enable_pruning(model, "hiprune", keep=8)  # object layer 8 does not exist in the 3-layer tiny tower


@pytest.mark.parametrize("name", ["visionzip", "visiondrop"])
def test_merged_span_equals_the_official_layout(name):
    """Oracle from an eager run: [proj(CLS), proj(dominant patches), proj(contextual)] at contiguous positions."""
    model, processor = tiny_llava(attn_implementation="sdpa", seed=2)
    inputs = encode(processor, [PROMPT], [random_image(80, 96, seed=1)])
    handle = enable_pruning(model, name, keep=16)
    with torch.no_grad():
        logits = model(**inputs).logits
    handle.remove()
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    fl = len(tower.encoder.layers) - 2
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        ref = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        layer = tower.encoder.layers[fl].self_attn
        keys = layer.k_proj(tower.encoder.layers[fl].layer_norm1(ref.hidden_states[fl]))[0, 1:]
        heads = layer.num_heads
        keys = keys.view(keys.shape[0], heads, -1).mean(1)
        hidden = ref.hidden_states[fl + 1][0]
        dominant, contextual = make_method(name).split(16)
        kept, merged = F.visionzip(ref.attentions[fl][0, :, 0, 1:], hidden[1:], keys, dominant - 1, contextual)
        span = projector(torch.cat([hidden[:1], hidden[1:][kept], merged]))
        ids = inputs["input_ids"][0]
        image_pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[image_pos[16:]] = False
        embeds = model.get_input_embeddings()(ids[keep][None])
        embeds[0, ids[keep] == model.config.image_token_id] = span
        expected = model(inputs_embeds=embeds).logits
    record = handle.last.images[0]
    assert record.kept.tolist() == kept.tolist() and record.n_merged == 1 + contextual and record.n_kept == 16
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@dataclass
class _Spy(PruningMethod):
    name = "spy"
    paper = "test"
    needs = frozenset({TEXT_EMBEDDINGS})

    def __post_init__(self):
        self.seen = []

    def select(self, ctx):
        self.seen.append(ctx.signal(TEXT_EMBEDDINGS))
        return torch.arange(ctx.n)


def test_text_embeddings_are_the_prompt_tokens_after_the_image(monkeypatch):
    monkeypatch.setitem(METHODS, "spy", _Spy)
    model, processor = tiny_llava()
    spy = _Spy()
    enable_pruning(model, spy, keep=1.0)
    batch = encode(processor, [PROMPT, TWO_IMAGES], [random_image(64, 64, seed=s) for s in range(3)])
    with torch.no_grad():
        model(**batch)
    embed, image = model.get_input_embeddings(), model.config.image_token_id
    words = ["how", "many", "dog", "are", "there", "?", "ASSISTANT", ":"]
    after = torch.tensor(processor.tokenizer.convert_tokens_to_ids(words))
    question = torch.tensor(processor.tokenizer.convert_tokens_to_ids(["what", "is", "in", "the", "image", "?",
                                                                       "ASSISTANT", ":"]))
    assert batch["input_ids"][0, -8:].tolist() == question.tolist()  # row 0 is left padded: padding excluded
    torch.testing.assert_close(spy.seen[0], embed(question))
    torch.testing.assert_close(spy.seen[1], embed(after))  # first image: the second image's placeholders excluded
    torch.testing.assert_close(spy.seen[2], embed(after))
    assert image not in batch["input_ids"][1, -8:]
