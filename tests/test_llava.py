"""LLaVA-1.5 end to end on tiny models built from configs, under eager and sdpa, for every method."""

import pytest
import torch
from conftest import MERGING, OTHER_PROMPT, PROMPT, TWO_IMAGES, enable, encode, runnable_methods
from flowcut_reference import flowcut_reference

from tokenprune import disable_pruning, enable_pruning
from tokenprune.tiny_models import random_image

METHODS = runnable_methods()
GEN = dict(max_new_tokens=6, do_sample=False)

@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical(llava, one_prompt, method):
    model, _ = llava
    with torch.no_grad():
        ref_logits = model(**one_prompt).logits
        ref_ids = model.generate(**one_prompt, **GEN)
        handle = enable(model, method, 1.0)
        logits = model(**one_prompt).logits
        ids = model.generate(**one_prompt, **GEN)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(ids, ref_ids)
    assert handle.last.n_kept == handle.last.n_visual == 64


@pytest.mark.parametrize("method", METHODS)
def test_pruned_generate_is_transparent_and_cache_consistent(llava, one_prompt, method):
    model, _ = llava
    handle = enable(model, method, 0.11)
    with torch.no_grad():
        cached = model.generate(**one_prompt, **GEN)
        uncached = model.generate(**one_prompt, **GEN, use_cache=False)
    prompt = one_prompt["input_ids"]
    assert torch.equal(cached[:, : prompt.shape[1]], prompt)  # original prompt ids, then new tokens
    assert cached.shape[1] == prompt.shape[1] + GEN["max_new_tokens"]
    assert torch.equal(cached, uncached)
    (image,) = handle.last.images
    expected = 7 if handle.method.fixed_budget else image.n_kept  # round(0.11 * 64) = 7, unless data-dependent
    assert image.n == 64 and image.n_kept == expected and 0 < image.n_kept < 64
    assert handle.last.seq_len_after == prompt.shape[1] - 64 + expected


@pytest.mark.parametrize("method", [m for m in METHODS if m not in MERGING])  # merging: test_methods_vision.py
def test_pruned_forward_equals_the_model_run_on_the_kept_tokens(llava, one_prompt, method):
    """Oracle: pruning == feeding the LLM exactly the kept features at contiguous positions."""
    model, _ = llava
    handle = enable(model, method, 16)
    with torch.no_grad():
        logits = model(**one_prompt).logits
    kept = handle.last.images[0].kept
    disable_pruning(model)
    ids = one_prompt["input_ids"][0]
    image_pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[image_pos] = False
    keep[image_pos[kept]] = True
    with torch.no_grad():
        if handle.method.stage == "vision-encoder":  # pruned inside the tower: independent reference features
            feats, ref_kept, _ = flowcut_reference(model, one_prompt["pixel_values"][0], 16)
            assert ref_kept.tolist() == kept.tolist()
            kept = torch.arange(16)
        else:
            feats = model.model.get_image_features(pixel_values=one_prompt["pixel_values"]).pooler_output[0]
        embeds = model.get_input_embeddings()(ids[keep][None])
        embeds[0, ids[keep] == model.config.image_token_id] = feats[kept]
        expected = model(inputs_embeds=embeds).logits
    assert logits.shape[1] == int(keep.sum())
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_batch_rows_match_each_prompt_alone(llava, method):
    """Two different prompts, different images and lengths, left padded, one with two images."""
    model, processor = llava
    prompts = [PROMPT, OTHER_PROMPT, TWO_IMAGES]
    images = [[random_image(80, 96, seed=1)], [random_image(64, 64, seed=2)],
              [random_image(70, 50, seed=3), random_image(90, 90, seed=4)]]
    handle = enable(model, method, 0.25)
    alone = []
    with torch.no_grad():
        for prompt, imgs in zip(prompts, images, strict=True):
            out = model(**encode(processor, [prompt], imgs)).logits[0, -1]
            alone.append((out, [im.kept for im in handle.last.images]))
        batch = encode(processor, prompts, [im for imgs in images for im in imgs])
        assert batch["attention_mask"][0, 0] == 0  # really left padded
        logits = model(**batch).logits[:, -1]
    for row, (ref, kept) in enumerate(alone):
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-5)
        batch_kept = [im.kept for im in handle.last.images if im.row == row]
        assert [k.tolist() for k in batch_kept] == [k.tolist() for k in kept]
    assert [im.row for im in handle.last.images] == [0, 1, 2, 2]
    assert [im.index_in_row for im in handle.last.images] == [0, 0, 0, 1]


def test_batched_generate_matches_each_prompt_alone(llava):
    model, processor = llava
    prompts, images = [PROMPT, OTHER_PROMPT], [random_image(80, 96, seed=1), random_image(64, 64, seed=2)]
    enable_pruning(model, "divprune", keep=8)
    with torch.no_grad():
        batch = encode(processor, prompts, images)
        out = model.generate(**batch, **GEN, output_scores=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])
        for row in range(2):
            single = model.generate(**encode(processor, [prompts[row]], [images[row]]), **GEN,
                                    output_scores=True, return_dict_in_generate=True)
            torch.testing.assert_close(out.scores[0][row], single.scores[0][0], rtol=1e-4, atol=1e-5)


def test_manual_decode_loop_with_original_mask_matches_generate(llava):
    """A hand-written loop that extends the ORIGINAL (left-padded) attention mask still lines up with the
    pruned KV cache: step by step it gives the logits generate gave for the same tokens."""
    model, processor = llava
    images = [random_image(80, 96, seed=1), random_image(64, 64, seed=2), random_image(90, 90, seed=3)]
    batch = encode(processor, [PROMPT, TWO_IMAGES], images)  # rows lose different counts: re-padded
    enable_pruning(model, "fastervlm", keep=0.25)
    with torch.no_grad():
        ref = model.generate(**batch, **GEN, output_logits=True, return_dict_in_generate=True)
        new_tokens = ref.sequences[:, batch["input_ids"].shape[1]:]
        out = model(**batch, use_cache=True)
        mask, steps = batch["attention_mask"], [out.logits[:, -1]]
        for t in range(GEN["max_new_tokens"] - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=new_tokens[:, t:t + 1], attention_mask=mask, past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits[:, -1])
    for step, expected in zip(steps, ref.logits, strict=True):
        torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-5)


def test_num_return_sequences_keeps_the_original_prompt(llava, one_prompt):
    model, _ = llava
    enable_pruning(model, "uniform", keep=0.25)
    with torch.no_grad():
        out = model.generate(**one_prompt, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 2
    assert torch.equal(out[:, : one_prompt["input_ids"].shape[1]], one_prompt["input_ids"].expand(2, -1))


def test_positional_call_and_labels(llava, one_prompt):
    model, _ = llava
    handle = enable_pruning(model, "random", keep=10, seed=3)
    labels = one_prompt["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    with torch.no_grad():
        out = model(one_prompt["input_ids"], one_prompt["pixel_values"], one_prompt["attention_mask"], labels=labels)
    assert out.logits.shape[1] == handle.last.seq_len_after == one_prompt["input_ids"].shape[1] - 54
    assert torch.isfinite(out.loss)


def test_prompts_without_images_are_untouched(llava):
    model, processor = llava
    text = processor.tokenizer(["USER : what is a cat ? ASSISTANT :"], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**text, **GEN)
        handle = enable_pruning(model, "divprune", keep=0.1)
        out = model.generate(**text, **GEN)
        logits = model(**text).logits
    assert torch.equal(out, ref) and logits.shape[1] == text["input_ids"].shape[1]
    assert handle.last is None


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_select_the_same_tokens(method):
    from tokenprune.tiny_models import tiny_llava

    kept = {}
    for attn in ("eager", "sdpa"):
        model, processor = tiny_llava(attn_implementation=attn, seed=5)
        handle = enable(model, method, 0.2)
        with torch.no_grad():
            model(**encode(processor, [TWO_IMAGES], [random_image(64, 80, seed=7), random_image(50, 50, seed=8)]))
        kept[attn] = [im.kept.tolist() for im in handle.last.images]
    assert kept["eager"] == kept["sdpa"]


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_model(method):
    from tokenprune.tiny_models import tiny_llava

    model, processor = tiny_llava()
    model.to(torch.bfloat16)
    inputs = encode(processor, [PROMPT], [random_image(80, 96, seed=1)])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    handle = enable(model, method, 0.25)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert handle.last.images[0].n_kept == 16 or not handle.method.fixed_budget


def test_wraps_and_restores_an_existing_instance_forward(llava, one_prompt):
    """accelerate (device_map=...) installs its own instance-level forward: we wrap it and give it back."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model, _ = llava
    add_hook_to_module(model, ModelHook())
    accelerate_forward = model.forward
    enable_pruning(model, "divprune", keep=8)
    assert model.forward is not accelerate_forward
    with torch.no_grad():
        assert model(**one_prompt).logits.shape[1] == one_prompt["input_ids"].shape[1] - 56
    disable_pruning(model)
    assert model.forward is accelerate_forward


def test_explicit_position_ids_are_reindexed(llava, one_prompt):
    model, _ = llava
    enable_pruning(model, "fastervlm", keep=5)
    positions = torch.arange(one_prompt["input_ids"].shape[1])[None]
    with torch.no_grad():
        implicit = model(**one_prompt).logits
        explicit = model(**one_prompt, position_ids=positions).logits
    assert torch.equal(explicit, implicit)
