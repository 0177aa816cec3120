"""GPU-only: every method on real quantized checkpoints whose kernels exist only on CUDA (AWQ, GPTQ, FP8) and on
bitsandbytes 4-bit on the GPU. Not collected by ``make test`` (``testpaths = ["tests"]``); a person with a GPU and
the hub runs it:

    pip install -e ".[dev]"            # torch with CUDA, transformers, bitsandbytes
    pip install autoawq gptqmodel optimum   # AWQ / GPTQ kernels (whichever the checkpoints below need)
    pytest tests_gpu -x -q

Which checkpoints: ``TOKENPRUNE_GPU_CHECKPOINTS`` (comma list of ``kind=repo_or_path``) overrides :data:`DEFAULTS`;
``kind`` is ``awq``, ``gptq``, ``fp8`` (transformers' ``FineGrainedFP8Config`` applied at load; compute capability
8.9+) or ``bnb4`` (bitsandbytes nf4). The same three properties as ``tests/test_quantized.py`` on CPU: ``keep=1.0``
generates exactly what the quantized model generates, ``keep=0.25`` generates with a shorter KV cache,
``disable_pruning`` leaves no hook or attribute.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (AWQ / GPTQ / FP8 kernels)", allow_module_level=True)

from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from tokenprune import disable_pruning, enable_pruning  # noqa: E402
from tokenprune.methods import METHODS  # noqa: E402
from tokenprune.tiny_models import demo_image  # noqa: E402

DEFAULTS = {
    "awq": "Qwen/Qwen2.5-VL-7B-Instruct-AWQ",
    "gptq": "Qwen/Qwen2-VL-7B-Instruct-GPTQ-Int4",
    "fp8": "llava-hf/llava-1.5-7b-hf",
    "bnb4": "llava-hf/llava-v1.6-mistral-7b-hf",
}
GEN = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True)


def checkpoints() -> dict[str, str]:
    given = os.environ.get("TOKENPRUNE_GPU_CHECKPOINTS")
    if not given:
        return DEFAULTS
    return dict(item.split("=", 1) for item in given.split(",") if item.strip())


def load(kind: str, repo: str):
    extra = {}
    if kind == "fp8":
        from transformers import FineGrainedFP8Config

        extra["quantization_config"] = FineGrainedFP8Config()
    elif kind == "bnb4":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForImageTextToText.from_pretrained(repo, dtype=torch.bfloat16, device_map="cuda", **extra)
    return model.eval(), AutoProcessor.from_pretrained(repo)


def prompt_inputs(model, processor, image: Image.Image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[image], text=[text], return_tensors="pt").to(model.device)


@pytest.fixture(scope="module", params=sorted(checkpoints().items()), ids=lambda item: item[0])
def quantized(request):
    kind, repo = request.param
    model, processor = load(kind, repo)
    inputs = prompt_inputs(model, processor, demo_image(448))
    with torch.no_grad():
        reference = model.generate(**inputs, **GEN).sequences
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return model, inputs, reference, hooks, set(model.__dict__)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_a_gpu_quantized_checkpoint(quantized, method):
    model, inputs, reference, hooks, attributes = quantized
    try:
        enable_pruning(model, method, keep=1.0)
    except ValueError as err:  # e.g. a [CLS]-based method on Qwen: a clear refusal, as at full precision
        assert "cannot" in str(err) or "needs" in str(err), err
        return
    try:
        with torch.no_grad():
            same = model.generate(**inputs, **GEN).sequences
    finally:
        disable_pruning(model)
    assert torch.equal(same, reference)
    handle = enable_pruning(model, method, keep=0.25)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, **GEN)
    finally:
        disable_pruning(model)
    record = handle.last
    assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert record.seq_len_after < record.seq_len_before
    assert out.past_key_values.layers[-1].get_seq_length() < inputs["input_ids"].shape[1]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert set(model.__dict__) == attributes
