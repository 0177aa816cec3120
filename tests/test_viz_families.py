"""Overlays from the real LLaVA-NeXT and Qwen adapters: the drawn cells are exactly the kept tokens."""

import pytest
from test_viz import assert_looks, grey

from tokenprune.tiny_models import tiny_llava_next, tiny_qwen
from tokenprune.viz import GAP, HEADER, draw_kept, prune_once

NEXT_PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
QWEN_PROMPT = "USER : <|vision_start|><|image_pad|><|vision_end|>what is in the image ? ASSISTANT :"


@pytest.mark.parametrize("method", ["fastervlm", "divprune", "visionzip"])
def test_llava_next_panels_from_the_adapter(method):
    model, processor = tiny_llava_next()
    image = grey(140, 80)  # 40x70-like aspect: base tile + unpadded 2x2 crops, 4 rows of 8 plus newlines
    record = prune_once(model, processor, image, NEXT_PROMPT, method, keep=0.25)
    rec = record.images[0]
    assert rec.view == "image" and rec.segments is not None and bool(rec.boxes[:, 0].isnan().any())
    figure = draw_kept(image, record, size=280, legend=False)  # two 280x160 panels
    assert figure.size == (2 * 280 + GAP, HEADER + 160)
    rect = (0, 0, 280, 160)
    assert_looks(figure, rec, lambda i: (0 if int(rec.segments[i]) == 0 else 280 + GAP, None),
                 {0: rect, 280 + GAP: rect})


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method", ["divprune", "visiondrop"])
def test_qwen_merged_grid_from_the_adapter(version, method):
    model, processor = tiny_qwen(version)
    image = grey(140, 84)  # 3 x 5 merged tokens
    record = prune_once(model, processor, image, QWEN_PROMPT, method, keep=6)
    rec = record.images[0]
    assert rec.grid == (3, 5) and rec.view == "image"
    figure = draw_kept(image, record, size=280, legend=False)  # one 280x168 panel
    assert figure.size == (280, HEADER + 168)
    assert_looks(figure, rec, lambda i: (0, None), {0: (0, 0, 280, 168)})
    if method == "visiondrop":
        assert rec.n_merged > 0 and int((rec.merged >= 0).sum()) > 0
