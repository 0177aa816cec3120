"""GPU-only, run by hand (``python -m pytest tests_gpu``): ``torch.compile`` on the static-cache path of a pruned
model gives the ids of the uncompiled run, for a vision-stage and a decoder-stage method. Skips without CUDA (the
CPU-only CI machine cannot compile the real-depth models in reasonable time)."""

import pytest
import torch

from tokenprune import disable_pruning, enable_pruning
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_compiled_static_cache_equals_eager(family, method):
    model, processor = real_depth(family)
    model = model.cuda()
    if family.startswith("qwen"):
        text = "USER : <|vision_start|><|image_pad|><|vision_end|>what is in the image ? ASSISTANT :"
        inputs = processor(text=[text], images=[random_image(84, 140, seed=1)])
    else:
        inputs = processor(images=[random_image(84, 140, seed=1)], text=["USER : <image>\nwhat ? ASSISTANT :"],
                           return_tensors="pt")
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    enable_pruning(model, method, keep=0.25)
    try:
        kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
        with torch.no_grad():
            plain = model.generate(**inputs, **kw)
            lm = model.model.language_model  # the decoder loop's hooks stay on the module, outside the graph
            lm.forward = torch.compile(lm.forward)
            compiled = model.generate(**inputs, **kw)
        assert torch.equal(compiled, plain)
    finally:
        model.model.language_model.__dict__.pop("forward", None)
        disable_pruning(model)
