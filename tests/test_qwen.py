"""Qwen2-VL and Qwen2.5-VL end to end on tiny models: images, videos, batches, M-RoPE positions, decoding."""

import pytest
import torch
from conftest import (
    MERGING,
    assert_keep_all_is_unpruned,
    assert_rows_match_alone,
    enable,
    generate_cached_and_uncached,
    runnable_methods,
    runs_without_cls,
)

from tokenprune import disable_pruning, enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.budget import kept_count
from tokenprune.tiny_models import random_image, random_video, tiny_qwen

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
PROMPT = f"USER : {IMG}what is in the image ? ASSISTANT :"
OTHER = f"USER : {IMG}\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
TWO = f"USER : {IMG}{IMG}how many dog are there ? ASSISTANT :"
VIDEO = f"USER : {VID}what is the dog doing ? ASSISTANT :"
GEN = dict(max_new_tokens=5, do_sample=False)


METHODS = [m for m in runnable_methods() if runs_without_cls(m)]
NO_CLS = [m for m in runnable_methods() if not runs_without_cls(m)]


@pytest.fixture(params=["2", "2.5"])
def version(request):
    return request.param


@pytest.fixture
def qwen(version, attn):
    return tiny_qwen(version, attn)


@pytest.fixture
def one(qwen):
    _, processor = qwen
    return processor(text=[PROMPT], images=[random_image(84, 140, seed=1)])  # 3 x 5 merged tokens


def language_positions(model):
    """Capture the position ids the language model receives (4 rows after pruning, 3 rows from HF)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical(qwen, one, method):
    model, _ = qwen
    record = assert_keep_all_is_unpruned(model, one, lambda: enable(model, method, 1.0), **GEN)
    assert record.n_kept == record.n_visual == 15


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_is_transparent_and_cache_consistent(qwen, one, method):
    model, _ = qwen
    handle = enable(model, method, 0.34)
    generate_cached_and_uncached(model, one, **GEN)
    prompt = one["input_ids"]
    assert handle.last.images[0].n_kept == 5  # round(0.34 * 15)
    assert handle.last.seq_len_after == prompt.shape[1] - 10


@pytest.mark.parametrize("method", NO_CLS)
def test_methods_without_a_qwen_signal_explain_why(qwen, method):
    model, _ = qwen
    with pytest.raises(ValueError, match=r"\[CLS\].*divprune"):
        enable(model, method, 0.5)
    assert _HANDLE_ATTR not in model.__dict__


@pytest.mark.parametrize("method", ["divprune", "random"])
def test_kept_tokens_keep_their_original_mrope_positions(qwen, one, method):
    model, _ = qwen
    seen, hook = language_positions(model)
    try:
        with torch.no_grad():
            model(**one)
            handle = enable(model, method, 6)
            model(**one)
    finally:
        hook.remove()
    unpruned, pruned = seen  # [3, 1, L] from HF, [4, 1, L'] from the adapter
    ids = one["input_ids"][0]
    is_image = ids == model.config.image_token_id
    keep = ~is_image
    keep[is_image.nonzero().squeeze(1)[handle.last.images[0].kept]] = True
    assert pruned.shape[0] == 4 and pruned.shape[2] == int(keep.sum())
    assert torch.equal(pruned[1:, 0], unpruned[:, 0][:, keep])  # image AND later text: original (t, h, w)
    assert torch.equal(pruned[0, 0], torch.arange(int(keep.sum())))  # row 0: contiguous text positions
    last_image = int(is_image.nonzero().max())
    assert int(pruned[1, 0, -1]) == int(unpruned[0, 0, -1]) > int(keep[: last_image + 1].sum())  # gap preserved


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])
def test_pruned_forward_equals_the_model_run_on_the_kept_tokens(qwen, one, method):
    """Oracle: the language model fed exactly the kept features at their original M-RoPE positions."""
    model, _ = qwen
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            one["input_ids"], mm_token_type_ids=one["mm_token_type_ids"], image_grid_thw=one["image_grid_thw"]
        )
        feats = model.model.get_image_features(one["pixel_values"], one["image_grid_thw"]).pooler_output[0]
        handle = enable(model, method, 4)
        logits = model(**one).logits
    kept = handle.last.images[0].kept
    disable_pruning(model)
    ids = one["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = ids != model.config.image_token_id
    keep[image_pos[kept]] = True
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[keep][None])
        embeds[0, ids[keep] == model.config.image_token_id] = feats[kept]
        text_row = torch.arange(int(keep.sum()))[None, None]
        expected = model(inputs_embeds=embeds, position_ids=torch.cat([text_row, positions[:, :, keep]])).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_rows_match_each_prompt_alone(qwen, method):
    """Different image sizes (different visual counts), different lengths, two images in one row: left padded."""
    model, processor = qwen
    prompts = [PROMPT, OTHER, TWO]
    images = [[random_image(84, 140, seed=1)], [random_image(56, 56, seed=2)],
              [random_image(112, 84, seed=3), random_image(56, 112, seed=4)]]
    handle = enable(model, method, 0.3)
    batch = processor(text=prompts, images=[im for imgs in images for im in imgs])
    assert bool((batch["attention_mask"] == 0).any())
    rows = [processor(text=[prompt], images=imgs) for prompt, imgs in zip(prompts, images, strict=True)]
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)
    assert [im.index_in_row for im in handle.last.images] == [0, 0, 0, 1]
    assert [im.n_kept for im in handle.last.images] == [kept_count(0.3, n) for n in (15, 4, 12, 8)]  # 5,1,4,2


def test_video_is_pruned_per_frame_by_default(qwen):
    model, processor = qwen
    clip = random_video(6, 56, 84, seed=5)  # 3 temporal slices of 2 x 3 merged tokens
    inputs = processor(text=[VIDEO], videos=[clip])
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN)
        handle = enable_pruning(model, "divprune", keep=0.5)
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    (video,) = handle.last.images
    assert video.kind == "video" and video.n == 18 and video.n_kept == 9
    assert torch.bincount(video.segments[video.kept], minlength=3).tolist() == [3, 3, 3]  # 3 of 6 in every frame
    assert torch.equal(cached, uncached) and torch.equal(cached[:, : ref.shape[1] - 5], ref[:, :-5])
    enable_pruning(model, "divprune", keep=0.5, scope="image")
    with torch.no_grad():
        model(**inputs)
    assert model._tokenprune_handle.last.images[0].n_kept == 9  # one budget over the whole clip
    enable_pruning(model, "divprune", keep=1.0)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **GEN), ref)


def test_images_and_a_video_in_one_prompt(qwen):
    model, processor = qwen
    text = f"USER : {IMG}{VID}{IMG}what is the dog doing ? ASSISTANT :"
    inputs = processor(text=[text], images=[random_image(56, 84, seed=6), random_image(84, 56, seed=7)],
                       videos=[random_video(4, 56, 56, seed=8)])
    handle = enable_pruning(model, "random", keep=0.5)
    with torch.no_grad():
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    assert torch.equal(cached, uncached)
    assert [(im.kind, im.n, im.n_kept) for im in handle.last.images] == [
        ("image", 6, 3), ("image", 6, 3), ("video", 8, 4)
    ]


def test_text_only_prompt_is_a_no_op(qwen):
    model, processor = qwen
    inputs = processor(text=["USER : what is in the image ? ASSISTANT :"])
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN)
        handle = enable_pruning(model, "divprune", keep=0.1)
        out = model.generate(**inputs, **GEN)
    assert torch.equal(out, ref) and handle.last is None


def test_manual_decode_loop_without_position_ids_continues_at_the_original_positions(qwen, one):
    """A decode step on the pruned cache, positions left to HF (rope_deltas), equals generate's second step."""
    model, _ = qwen
    enable_pruning(model, "divprune", keep=3)  # 12 of 15 dropped; the image spans max(3, 5) = 5 positions
    with torch.no_grad():
        scores = model.generate(**one, max_new_tokens=2, do_sample=False, output_scores=True,
                                return_dict_in_generate=True).scores
        out = model(**one, use_cache=True)
        first = out.logits[:, -1].argmax(-1, keepdim=True)
        # no attention_mask: transformers 5.23's Qwen decode path breaks on a 2-D mask without position ids, pruned
        # or not; HF then takes the positions from past length + rope_deltas, which the adapter set
        step = model(input_ids=first, past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], scores[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.logits[:, -1], scores[1], rtol=1e-5, atol=1e-5)


def test_rope_deltas_are_never_stale(qwen, one, version, attn):
    """A pruned call after an unpruned one (and the reverse) gives the same answer as on a fresh model."""
    model, processor = qwen
    other = processor(text=[OTHER], images=[random_image(112, 56, seed=9)])
    with torch.no_grad():
        model.generate(**other, **GEN)  # leaves HF's rope_deltas of another prompt behind
        enable_pruning(model, "divprune", keep=5)
        after_other = model.generate(**one, **GEN)
        disable_pruning(model)
        fresh, _ = tiny_qwen(version, attn)
        enable_pruning(fresh, "divprune", keep=5)
        assert torch.equal(fresh.generate(**one, **GEN), after_other)


def test_record_geometry(qwen, one):
    model, _ = qwen
    handle = enable_pruning(model, "uniform", keep=4)
    with torch.no_grad():
        model(**one)
    (image,) = handle.last.images
    assert image.grid == (3, 5) and image.view == "image" and image.boxes.shape == (15, 4)
    torch.testing.assert_close(image.boxes[6], torch.tensor([1 / 5, 1 / 3, 2 / 5, 2 / 3]))


def test_merged_tokens_take_the_slot_and_position_of_their_first_member(qwen, one):
    """VisionDrop on Qwen merges in the LLM input space; a merged token sits at its first member's M-RoPE position."""
    model, _ = qwen
    seen, hook = language_positions(model)
    try:
        with torch.no_grad():
            model(**one)
            handle = enable(model, "visiondrop", 6)
            model(**one)
    finally:
        hook.remove()
    unpruned, pruned = seen
    (image,) = handle.last.images
    assert image.n_merged > 0 and image.n_kept == 6
    ids = one["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
    firsts = [int((image.merged == j).nonzero().min()) for j in range(image.n_merged)]
    slots = sorted(image.kept.tolist() + firsts)
    keep = ids != model.config.image_token_id
    keep[image_pos[slots]] = True
    assert torch.equal(pruned[1:, 0], unpruned[:, 0][:, keep])
