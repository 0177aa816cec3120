"""A later turn that adds two images back to back ("<image><image>") on a vision-pruned KV cache.

LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision put no token between two images (the tiny word tokenizer also drops the
newline of "<image>\\n<image>"), so the new turn's placeholders form one run. The new images are told apart by each
image's placeholder count, as the decoder loop tells them apart (``patches/image_runs.py``): each is pruned as it
would be alone, with its index in the conversation, and the answer equals the uncached run of the whole conversation
with the same pixels -- whether the call passes the new images' pixels or every image's. Decoder-stage methods
decline a new image in a later turn with their own clear error (docs/conversations.md).
"""

import copy
import functools

import pytest
import torch
from transformers import DynamicCache

from tokenprune import disable_pruning, enable_pruning
from tokenprune.methods.divprune import DivPrune
from tokenprune.methods.fastv import FastV
from tokenprune.patches.entering_images import new_items_by_count
from tokenprune.tiny_models import LlavaSize, random_image, tiny_llava, tiny_llava_next
from tokenprune.tiny_onevision import tiny_onevision

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
IMAGES = [random_image(40, 70, seed=1), random_image(64, 48, seed=2), random_image(56, 56, seed=3),
          random_image(72, 40, seed=4)]
TURN1 = "USER : {} what is in the image ? ASSISTANT :"
TURN2 = " USER : <image><image> and these ? ASSISTANT :"
PIXEL_KEYS = ("pixel_values", "image_sizes", "batch_num_images")


@functools.cache
def _model(family):
    if family == "llava":
        return tiny_llava(LlavaSize(text_layers=2), attn_implementation="eager")
    if family == "llava_next":
        return tiny_llava_next("eager", text_layers=2)
    return tiny_onevision(text_layers=2, attn_implementation="eager")


def _pixels(batch: dict) -> dict:
    return {k: batch[k] for k in PIXEL_KEYS if k in batch}


def _every_pixel(first: dict, second: dict) -> dict:
    """Both turns' pixel inputs in prompt order (one row), as a processor run on the whole conversation gives them."""
    out = {}
    if "batch_num_images" in second:  # OneVision: images in the row (several: each image's base tile only)
        out["batch_num_images"] = first["batch_num_images"] + second["batch_num_images"]
    for key in (k for k in ("pixel_values", "image_sizes") if k in second):
        items = [*first[key], *second[key]]
        if key == "pixel_values" and items[0].ndim == 4:  # per-image patches (NeXT, OneVision): one padded count
            n = max(x.shape[0] for x in items)
            items = [torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])]) for x in items]
        out[key] = torch.stack(items)
    return out


def _two_turns(family, method, cached_images):
    """Turn 1 (``cached_images`` images back to back) pruned into a cache; returns what turn 2 needs."""
    model, processor = _model(family)
    first_images, new_images = IMAGES[:cached_images], IMAGES[cached_images:cached_images + 2]
    later = {} if family == "llava_onevision" else {"add_special_tokens": False}  # its word tokenizer adds no BOS
    turn1 = dict(processor(images=first_images, text=TURN1.format("<image>" * cached_images), return_tensors="pt"))
    turn2 = dict(processor(images=new_images, text=TURN2, return_tensors="pt", **later))
    handle = enable_pruning(model, method, keep=0.4)
    with torch.no_grad():
        out = model.generate(input_ids=turn1["input_ids"], **_pixels(turn1), past_key_values=DynamicCache(), **GEN)
    conversation = torch.cat([out.sequences, turn2["input_ids"]], dim=1)
    return model, handle, turn1, turn2, out, conversation


@pytest.mark.parametrize("given", ["new", "every"])
@pytest.mark.parametrize("family,method,cached_images", [
    ("llava", "divprune", 1), ("llava", "random", 2), ("llava_next", "divprune", 1), ("llava_next", "random", 2),
    ("llava_onevision", "divprune", 2),  # two images per turn: base tiles only in every turn and in the whole
])
def test_two_new_images_back_to_back_equal_the_uncached_conversation(family, method, cached_images, given):
    """Turn 2 adds two images back to back on turn 1's pruned cache: the same ids and logits as the uncached run of
    the whole conversation with the same pixels; the record holds the two new images, each with its own token count
    and index in the conversation, kept as the uncached run keeps them (a seeded selector draws by that index); the
    grown cache then holds every image (a third call continues it with the right count)."""
    model, handle, turn1, turn2, out, conversation = _two_turns(family, method, cached_images)
    try:
        pixels = _pixels(turn2) if given == "new" else _every_pixel(turn1, turn2)
        with torch.no_grad():
            reuse = model.generate(input_ids=conversation, **pixels,
                                   past_key_values=copy.deepcopy(out.past_key_values), **GEN)
            entered = handle.last
            fresh = model.generate(input_ids=conversation, **_every_pixel(turn1, turn2), **GEN)
            whole = handle.last
    finally:
        disable_pruning(model)
    assert torch.equal(reuse.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reuse.logits), torch.stack(fresh.logits), rtol=0, atol=1e-4)
    assert [im.index_in_row for im in entered.images] == [cached_images, cached_images + 1]
    assert len(whole.images) == cached_images + 2
    for mine, alone in zip(entered.images, whole.images[cached_images:], strict=True):
        assert mine.n == alone.n and torch.equal(mine.kept, alone.kept) and mine.kept.numel() < mine.n
    state = reuse.past_key_values._tokenprune_state
    assert state.images.tolist() == [cached_images + 2]


def test_cached_images_back_to_back_number_the_new_image():
    """Turn 1 with two images back to back, turn 2 with ONE new image: the new image is the third of the
    conversation (a seeded selector draws what the uncached run draws for it)."""
    model, processor = _model("llava")
    turn1 = dict(processor(images=IMAGES[:2], text=TURN1.format("<image><image>"), return_tensors="pt"))
    turn2 = dict(processor(images=IMAGES[2:3], text=" USER : <image> and this ? ASSISTANT :", return_tensors="pt",
                           add_special_tokens=False))
    handle = enable_pruning(model, "random", keep=0.4)
    try:
        with torch.no_grad():
            out = model.generate(**turn1, past_key_values=DynamicCache(), **GEN)
            conversation = torch.cat([out.sequences, turn2["input_ids"]], dim=1)
            reuse = model.generate(input_ids=conversation, pixel_values=turn2["pixel_values"],
                                   past_key_values=out.past_key_values, **GEN)
            entered = handle.last
            fresh = model.generate(input_ids=conversation, **_every_pixel(turn1, turn2), **GEN)
    finally:
        disable_pruning(model)
    assert torch.equal(reuse.sequences, fresh.sequences)
    assert [im.index_in_row for im in entered.images] == [2]
    assert torch.equal(entered.images[0].kept, handle.last.images[2].kept)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_pixels_of_one_of_the_two_new_images_raise_a_clear_error(family):
    """Pixels that are neither the new images' nor every image's: a ValueError that says what was found and what to
    pass, before anything runs."""
    model, _, _, turn2, out, conversation = _two_turns(family, "divprune", 1)
    one = {k: v[:1] for k, v in _pixels(turn2).items()}
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=r"describe 1 image\(s\) .*neither the new images"):
            model.generate(input_ids=conversation, **one, past_key_values=out.past_key_values, **GEN)
    finally:
        disable_pruning(model)


@pytest.mark.parametrize("method", [FastV(k=1), [DivPrune(), FastV(k=1)]], ids=["fastv", "divprune+fastv"])
def test_decoder_stage_declines_the_two_new_images_by_name(method):
    """A cache pruned by a decoder-stage method (alone or after a vision stage) declines the new images with the
    decoder-stage reason, not a count error."""
    model, processor = _model("llava")
    turn1 = dict(processor(images=IMAGES[:1], text=TURN1.format("<image>"), return_tensors="pt"))
    turn2 = dict(processor(images=IMAGES[1:3], text=TURN2, return_tensors="pt", add_special_tokens=False))
    enable_pruning(model, method, keep=0.4)
    try:
        with torch.no_grad():
            out = model.generate(**turn1, past_key_values=DynamicCache(), **GEN)
            conversation = torch.cat([out.sequences, turn2["input_ids"]], dim=1)
            for pixels in (turn2["pixel_values"], torch.cat([turn1["pixel_values"], turn2["pixel_values"]])):
                with pytest.raises(ValueError, match="fastv: this call adds a new image or video after a KV cache "
                                                     "pruned by a decoder-stage method"):
                    model.generate(input_ids=conversation, pixel_values=pixels,
                                   past_key_values=copy.deepcopy(out.past_key_values), **GEN)
    finally:
        disable_pruning(model)


def test_new_items_by_count_reads_rows_and_turns():
    """Two rows; row 0: one cached image (3 tokens) then two new back to back (2 + 3); row 1: one new (2)."""
    ids = torch.tensor([[9, 9, 9, 1, 1, 9, 9, 9, 9, 9, 1],
                        [0, 1, 1, 1, 1, 9, 9, 1, 1, 1, 1]])
    assert new_items_by_count(ids, 4, 9, [2, 3, 2]) == (None, [2, 1])
    assert new_items_by_count(ids, 4, 9, [3, 2, 3, 2]) == ([1, 2, 3], [2, 1])
    with pytest.raises(ValueError, match="do not line up"):
        new_items_by_count(ids, 4, 9, [2, 2, 3])
    with pytest.raises(ValueError, match="describe 2 image"):
        new_items_by_count(ids, 4, 9, [3, 3])


def test_two_rows_with_two_and_one_new_images():
    """A batch: row 0 adds two images back to back, row 1 one (the new turn is padded): == the uncached run of the
    whole conversation with every image's pixels, row-major."""
    model, processor = _model("llava")
    first = dict(processor(images=IMAGES[:2], text=[TURN1.format("<image>"), TURN1.format("<image>") + " ok"],
                           return_tensors="pt", padding=True))
    second = dict(processor(images=[IMAGES[2], IMAGES[3], IMAGES[0]], text=[TURN2, " USER : <image> and this ?"],
                            return_tensors="pt", padding=True, add_special_tokens=False))
    handle = enable_pruning(model, "divprune", keep=0.4)
    try:
        with torch.no_grad():
            out = model.generate(**first, past_key_values=DynamicCache(), **GEN)
            g = out.sequences.shape[1] - first["input_ids"].shape[1]
            call = dict(input_ids=torch.cat([out.sequences, second["input_ids"]], dim=1), attention_mask=torch.cat(
                [first["attention_mask"], torch.ones_like(out.sequences[:, -g:]), second["attention_mask"]], dim=1))
            reuse = model.generate(**call, pixel_values=second["pixel_values"], past_key_values=out.past_key_values,
                                   **GEN)
            entered = handle.last
            every = torch.cat([first["pixel_values"][:1], second["pixel_values"][:2], first["pixel_values"][1:],
                               second["pixel_values"][2:]])
            fresh = model.generate(**call, pixel_values=every, **GEN)
    finally:
        disable_pruning(model)
    assert bool((call["attention_mask"] == 0).any())
    assert torch.equal(reuse.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(reuse.logits), torch.stack(fresh.logits), rtol=0, atol=1e-4)
    assert [(im.row, im.index_in_row) for im in entered.images] == [(0, 1), (0, 2), (1, 1)]
    assert reuse.past_key_values._tokenprune_state.images.tolist() == [3, 2]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_keep_all_two_new_images_equal_the_unpruned_model(family):
    """keep=1.0: the turn with two new images back to back on the returned cache gives the unpruned model's ids and
    logits bit for bit (transformers continues such a cache itself on these families)."""
    model, processor = _model(family)

    def turn2(keep):
        turn1 = dict(processor(images=IMAGES[:1], text=TURN1.format("<image>"), return_tensors="pt"))
        turn2 = dict(processor(images=IMAGES[1:3], text=TURN2, return_tensors="pt", add_special_tokens=False))
        if keep is not None:
            enable_pruning(model, "divprune", keep=keep)
        try:
            with torch.no_grad():
                out = model.generate(**turn1, past_key_values=DynamicCache(), **GEN)
                ids = torch.cat([out.sequences, turn2["input_ids"]], dim=1)
                return model.generate(input_ids=ids, **_pixels(turn2), past_key_values=out.past_key_values, **GEN)
        finally:
            disable_pruning(model)

    mine, expected = turn2(1.0), turn2(None)
    assert torch.equal(mine.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(mine.logits, expected.logits, strict=True))
