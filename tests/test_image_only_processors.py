"""The real LLaVA-OneVision and InternVL processors minus their video processor (what the lmms-eval wrappers load
without torchvision) expand prompts and preprocess images exactly as the tiny models' stand-in processors, which
every family test uses; they save and load, and refuse videos."""

import pytest
import torch

from tokenprune.integrations.image_only_processors import (
    image_only_internvl_processor,
    image_only_onevision_processor,
)
from tokenprune.tiny_internvl import named_tokenizer, tiny_internvl
from tokenprune.tiny_models import random_image
from tokenprune.tiny_onevision import tiny_onevision

# (height, width): one tile; unpadded crops / tiles plus thumbnail; a tall picture; a large one (down-scaled grid)
SIZES = [(64, 64), (56, 64), (150, 40), (128, 120)]


def _images():
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


def _same(real, tiny, keys):
    for key in keys:
        assert torch.equal(torch.as_tensor(real[key]), torch.as_tensor(tiny[key])), key


def test_onevision_real_processor_without_videos_matches_the_stand_in(tmp_path):
    model, tiny = tiny_onevision()
    cls = image_only_onevision_processor()
    cls(tiny.image_processor, tiny.tokenizer, num_image_tokens=tiny.num_image_tokens,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        vision_aspect_ratio=tiny.vision_aspect_ratio).save_pretrained(tmp_path)
    real = cls.from_pretrained(tmp_path)  # what the wrapper loads
    assert not hasattr(real, "video_processor") and real.num_image_tokens == tiny.num_image_tokens
    for image in _images():
        text = "USER : <image>\nwhat is it ? ASSISTANT :"
        _same(real(images=[image], text=text, return_tensors="pt"), tiny(text, images=[image]),
              ["input_ids", "pixel_values", "image_sizes", "batch_num_images"])
    with pytest.raises(NotImplementedError, match="torchvision"):
        real(videos=[torch.zeros(2, 3, 32, 32)], text="<video>", return_tensors="pt")


def test_internvl_real_processor_without_videos_matches_the_stand_in(tmp_path):
    _, tiny = tiny_internvl()
    cls = image_only_internvl_processor()
    cls(tiny.image_processor, named_tokenizer(tiny.tokenizer), image_seq_length=tiny.image_seq_length
        ).save_pretrained(tmp_path)
    real = cls.from_pretrained(tmp_path)
    assert not hasattr(real, "video_processor") and real.image_seq_length == tiny.image_seq_length
    text = "USER : <IMG_CONTEXT>\nwhat is it ? ASSISTANT :"
    for image in _images():
        got = real(images=[image], text=text, return_tensors="pt", max_patches=4)
        _same(got, tiny(text, images=[image]), ["input_ids", "pixel_values"])
    with pytest.raises(NotImplementedError, match="torchvision"):
        real(videos=[torch.zeros(2, 3, 64, 64)], text="<video>", return_tensors="pt")
