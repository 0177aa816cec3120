"""Every method on every family on quantized models: bitsandbytes 4-bit and 8-bit (its CPU backend), torch's
dynamic int8 and torchao's int8 weight-only, on real-depth tiny models (every method at its default layers) saved
with ``save_pretrained`` and reloaded quantized, as a user loads a checkpoint. Each quantized model is built once
per module.

What runs by default (within the test budget; bitsandbytes' CPU kernels are slow at tiny sizes):

* bnb 4-bit: every method on every family. The 4-bit variant differs per family so that each of nf4 / fp4, with and
  without double quantization, gets the whole method list once (the library's code path does not depend on the
  variant: the weight is packed ``uint8`` in all four; the numbers do).
* bnb 8-bit, torch's dynamic int8 and torchao's int8 weight-only: every method once, the family rotating over the
  method list (each family gets a quarter of the methods, every method one family).

``TOKENPRUNE_FULL_QUANT_MATRIX=1`` runs every method on every family in all four settings (~3x longer).
"""

import logging
import os
from typing import Any

import bitsandbytes  # noqa: F401 -- in the dev extra: a missing install fails loudly, it does not skip
import pytest
import torch
from conftest import hook_and_attribute_census
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from tokenprune import disable_pruning, enable_pruning
from tokenprune.compute_dtype import compute_dtype, compute_dtype_device
from tokenprune.methods import METHODS
from tokenprune.real_depth import real_depth
from tokenprune.tiny_models import random_image

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDER = {"llava": "<image>\n", "llava_next": "<image>\n", "qwen2_vl": QWEN_IMAGE, "qwen2_5_vl": QWEN_IMAGE,
               "qwen3_vl": QWEN_IMAGE, "qwen3_vl_moe": QWEN_IMAGE, "qwen3_5": QWEN_IMAGE, "qwen3_5_moe": QWEN_IMAGE,
               "llava_onevision": "<image>\n", "internvl": "<IMG_CONTEXT>\n", "gemma3": "<start_of_image> "}
IMAGE_SIZE = {"llava": (84, 140), "llava_next": (40, 70), "qwen2_vl": (84, 140), "qwen2_5_vl": (84, 140),
              "qwen3_vl": (96, 160), "qwen3_vl_moe": (96, 160), "qwen3_5": (96, 160), "qwen3_5_moe": (96, 160),
              "llava_onevision": (40, 70), "internvl": (64, 128), "gemma3": (60, 80)}
# (bnb_4bit_quant_type, bnb_4bit_use_double_quant) per family
FOUR_BIT = {"llava": ("nf4", False), "llava_next": ("fp4", True), "qwen2_vl": ("fp4", False),
            "qwen2_5_vl": ("nf4", True), "qwen3_vl": ("nf4", False), "qwen3_vl_moe": ("fp4", True),
            "qwen3_5": ("fp4", False), "qwen3_5_moe": ("nf4", True), "llava_onevision": ("nf4", False),
            "internvl": ("fp4", True), "gemma3": ("fp4", False)}
# Gemma3Processor takes one list of images per prompt; the other processors a flat list
NESTED_IMAGES = ("gemma3",)
# bitsandbytes' packed 4-bit CPU kernel needs a layer's output width to be a multiple of 32: Qwen3.5's Gated DeltaNet
# a/b projections (one output per value head: 4 here, 32 on Qwen3.5-9B) and the MoE shared-expert gate (1 output)
# stay in full precision on CPU, as a CPU user must load them too (the unpruned model fails otherwise).
_DELTANET_SKIP = ["lm_head", "in_proj_a", "in_proj_b", "shared_expert_gate"]
CPU_4BIT_SKIP = {"qwen3_5": _DELTANET_SKIP, "qwen3_5_moe": _DELTANET_SKIP}
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")  # the Qwen3 families: tests/test_quantized_qwen3.py
SETTINGS = ("bnb-4bit", "bnb-8bit", "int8-dynamic", "torchao-int8wo")
# keep=1.0: the prefill's logits and the first generated id; keep=0.25: two tokens (one decode step on the pruned
# cache). Short on purpose: the matrix is ~300 cases and bitsandbytes' CPU kernels are slow at tiny sizes.
SAME = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
GEN = dict(SAME, max_new_tokens=2)


def quantize(folder, family: str, setting: str) -> torch.nn.Module:
    """The model saved in ``folder`` reloaded in ``setting`` (fp32 activations, CPU)."""
    if setting == "int8-dynamic":
        full = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        return torch.ao.quantization.quantize_dynamic(full, {torch.nn.Linear}, dtype=torch.qint8).eval()
    if setting == "torchao-int8wo":  # int8 weights as a tensor subclass, fp32 activations
        full = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        quantize_(full, Int8WeightOnlyConfig())
        return full.eval()
    if setting == "bnb-8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant_type, double = FOUR_BIT[family]
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=torch.float32,
                                    llm_int8_skip_modules=CPU_4BIT_SKIP.get(family))
    return AutoModelForImageTextToText.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                       dtype=torch.float32).eval()


class Quantized:
    """A quantized model, its inputs, its unpruned generate output and its hook/attribute census."""

    def __init__(self, family: str, setting: str, folder, processor):
        self.family, self.setting = family, setting
        self.model = quantize(folder, family, setting)
        text = f"USER : {PLACEHOLDER[family]}what is in the image ? ASSISTANT :"
        extra = {} if family.startswith("qwen") else {"return_tensors": "pt"}
        image = random_image(*IMAGE_SIZE[family], seed=1)
        images = [[image]] if family in NESTED_IMAGES else [image]
        self.inputs = processor(images=images, text=[text], **extra)
        with torch.no_grad():
            self.reference = self.model.generate(**self.inputs, **SAME)  # first: lazy bnb state lands in the census
        self.census = hook_and_attribute_census(self.model)


def save_real_depth(tmp_path_factory, families: tuple[str, ...]) -> dict:
    """Per family: the folder of a saved real-depth model, its processor and the full-precision model."""
    out = {}
    for family in families:
        model, processor = real_depth(family, "sdpa")
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (folder, processor, model)
    return out


FULL = os.environ.get("TOKENPRUNE_FULL_QUANT_MATRIX", "") not in ("", "0")


def cases(families: tuple[str, ...] = FAMILIES, spread: bool = False) -> list:
    """``(family, setting), method`` pairs: see the module docstring. ``spread``: outside bnb 4-bit, every method
    once over all (setting, family) pairs rather than once per setting."""
    out = []
    others = len(SETTINGS) - 1
    for setting_index, setting in enumerate(SETTINGS):
        for family_index, family in enumerate(families):
            for method_index, method in enumerate(sorted(METHODS)):
                rotating = method_index % len(families) == family_index
                if spread:
                    slot = (setting_index - 1) * len(families) + family_index
                    rotating = method_index % (others * len(families)) == slot
                if not (FULL or setting == "bnb-4bit" or rotating):
                    continue
                out.append(pytest.param((family, setting), method, id=f"{family}-{setting}-{method}"))
    return out


def matrix_fixtures(families: tuple[str, ...]) -> tuple[Any, Any]:
    """The two fixtures of a quantized matrix over ``families`` (this file and its family files assign them to
    ``saved, quantized``): ``saved`` the real-depth models saved once per module; ``quantized`` parametrized
    (indirect) with ``(family, setting)`` and built once per run of consecutive cases of that pair (:func:`cases`
    lists them grouped). Not a module-scoped parametrized fixture: pytest keys those by each case's own parameter
    index, and one matrix case per index reordered the cases and rebuilt the model for almost every test."""
    last: dict[tuple[str, str], Quantized] = {}

    @pytest.fixture(scope="module")
    def saved(tmp_path_factory):
        yield save_real_depth(tmp_path_factory, families)
        last.clear()

    @pytest.fixture
    def quantized(request, saved) -> Quantized:
        if request.param not in last:
            last.clear()  # one quantized model alive at a time
            last[request.param] = build_quantized(request.param, saved)
        return last[request.param]

    return saved, quantized


saved, quantized = matrix_fixtures(FAMILIES)


def build_quantized(param: tuple[str, str], saved: dict) -> Quantized:
    """The :class:`Quantized` model of ``param`` = ``(family, setting)`` from ``saved``'s folder."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    family, setting = param
    folder, processor, _ = saved[family]
    return Quantized(family, setting, folder, processor)


def refused_as_at_full_precision(q: Quantized, saved, method: str) -> bool:
    """True if ``method`` refuses ``q.family`` (e.g. a [CLS]-based method on Qwen), after checking that the quantized
    model raises exactly the error the full-precision model raises; False if it runs there."""
    full = saved[q.family][2]
    try:
        enable_pruning(full, method, keep=0.25)
    except ValueError as err:
        expected = str(err)
    else:
        disable_pruning(full)
        return False
    with pytest.raises(ValueError) as err:
        enable_pruning(q.model, method, keep=0.25)
    assert str(err.value) == expected
    assert hook_and_attribute_census(q.model) == q.census
    return True


@pytest.mark.parametrize(("quantized", "method"), cases(), indirect=["quantized"])
def test_method_on_the_quantized_model(quantized, saved, method):
    """keep=1.0 is identical to the quantized model (logits, generated id); keep=0.25 generates, hands back the
    original prompt and shortens every pruned layer's KV cache; disable_pruning leaves no hook or attribute.
    One test for the three so that the cases of one quantized model run together (built once)."""
    check_method_on_quantized(quantized, saved, method)


def check_method_on_quantized(q: Quantized, saved, method: str) -> None:
    """The checks of :func:`test_method_on_the_quantized_model` (shared with tests/test_quantized_qwen3.py)."""
    if refused_as_at_full_precision(q, saved, method):
        return
    if METHODS[method].video_only:  # HoliTom on a family with videos: this image prompt is declined at the call
        messages = []
        for model in (saved[q.family][2], q.model):
            enable_pruning(model, method, keep=0.25)
            try:
                with pytest.raises(ValueError, match="video") as err, torch.no_grad():
                    model(**q.inputs)
                messages.append(str(err.value))
            finally:
                disable_pruning(model)
        assert messages[0] == messages[1]
        assert hook_and_attribute_census(q.model) == q.census
        return
    enable_pruning(q.model, method, keep=1.0)
    try:
        with torch.no_grad():
            same = q.model.generate(**q.inputs, **SAME)
    finally:
        disable_pruning(q.model)
    assert torch.equal(same.sequences, q.reference.sequences)
    assert torch.equal(same.logits[0], q.reference.logits[0]), f"{method} keep=1.0: logits differ"

    handle = enable_pruning(q.model, method, keep=0.25)
    try:
        with torch.no_grad():
            out = q.model.generate(**q.inputs, **GEN)
    finally:
        assert disable_pruning(q.model) is True
    prompt = q.inputs["input_ids"]
    record = handle.last
    assert torch.equal(out.sequences[:, : prompt.shape[1]], prompt)  # the original prompt comes back
    assert out.sequences.shape[1] == prompt.shape[1] + GEN["max_new_tokens"]
    assert torch.isfinite(torch.stack(out.logits)).all()
    assert record.n_kept < record.n_visual and record.seq_len_after < prompt.shape[1]
    # every attention layer's cache holds the prompt that layer processed (shorter from the pruning layer on) and the
    # new tokens but the last (no key/value computed for it yet); Qwen3.5's linear-attention layers hold a fixed-size
    # recurrent and conv state instead (no length)
    layers = out.past_key_values.layers
    per_layer = record.tokens_per_layer or [record.seq_len_after] * len(layers)
    lengths = {i: layer.get_seq_length() for i, layer in enumerate(layers) if hasattr(layer, "get_seq_length")}
    assert lengths == {i: per_layer[i] + GEN["max_new_tokens"] - 1 for i in lengths}
    assert lengths[max(lengths)] < prompt.shape[1]
    assert hook_and_attribute_census(q.model) == q.census


def test_compute_dtype_comes_from_activations_not_from_quantized_weights(saved):
    """4-bit weights are uint8 and a dynamic int8 Linear holds no parameter: the helper still answers float32."""
    folder = saved["llava"][0]
    for setting in ("bnb-4bit", "int8-dynamic"):
        projector = quantize(folder, "llava", setting).model.multi_modal_projector
        weights = [p.dtype for p in projector.parameters()]
        assert setting != "bnb-4bit" or torch.uint8 in weights
        assert setting != "int8-dynamic" or not weights
        assert compute_dtype(projector) == torch.float32
        half = torch.zeros(2, dtype=torch.float16)
        assert compute_dtype_device(projector, None, half) == (torch.float16, half.device)
