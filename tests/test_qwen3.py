"""Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE end to end on tiny models (eager and sdpa), the vision stage:
every vision-stage method with a signal there; DeepStack against an oracle; M-RoPE positions; batches; videos; clear
refusals; the overlay; the docs' snippets. Decoder-stage methods: tests/test_qwen3_decoder.py; the released depths
and the FLOPs counts: tests/test_qwen3_shapes.py."""

import pytest
import torch
from conftest import (
    MERGING,
    assert_keep_all_is_unpruned,
    assert_rows_match_alone,
    built,
    cached_model,
    enable,
    generate_cached_and_uncached,
    left_clean,
)
from qwen3_cases import GEN, METHODS, NO_CLS, OTHER, PROMPT, hook_count

from tokenprune import disable_pruning, enable_pruning
from tokenprune.budget import kept_count
from tokenprune.patches.qwen3_vl import deepstack_like
from tokenprune.patches.units import ImageSelection
from tokenprune.tiny_models import random_image
from tokenprune.tiny_qwen3 import QWEN3_FAMILIES, random_video3, tiny_qwen3

VID = "<|vision_start|><|video_pad|><|vision_end|>"
VIDEO = f"USER : {VID}what is the dog doing ? ASSISTANT :"
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(params=QWEN3_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def qwen3(family, attn):
    """One tiny model per (family, kernel) for the module; pruning is removed after every test."""
    yield from cached_model(_MODELS, (family, attn), lambda: tiny_qwen3(family, attn))


@pytest.fixture
def one(qwen3):
    _, processor = qwen3
    return processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])  # 3 x 4 merged tokens


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical_and_disable_leaves_nothing(qwen3, one, method):
    model, _ = qwen3
    hooks = hook_count(model)
    record = assert_keep_all_is_unpruned(model, one, lambda: enable(model, method, 1.0), **GEN)
    assert record.n_kept == record.n_visual == 12 and hook_count(model) == hooks


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_returns_the_prompt_and_cache_is_consistent(qwen3, one, method):
    model, _ = qwen3
    handle = enable(model, method, 0.34)
    generate_cached_and_uncached(model, one, **GEN)
    prompt = one["input_ids"]
    assert handle.last.images[0].n_kept == kept_count(0.34, 12)
    assert handle.last.seq_len_after == prompt.shape[1] - 12 + kept_count(0.34, 12)


@pytest.mark.parametrize("method", METHODS)
def test_padded_batch_rows_match_each_prompt_alone(qwen3, method):
    """Two rows, different image sizes (12 and 4 visual tokens) and prompt lengths, left padded."""
    model, processor = qwen3
    prompts, images = [PROMPT, OTHER], [random_image(96, 128, seed=1), random_image(64, 64, seed=2)]
    handle = enable(model, method, 0.5)
    batch = processor(text=prompts, images=images)
    assert bool((batch["attention_mask"] == 0).any())
    rows = [processor(text=[prompt], images=[image]) for prompt, image in zip(prompts, images, strict=True)]
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)
    assert [im.n_kept for im in handle.last.images] == [kept_count(0.5, 12), kept_count(0.5, 4)]


def _language_positions(model):
    """Position ids the language model receives, one entry per call (prefill, then decode steps)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_kept_tokens_keep_their_original_mrope_positions_at_prefill_and_first_decode(qwen3, one):
    model, _ = qwen3
    seen, hook = _language_positions(model)
    try:
        with torch.no_grad():
            model.generate(**one, max_new_tokens=2, do_sample=False)
            handle = enable(model, "divprune", 5)
            model.generate(**one, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    (unpruned, unpruned_step), (pruned, pruned_step) = seen[:2], seen[2:]
    ids = one["input_ids"][0]
    is_image = ids == model.config.image_token_id
    keep = ~is_image
    keep[is_image.nonzero().squeeze(1)[handle.last.images[0].kept]] = True
    assert pruned.shape[-1] == int(keep.sum()) < ids.numel()
    assert torch.equal(pruned[-3:, 0], unpruned[-3:, 0][:, keep])  # image tokens AND later text: original (t, h, w)
    assert bool((unpruned_step[-3:, 0, 0] == unpruned[-3:, 0].max() + 1).all())
    assert torch.equal(pruned_step[-3:], unpruned_step[-3:])  # first decode step: the unpruned prompt's next position


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_deepstack_pruned_forward_equals_the_llm_fed_the_kept_features(attn, method):
    """Oracle (Qwen3-VL): the unpatched model given, through ``mm_encoder_outputs``, exactly the kept features and
    the kept rows of every DeepStack map, at the kept tokens' original M-RoPE positions."""
    model, processor = built(_MODELS, ("qwen3_vl", attn), lambda: tiny_qwen3("qwen3_vl", attn))
    one = processor(text=[PROMPT], images=[random_image(96, 128, seed=1)])
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"], image_grid_thw=one["image_grid_thw"]
        )
        vision = model.model.get_image_features(one["pixel_values"], one["image_grid_thw"])
        handle = enable(model, method, 4)
        logits = model(**one).logits
    kept = handle.last.images[0].kept
    disable_pruning(model)
    assert len(vision.deepstack_features) == 2
    ids = one["input_ids"][0]
    keep = ids != model.config.image_token_id
    keep[(~keep).nonzero().squeeze(1)[kept]] = True
    fed = type(vision)(pooler_output=[vision.pooler_output[0][kept]])
    fed.deepstack_features = [[level[0][kept]] for level in vision.deepstack_features]
    text_row = torch.arange(int(keep.sum()))[None, None]
    kwargs = dict(input_ids=ids[keep][None], mm_token_type_ids=one["mm_token_type_ids"][:, keep],
                  position_ids=torch.cat([text_row, positions[:, :, keep]]))
    with torch.no_grad():
        expected = model(**kwargs, mm_encoder_outputs={"image": fed}).logits
        fed.deepstack_features = [[torch.zeros_like(level[0])] for level in fed.deepstack_features]
        without_deepstack = model(**kwargs, mm_encoder_outputs={"image": fed}).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, without_deepstack, atol=1e-4)  # the DeepStack maps matter in this model


def test_merged_tokens_merge_their_deepstack_rows_the_same_way():
    """VisionDrop-style merge (target + mean of the others): the DeepStack row follows the same weights."""
    gen = torch.Generator().manual_seed(0)
    features, deepstack = torch.randn(6, 16, generator=gen), torch.randn(6, 8, generator=gen)
    assign = torch.tensor([-1, 0, -1, 0, 0, -1])  # tokens 1, 3, 4 folded into one merged token; target 3
    merged = features[3] + (features[1] + features[4]) / 2
    slots = torch.tensor([0, 1, 2, 5])  # kept 0, 2, 5; the merged token sits in its first member's slot (1)
    chosen = ImageSelection(slots, torch.stack([features[0], merged, features[2], features[5]]),
                            torch.tensor([0, 2, 5]), 1, assign)
    rows = deepstack_like(deepstack, features, chosen)
    expected = torch.stack([deepstack[0], deepstack[3] + (deepstack[1] + deepstack[4]) / 2, deepstack[2], deepstack[5]])
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    bad = ImageSelection(slots, chosen.features.clone(), chosen.kept, 1, assign)
    bad.features[1] = torch.randn(16, generator=gen)  # not a combination of its members
    with pytest.raises(RuntimeError, match="not a linear combination"):
        deepstack_like(deepstack, features, bad)


def test_video_frames_with_timestamps_are_pruned_per_frame(qwen3):
    """Qwen3-VL's video prompt: timestamp text between frames; each frame is budgeted alone; text is never pruned."""
    model, processor = qwen3
    inputs = processor(text=[VIDEO], videos=[random_video3(4, 64, 96, seed=3)])  # 2 frames x 2 x 3 tokens
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.vision_start_token_id).sum()) == 3  # the prompt's plus one per frame
    handle = enable(model, "divprune", 0.5)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    record = handle.last.images[0]
    assert record.kind == "video" and record.n == 12 and record.n_kept == 6
    assert sorted(set((record.kept // 6).tolist())) == [0, 1] and int((record.kept < 6).sum()) == 3
    text = int((ids != model.config.video_token_id).sum())
    assert handle.last.seq_len_after == text + 6
    assert torch.equal(out, uncached) and torch.equal(out[:, : ids.numel()], inputs["input_ids"])


@pytest.mark.parametrize("method", NO_CLS)
def test_methods_without_a_signal_here_decline_before_touching_the_model(qwen3, method):
    model, _ = qwen3
    with pytest.raises(ValueError, match=r"\[CLS\].*divprune"):
        enable(model, method, 0.5)
    assert left_clean(model)


@pytest.mark.parametrize("method, keep, options, match", [
    ("no-such-method", 0.5, {}, "unknown method"), ("divprune", 0.0, {}, "keep"), ("divprune", -0.5, {}, "keep"),
    ("divprune", 1.5, {}, "keep"),
    ("fastv", 0.5, {"k": 9}, "do not exist"),
])
def test_bad_input_fails_clearly_before_the_model_is_touched(qwen3, method, keep, options, match):
    model, _ = qwen3
    hooks = hook_count(model)
    with pytest.raises(ValueError, match=match):
        enable_pruning(model, method, keep=keep, **options)
    assert left_clean(model) and hook_count(model) == hooks


@pytest.mark.parametrize("method", ["divprune", "visiondrop"])
def test_visualize_draws_the_kept_tokens_of_a_qwen3_vl_record(method):
    from test_viz import assert_looks, grey

    from tokenprune.viz import HEADER, draw_kept, prune_once

    model, processor = built(_MODELS, ("qwen3_vl", "sdpa"), lambda: tiny_qwen3("qwen3_vl", "sdpa"))
    image = grey(160, 96)  # 3 x 5 merged tokens of 32x32 px
    record = prune_once(model, processor, image, PROMPT, method, keep=6)
    rec = record.images[0]
    assert rec.grid == (3, 5) and rec.view == "image"
    figure = draw_kept(image, record, size=320, legend=False)  # one 320x192 panel
    assert figure.size == (320, HEADER + 192)
    assert_looks(figure, rec, lambda i: (0, None), {0: (0, 0, 320, 192)})
    assert left_clean(model)


def test_methods_command_lists_the_new_model_types(capsys):
    from tokenprune.cli import main

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out.splitlines()[-1]
    assert all(f" {t}" in listed for t in QWEN3_FAMILIES) and "qwen2_5_vl" in listed


def test_docs_snippets_run_as_written(capsys):
    """Each Python block of docs/qwen3.md runs offline and prints the summary its last comment states."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[1] / "docs" / "qwen3.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    families = {re.search(r'tiny_qwen3\("(\w+)"\)', b).group(1) for b in blocks}
    assert families == set(QWEN3_FAMILIES)
    for block in blocks:
        exec(compile(block, str(page), "exec"), {})
        printed = capsys.readouterr().out.strip()
        assert printed == block.rstrip().rsplit("# ", 1)[1]
