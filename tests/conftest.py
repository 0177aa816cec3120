import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tokenprune import enable_pruning  # noqa: E402
from tokenprune.tiny_models import random_image, tiny_llava  # noqa: E402

PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
OTHER_PROMPT = "USER : <image>\ndescribe a red circle and a blue square left of the dog ? ASSISTANT :"
TWO_IMAGES = "USER : <image>\n<image>\nhow many dog are there ? ASSISTANT :"
# The tiny vision towers have 2-3 layers: methods whose official layer lies deeper are pointed at an existing one.
TINY_OPTIONS = {"hiprune": {"object_layer": 0}}


def runnable_methods():
    """Registered VISION-stage methods an adapter can run (FlowCut is registered but says why it cannot run yet);
    decoder-stage methods: ``decoder_methods()`` (tests/test_decoder*.py)."""
    from tokenprune.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if not cls.unavailable and cls.stage == "vision")


def decoder_methods():
    """Registered decoder-stage (in-LLM) methods."""
    from tokenprune.methods import METHODS

    return sorted(name for name, cls in METHODS.items() if cls.stage == "decoder")


torch.set_num_threads(2)


@pytest.fixture(params=["eager", "sdpa"])
def attn(request):
    return request.param


@pytest.fixture
def llava(attn):
    return tiny_llava(attn_implementation=attn)


def encode(processor, prompts, images):
    """Processor output for a batch (left padding), images in prompt order."""
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.fixture
def one_prompt(llava):
    _, processor = llava
    return encode(processor, [PROMPT], [random_image(80, 96, seed=1)])


# Spans hold merged rows (or a data-dependent count): oracle in tests/test_methods_vision.py.
MERGING = {"visionzip", "visiondrop", "recoverable"}


def enable(model, method, keep, **kwargs):
    return enable_pruning(model, method, keep=keep, **TINY_OPTIONS.get(method, {}), **kwargs)
