"""InternVL3 end to end on tiny models (eager and sdpa), the vision stage: every method with a signal there, tiles and
thumbnail as selection units, InternViT signals carried through the pixel shuffle, batches with several images per
prompt, an oracle, the explicit list of what declines, and the overlay. Decoder-stage methods, the real depth and the
pruned cache: tests/test_internvl_decoder.py."""

import dataclasses

import pytest
import torch
from conftest import (
    MERGING,
    assert_keep_all_is_unpruned,
    assert_rows_match_alone,
    built,
    cached_model,
    generate_cached_and_uncached,
    hook_and_attribute_census,
    runnable_methods,
)
from conftest import enable as _enable
from internvl_cases import DECLINES, GEN, PROMPT, WIDE, T, two_rows
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenprune import disable_pruning, enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.budget import kept_count
from tokenprune.methods import CLS_ATTENTION, METHODS, VISION_HIDDEN, SignalRequest
from tokenprune.patches.clip_signals import ClipProbe
from tokenprune.patches.internvl import shuffle_groups, shuffled_signal
from tokenprune.tiny_internvl import tiny_internvl
from tokenprune.tiny_models import random_image

# VisionZip and VisionDrop without their [CLS] token (keep_cls=False) run: dominant patches + merged contextual tokens.
WITHOUT_CLS = {f"{m}-nocls": (m, {"keep_cls": False}) for m in ("visionzip", "visiondrop")}
METHODS_HERE = [m for m in runnable_methods("internvl") if m not in DECLINES] + sorted(WITHOUT_CLS)
MERGING = MERGING | set(WITHOUT_CLS)
_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def enable(model, method, keep, **kwargs):
    """conftest's ``enable`` (tiny-model options), with the keep_cls=False variants."""
    name, options = WITHOUT_CLS.get(method, (method, {}))
    return _enable(model, name, keep, **options, **kwargs)


def _model(attn, **options):
    return built(_MODELS, (attn, tuple(sorted(options.items()))), lambda: tiny_internvl(attn, **options))


@pytest.fixture
def internvl(attn):
    yield from cached_model(_MODELS, (attn, ()), lambda: tiny_internvl(attn))


@pytest.fixture
def one(internvl):
    _, processor = internvl
    return processor(text=[PROMPT], images=[random_image(*WIDE, seed=1)])


def _expected_kept(method, keep, tiles):
    """Kept tokens of an image of ``tiles`` tiles: per tile (and thumbnail) or one pool, as the method's scope."""
    if METHODS[WITHOUT_CLS.get(method, (method,))[0]].crop_scope == "image":
        return kept_count(keep, tiles * T)
    return tiles * kept_count(keep, T)


@pytest.mark.parametrize("method", METHODS_HERE)
def test_keep_all_is_bit_identical_and_disable_leaves_nothing(internvl, one, method):
    model, _ = internvl
    record = assert_keep_all_is_unpruned(model, one, lambda: enable(model, method, 1.0), **GEN)
    assert record.n_kept == record.n_visual == 3 * T


@pytest.mark.parametrize("method", METHODS_HERE)
def test_pruned_generate_returns_the_prompt_and_cache_is_consistent(internvl, one, method):
    model, _ = internvl
    handle = enable(model, method, 0.25)
    generate_cached_and_uncached(model, one, **GEN)
    prompt = one["input_ids"]
    record = handle.last.images[0]
    if METHODS[WITHOUT_CLS.get(method, (method,))[0]].fixed_budget:
        assert record.n_kept == _expected_kept(method, 0.25, 3)
    assert handle.last.seq_len_after == prompt.shape[1] - 3 * T + record.n_kept
    assert torch.equal(record.segments, torch.arange(3).repeat_interleave(T))  # tile of each token, thumbnail last


@pytest.mark.parametrize("method", METHODS_HERE)
def test_padded_batch_with_several_images_matches_each_prompt_alone(internvl, method):
    model, processor = internvl
    prompts, images, batch = two_rows(processor)
    assert bool((batch["attention_mask"] == 0).any()) and batch["pixel_values"].shape[0] == 3 + 1 + 4
    handle = enable(model, method, 0.5)
    rows = [processor(text=[prompt], images=row_images) for prompt, row_images in zip(prompts, images, strict=True)]
    assert_rows_match_alone(model, rows, batch)
    generate_cached_and_uncached(model, batch, **GEN)
    assert [im.n for im in handle.last.images] == [3 * T, T, 4 * T]
    assert [(im.row, im.index_in_row) for im in handle.last.images] == [(0, 0), (1, 0), (1, 1)]


@pytest.mark.parametrize("method", [m for m in METHODS_HERE if m not in MERGING])
def test_pruned_forward_equals_the_llm_fed_the_kept_features(internvl, one, method):
    """Oracle: the unpatched model given exactly the kept tiles' tokens (``mm_encoder_outputs``) in a prompt holding
    only the kept placeholders, numbered 0..L'-1 as the adapter re-indexes them."""
    model, _ = internvl
    with torch.no_grad():
        tiles = model.model.get_image_features(pixel_values=one["pixel_values"]).pooler_output  # [3, T, D]
        handle = enable(model, method, 0.25)
        logits = model(**one).logits
    kept = handle.last.images[0].kept
    disable_pruning(model)
    ids = one["input_ids"][0]
    keep = ids != model.config.image_token_id
    keep[(~keep).nonzero().squeeze(1)[kept]] = True
    fed = BaseModelOutputWithPooling(pooler_output=tiles.reshape(-1, tiles.shape[-1])[kept][None])
    with torch.no_grad():
        expected = model(input_ids=ids[keep][None], mm_encoder_outputs={"image": fed}).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [1, -1])
def test_signals_follow_the_pixel_shuffle_and_do_not_depend_on_the_kernel(layer):
    """The [CLS] row computed from q/k equals the eager tower's attention weights summed over each shuffled 2x2 group,
    under eager AND sdpa; the shuffled hidden states of the feature layer are exactly what the projector reads."""
    pixels = _model("eager")[1](text=[PROMPT], images=[random_image(*WIDE, seed=1)])["pixel_values"]
    eager, _ = _model("eager")
    tower = eager.model.vision_tower
    with torch.no_grad():
        weights = tower(pixel_values=pixels, output_attentions=True).attentions[layer]  # [3, H, 1 + P, 1 + P]
    side = eager.config.vision_config.image_size[0] // eager.config.vision_config.patch_size[0]
    groups = shuffle_groups(eager, side)
    assert groups.shape == (T, 4) and sorted(groups.reshape(-1).tolist()) == list(range(side * side))
    expected = weights[:, :, 0, 1:][:, :, groups].sum(dim=-1)  # [3, H, T]
    index = layer % len(tower.encoder.layer)
    for attn in ("eager", "sdpa"):
        model, _ = _model(attn)
        requests = [SignalRequest(CLS_ATTENTION, index), SignalRequest(VISION_HIDDEN)]
        with torch.no_grad(), ClipProbe(model.model.vision_tower, requests, len(tower.encoder.layer) - 1) as probe:
            features = model.model.get_image_features(pixel_values=pixels).pooler_output  # [3, T, D]
        for tile, signals in enumerate(probe.per_image(drop_cls=True)):
            cls_row = shuffled_signal(CLS_ATTENTION, signals[f"{CLS_ATTENTION}@{index}"], groups)
            torch.testing.assert_close(cls_row, expected[tile], rtol=1e-5, atol=1e-6)
            hidden = shuffled_signal(VISION_HIDDEN, signals[VISION_HIDDEN], groups)  # [T, 4 Dv]
            with torch.no_grad():
                projected = model.model.multi_modal_projector(hidden)
            torch.testing.assert_close(projected, features[tile], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", [None, "image"])
def test_budget_per_tile_or_per_image(internvl, one, scope):
    """Per tile (default for FasterVLM): every grid tile and the thumbnail keep their share; per image: one pool."""
    model, _ = internvl
    handle = enable_pruning(model, "fastervlm", keep=0.25, **({"scope": scope} if scope else {}))
    with torch.no_grad():
        model(**one)
    record = handle.last.images[0]
    per_tile = torch.bincount(record.segments[record.kept], minlength=3).tolist()
    assert record.n_kept == 12
    if scope is None:
        assert per_tile == [4, 4, 4]
    else:
        assert sum(per_tile) == 12


@pytest.mark.parametrize("method", sorted(DECLINES))
def test_methods_without_a_signal_here_decline_before_touching_the_model(internvl, method):
    model, _ = internvl
    census = hook_and_attribute_census(model)
    with pytest.raises(ValueError, match=DECLINES[method]) as err:
        enable_pruning(model, method, keep=0.5)
    instead = "'divprune'" if method.startswith("holitom") else "'fastervlm'"  # HoliTom: videos only
    assert method.removesuffix("full") in str(err.value) and instead in str(err.value)
    assert hook_and_attribute_census(model) == census


@pytest.mark.parametrize("method, options, match", [
    ("no-such-method", {}, "unknown method"), ("divprune", {"keep": 0.0}, "keep"), ("divprune", {"keep": 1.5}, "keep"),
    ("hiprune", {"object_layer": 99}, "vision layer 99.*3 layers"), ("fastv", {"k": 99}, "do not exist"),
])
def test_bad_options_fail_clearly_before_the_model_is_touched(internvl, method, options, match):
    model, _ = internvl
    census = hook_and_attribute_census(model)
    with pytest.raises(ValueError, match=match):
        enable_pruning(model, method, **{"keep": 0.5, **options})
    assert hook_and_attribute_census(model) == census


def test_bad_inputs_fail_clearly_before_the_vision_tower_runs(internvl, one):
    model, _ = internvl
    calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda *a: calls.append(1))
    enable_pruning(model, "divprune", keep=0.5)
    ids = one["input_ids"]
    short = {**one, "input_ids": ids[:, 1:], "attention_mask": one["attention_mask"][:, 1:]}
    is_image = (ids == model.config.image_token_id).nonzero()[:, 1]
    torn = {**one, "input_ids": torch.cat([ids[:, : int(is_image[0])], ids[:, int(is_image[0]) + 1:]], dim=1),
            "attention_mask": one["attention_mask"][:, 1:]}
    try:
        with torch.no_grad():
            with pytest.raises(ValueError, match="not a whole number of tiles"):
                model(**torn)
            with pytest.raises(ValueError, match="3 tiles but pixel_values has 2"):
                model(**{**short, "pixel_values": one["pixel_values"][:2]})
            with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
                model(**one, vision_feature_select_strategy="full")
    finally:
        hook.remove()
    assert calls == []


def test_methods_command_lists_internvl(capsys):
    from tokenprune.cli import main

    assert main(["methods"]) == 0
    assert " internvl" in capsys.readouterr().out.splitlines()[-1]


def test_flops_preset_and_the_tiny_models_shape():
    from tokenprune.budget.flops import ModelShape, preset

    shape = preset("internvl3-8b")
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_heads, shape.num_kv_heads) == (
        3584, 18944, 28, 28, 4)
    assert shape.visual_tokens == 13 * 256
    model, _ = _model("sdpa")
    tiny = ModelShape.from_config(model.config)
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_kv_heads) == (128, 2, 2)


def test_visualize_draws_a_single_tile_image_on_its_grid():
    from tokenprune.viz import draw_kept, prune_once

    model, processor = _model("sdpa")
    square = random_image(64, 64, seed=1)
    record = prune_once(model, processor, square, PROMPT, "divprune", keep=6)
    assert record.images[0].grid == (4, 4) and draw_kept(square, record, size=128, legend=False).size[0] == 128
    assert _HANDLE_ATTR not in model.__dict__


@pytest.mark.parametrize(("method", "options"), [("divprune", {}), ("visionzip", {"keep_cls": False})])
def test_visualize_places_every_tile_in_the_picture_and_the_thumbnail_apart(method, options):
    """A 192 x 128 picture is cut into 3 x 2 tiles (row-major) + a thumbnail: the kept cells of each tile are drawn
    at that tile's place in the picture (first panel), the thumbnail's over the whole picture (second panel)."""
    from test_viz import GREY, assert_looks, centre, grey

    from tokenprune.viz import GAP, HEADER, draw_kept, prune_once

    model, processor = _model("sdpa", max_tiles=6)
    image = grey(192, 128)
    record = prune_once(model, processor, image, PROMPT, method, keep=0.25, **options)
    rec = record.images[0]
    assert rec.view == "tiles" and rec.n == 7 * T
    figure = draw_kept(image, record, size=240, legend=False)  # two 240 x 160 panels
    second, rect = 240 + GAP, (0, 0, 240, 160)
    assert figure.size[0] >= second + 240 and figure.size[1] == HEADER + 160
    side = round(T**0.5)
    boxes = []  # where each token belongs in the picture, from the processor's cutting order alone
    for i in range(rec.n):
        tile, token = divmod(i, T)
        x, y = token % side, token // side
        col, row, cols, rows = (tile % 3, tile // 3, 3, 2) if tile < 6 else (0, 0, 1, 1)
        boxes.append([(col + x / side) / cols, (row + y / side) / rows,
                      (col + (x + 1) / side) / cols, (row + (y + 1) / side) / rows])
    panel_of = lambda i: (0 if i < 6 * T else second, None)  # noqa: E731
    assert_looks(figure, dataclasses.replace(rec, boxes=torch.tensor(boxes)), panel_of, {0: rect, second: rect})
    kept, per_tile = rec.kept_mask(), []
    for tile in range(7):
        tokens = range(tile * T, (tile + 1) * T)
        drawn = [i for i in tokens if centre(figure, boxes[i], panel_of(i)[0], rect) == (GREY,) * 3]
        per_tile.append(len(drawn))
        assert len(drawn) == int(kept[tile * T:(tile + 1) * T].sum())
    assert sum(per_tile) == rec.kept.numel() and sum(n > 0 for n in per_tile) > 1
    assert _HANDLE_ATTR not in model.__dict__
