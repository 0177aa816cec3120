"""What the LLaVA-OneVision test files share (tests/test_llava_onevision.py: the vision stage;
tests/test_llava_onevision_layout.py: the packing and the overlay; tests/test_llava_onevision_decoder.py: the decoder
stage and the real depth): the prompts, an image and a video in one prompt, which methods run or decline, and the
tiny tower's options."""

from conftest import runnable_methods

from tokenprune import enable_pruning
from tokenprune.api import _HANDLE_ATTR
from tokenprune.tiny_models import random_image
from tokenprune.tiny_onevision import random_video_ov

PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
OTHER = "USER : <image>\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
TWO = "USER : <image>\n<image>\nhow many dog are there ? ASSISTANT :"
BOTH = "USER : <image> what is in the image ? <video> what is the dog doing ? ASSISTANT :"  # two visual runs
GEN = dict(max_new_tokens=4, do_sample=False)
OPTIONS = {"hiprune": {"object_layer": 0}}  # the tiny tower has 3 layers; HiPrune's paper layer is deeper
# Methods that decline on LLaVA-OneVision, and the words their error must contain (a new decline fails the test).
DECLINES = {
    "fastervlm": r"\[CLS\].*'hiprune'", "fopru": r"\[CLS\].*'hiprune'",
    "recoverable": r"\[CLS\].*'cdpruner'", "visionzip": r"\[CLS\].*'visiondrop'", "flowcut": r"\[CLS\].*'divprune'",
}
METHODS = [m for m in runnable_methods("llava_onevision") if m not in DECLINES]


def both(processor, size=(120, 120), seed=1):
    """An image (120x120: 4x4 crops, down-scaled 16x16 -> 12x12: 16 + 144 + 12 newlines = 172 tokens) and a
    3-frame video (3 x 2x2 pooled + 1 newline = 13 tokens) in one prompt."""
    return processor(text=[BOTH], images=[random_image(*size, seed=seed)], videos=[random_video_ov(3, seed=seed)])


def enable(model, method, keep, **kwargs):
    """``enable_pruning`` with the tiny tower's :data:`OPTIONS`."""
    return enable_pruning(model, method, keep=keep, **OPTIONS.get(method, {}), **kwargs)


def adapter(model):
    """The active pruning handle's adapter (its layout and packing)."""
    return getattr(model, _HANDLE_ATTR)._adapter
