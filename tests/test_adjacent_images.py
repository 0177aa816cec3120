"""Images side by side in the decoder loop: LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision put no token between two images
("<image><image>"; the tiny word tokenizer also drops the newline of "<image>\n<image>"), so their placeholders form
one run. The loop tells them apart by each image's placeholder count (``patches/image_runs.py``): per-image budgets,
scores and records are those of each image, cached == uncached, a batch row == the row alone."""

import functools

import pytest
import torch
from conftest import cached_and_uncached_record

from tokenprune import functional as F
from tokenprune import pruning
from tokenprune.budget import kept_count
from tokenprune.methods.divprune import DivPrune
from tokenprune.methods.fastv import FastV
from tokenprune.patches.image_runs import image_numbers
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava, tiny_llava_next
from tokenprune.tiny_onevision import tiny_onevision

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llava", "llava_next", "llava_onevision"]
GEN = dict(max_new_tokens=3, do_sample=False)
K = 2  # FastV's first pruned layer (scored at K - 1) on the 4-layer tiny LLMs
IMAGES = [random_image(40, 70, seed=1), random_image(64, 48, seed=2), random_image(56, 56, seed=3)]


@functools.cache
def _model(family):
    if family == "llava":
        return tiny_llava(LlavaSize(text_layers=4), attn_implementation="eager")
    if family == "llava_next":
        return tiny_llava_next("eager", text_layers=4)
    return tiny_onevision(text_layers=4, attn_implementation="eager")


def _inputs(processor, prompts, images):
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


def _own_counts(model, processor, prompt, images):
    """Each image's placeholder count in ``prompt`` with text between the images (every image a run of its own)."""
    separated = prompt.replace("<image><image>", "<image> and <image>")
    ids = _inputs(processor, [separated], images)["input_ids"][0]
    visual = ids == model.config.image_token_id
    starts = (visual & ~torch.nn.functional.pad(visual, (1, 0))[:-1]).nonzero().squeeze(1).tolist()
    ends = (visual & ~torch.nn.functional.pad(visual, (0, 1))[1:]).nonzero().squeeze(1).tolist()
    assert len(starts) == len(images)
    return [e - s + 1 for s, e in zip(starts, ends, strict=True)]


PROMPT = "USER : <image><image> what is in the image ? ASSISTANT :"


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_scores_and_budgets_each_image(family):
    """Two images back to back: the record has two images of their own sizes, and each image keeps exactly the
    top-k of the last prompt token's attention (eager weights of layer K-1) over ITS tokens, k its own budget."""
    model, processor = _model(family)
    images = IMAGES[:2]
    inputs = _inputs(processor, [PROMPT], images)
    own = _own_counts(model, processor, PROMPT, images)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    assert (visual & ~torch.nn.functional.pad(visual, (1, 0))[:-1]).sum() == 1  # one run of placeholders
    with pruning(model, "fastv", keep=0.4, k=K) as handle, torch.no_grad():
        out = model(**inputs, output_attentions=True)
    rec = handle.last
    assert [im.n for im in rec.images] == own and [im.index_in_row for im in rec.images] == [0, 1]
    slots = torch.split(visual.nonzero().squeeze(1), own)
    attn = out.attentions[K - 1][0, :, -1]  # [H, L] the last prompt token's row
    for im, s in zip(rec.images, slots, strict=True):
        assert im.kept.tolist() == F.fastv(attn[:, s], kept_count(0.4, s.numel())).tolist()
    assert rec.visual_per_layer[K] == sum(kept_count(0.4, n) for n in own)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", [("fastv", {"k": K}), ("dart", {"k": K}), ("pdrop", {})])
def test_batch_rows_equal_rows_alone_and_cached_equals_uncached(family, method, options):
    """Rows with different images (two side by side; one alone; padding): each row's kept sets and generated ids
    are the row's alone, and KV-cached generation equals use_cache=False."""
    model, processor = _model(family)
    rows = [(PROMPT, IMAGES[:2]), ("USER : <image> is there a dog left of the red circle ? ASSISTANT :", IMAGES[2:])]
    with pruning(model, method, keep=0.4, **options) as handle:
        alone = []
        with torch.no_grad():
            for prompt, images in rows:
                ids = model.generate(**_inputs(processor, [prompt], images), **GEN)
                alone.append((ids[0, -GEN["max_new_tokens"]:], [im.kept for im in handle.last.images]))
            batch = _inputs(processor, [p for p, _ in rows], [im for _, ims in rows for im in ims])
            model(**batch)  # a forward: the images' counts from the family's rule (generate pre-encodes them)
            forward_kept = [im.kept for im in handle.last.images]
        cached, record = cached_and_uncached_record(model, batch, **GEN)
        kept = [im.kept for im in record.images]
    assert bool((batch["attention_mask"] == 0).any()) and len(kept) == 3
    assert all(torch.equal(a, b) for a, b in zip([k for _, ks in alone for k in ks], kept, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(forward_kept, kept, strict=True))
    for r, (ids, _) in enumerate(alone):
        assert torch.equal(cached[r, -GEN["max_new_tokens"]:], ids)


def test_vision_stage_then_decoder_stage_records_each_image():
    """Composition (DivPrune, then FastV): the vision-pruned spans of the two images stay two images in the loop;
    the record composes both stages per image (kept indexes each image's own original tokens)."""
    model, processor = _model("llava")
    images = IMAGES[:2]
    inputs = _inputs(processor, [PROMPT], images)
    own = _own_counts(model, processor, PROMPT, images)
    with pruning(model, [DivPrune(), FastV(k=K)], keep=0.5):
        _, rec = cached_and_uncached_record(model, inputs, **GEN)
    assert rec.method == "divprune+fastv" and [im.n for im in rec.images] == own
    assert all(im.kept.numel() < n and int(im.kept.max()) < n for im, n in zip(rec.images, own, strict=True))


def test_onevision_image_then_video_back_to_back_are_two_items():
    """LLaVA-OneVision "<image><video>": a change of placeholder id starts a new item; each keeps its own budget, and
    cached generation equals use_cache=False (the video's count from its frames)."""
    from tokenprune.tiny_onevision import random_video_ov

    model, processor = _model("llava_onevision")
    image, video = IMAGES[0], random_video_ov(3, seed=1)

    def run(text):
        inputs = dict(processor(text=[text], images=[image], videos=[video], return_tensors="pt"))
        with pruning(model, "fastv", keep=0.4, k=K):
            return cached_and_uncached_record(model, inputs, **GEN)[1]

    adjacent = run("USER : <image><video> what is the dog doing ? ASSISTANT :")
    separated = run("USER : <image> and <video> what is the dog doing ? ASSISTANT :")
    assert [im.n for im in adjacent.images] == [im.n for im in separated.images] and len(adjacent.images) == 2
    assert [im.n_kept for im in adjacent.images] == [kept_count(0.4, im.n) for im in separated.images]


def test_image_numbers_split_runs_by_counts_and_modality():
    ids = torch.tensor([[1, 9, 9, 9, 9, 9, 2, 8, 8, 3],
                        [9, 9, 9, 8, 8, 8, 8, 4, 0, 0]])
    counts = {9: [2, 3, 3], 8: [2, 4]}
    assert image_numbers(ids, (9, 8), counts).tolist() == [
        [-1, 0, 0, 1, 1, 1, -1, 2, 2, -1],
        [0, 0, 0, 1, 1, 1, 1, -1, -1, -1],
    ]
    # without counts: runs of placeholders, split where the placeholder id changes (an image then a video)
    assert image_numbers(ids, (9, 8), {}).tolist()[1] == [0, 0, 0, 1, 1, 1, 1, -1, -1, -1]
    with pytest.raises(ValueError, match="8 placeholder tokens of id 9 .* 7"):
        image_numbers(ids, (9, 8), {9: [2, 5]})
