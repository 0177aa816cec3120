"""LLaVA-OneVision's layout on a tiny model: the adapter packs per-tile features exactly as transformers does
(unpadding, bilinear down-scaling, newline slots, videos pooled per frame), and the overlay draws each kept token at
its place. The methods: tests/test_llava_onevision.py."""

import pytest
import torch
from conftest import built, left_clean
from onevision_cases import PROMPT, TWO, adapter

from tokenprune import pruning
from tokenprune.tiny_models import random_image
from tokenprune.tiny_onevision import random_video_ov, tiny_onevision

_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _feature_layer(model, pixels):
    """``hidden_states[-1]`` of the tower (the feature layer; ``last_hidden_state`` has SigLIP's post-norm too)."""
    return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("size, rows", [((40, 70), 1), ((120, 120), 1), ((32, 32), 1), ((20, 90), 1), ((40, 70), 2)])
def test_packing_reproduces_the_models_own_features(size, rows):
    """Per-tile projector outputs packed by the adapter (unpadding, bilinear down-scaling, the base tile alone in a
    row with two images) are the model's own packed features; newline slots are where the layout says."""
    model, processor = built(_MODELS, "sdpa", lambda: tiny_onevision("sdpa"))
    images = [random_image(*size, seed=1)] * rows
    inputs = processor(text=[PROMPT if rows == 1 else TWO], images=images)
    with pruning(model, "random", keep=1.0):
        ad = adapter(model)
        n_tiles = ad.tower_rows(inputs, rows)
        with torch.no_grad():
            packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                    batch_num_images=inputs["batch_num_images"]).pooler_output
            tiles = model.model.multi_modal_projector(
                _feature_layer(model, inputs["pixel_values"][0, : n_tiles[0]])
            )
        layout = ad.layout(size, n_tiles[0])
        mine = ad.pack(layout, list(tiles))
    assert packed[0].shape[0] == layout.crop.numel()
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == sum(p.shape[0] for p in packed)
    newline = layout.newline
    torch.testing.assert_close(mine[~newline], packed[0][~newline], rtol=1e-5, atol=1e-5)
    assert torch.allclose(packed[0][newline], model.model.image_newline.expand(int(newline.sum()), -1))
    if size == (120, 120):
        assert layout.resized == (12, 12) and packed[0].shape[0] == 16 + 12 * 13
        assert torch.bincount(layout.crop[~newline]).tolist() == [16] + [9] * 16  # 3x3 resized tokens per crop


def test_video_packing_pools_each_frame_and_ends_with_one_newline():
    model, processor = built(_MODELS, "sdpa", lambda: tiny_onevision("sdpa"))
    video = random_video_ov(3, seed=2)
    with pruning(model, "random", keep=1.0):
        ad = adapter(model)
        with torch.no_grad():
            packed = model.model.get_video_features(video[None]).pooler_output[0]
            tiles = model.model.multi_modal_projector(_feature_layer(model, video))
        layout = ad.video_layout(3)
        mine = ad.pack(layout, list(tiles))
    assert packed.shape[0] == layout.crop.numel() == 13 and layout.crop.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [-1]
    torch.testing.assert_close(mine[:-1], packed[:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(120, 120), (40, 70)])  # down-scaled 12x12 grid; unpadded 2x3 crops
def test_visualize_draws_exactly_the_kept_tokens_of_a_onevision_record(size):
    from test_viz import assert_looks, grey

    from tokenprune.viz import GAP, HEADER, draw_kept, prune_once

    model, processor = built(_MODELS, "sdpa", lambda: tiny_onevision("sdpa"))
    image = grey(size[1], size[0])
    record = prune_once(model, processor, image, PROMPT, "divprune", keep=0.25)
    rec = record.images[0]
    assert rec.view == "image" and bool(rec.boxes[:, 0].isnan().any())  # newline tokens have no place
    panel = (280, round(280 * size[0] / size[1]))
    figure = draw_kept(image, record, size=280, legend=False)  # base tile and high-resolution panels
    second = 280 + GAP  # (a long caption may widen the figure beyond the second panel)
    assert figure.size[0] >= second + 280 and figure.size[1] == HEADER + panel[1]
    rect = (0, 0, *panel)
    assert_looks(figure, rec, lambda i: (0 if int(rec.segments[i]) == 0 else second, None), {0: rect, second: rect})
    assert left_clean(model)
