"""The models a benchmark runs: a real checkpoint, or a real-shape preset with random weights (no download).

A preset builds the real transformers class with the checkpoint's shapes (LLaVA-1.5: CLIP ViT-L/14-336 vision
tower, 2-layer GELU projector, Vicuna LLM) and optionally fewer LLM layers (``layers``) or vision layers
(``vision_layers``) so that it fits a CPU; timings then cover the model as built, which the report states.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenprune.budget.flops import PRESETS, ModelShape
from tokenprune.compute_dtype import compute_device, compute_dtype
from tokenprune.quantization import describe
from tokenprune.tiny_models import DEMO, TINY, LlavaSize, demo_image, tiny_llava

PRESET_PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"
CHECKPOINT_QUESTION = "What is shown in this image?"

# CLIP ViT-L/14 at 336 px, the vision tower of LLaVA-1.5 (and of LLaVA-NeXT's crops).
CLIP_L_336 = {"hidden": 1024, "intermediate": 4096, "layers": 24, "heads": 16, "image_size": 336, "patch_size": 14}
LLAVA_PRESETS = ("llava-1.5-7b", "llava-1.5-13b")
SMALL = {"tiny": TINY, "demo": DEMO}


@dataclass
class BenchModel:
    """A model, its processor and what to feed it, plus a description of what was built."""

    model: torch.nn.Module
    processor: Any
    inputs: dict[str, Any]
    description: str
    shape: ModelShape  # the LLM as built (layers included)

    @property
    def device(self) -> torch.device:
        return compute_device(self.model)


def llava_preset(name: str, layers: int | None, vision_layers: int | None, dtype: torch.dtype,
                 attn_implementation: str, width_divisor: int = 1) -> tuple[torch.nn.Module, Any]:
    """A LLaVA-1.5 model with the checkpoint's shapes and random weights, built directly in ``dtype``.

    ``width_divisor`` narrows the LLM (hidden, MLP and head count divided, head dim kept): every per-token cost of
    a layer then shrinks by the same factor squared, so ratios such as "selection cost / pruned prefill" keep their
    full-width value while all ``layers`` fit a CPU."""
    llm = PRESETS[name]
    div = int(width_divisor)
    if div < 1 or llm.num_heads % div or llm.num_kv_heads % div:
        raise ValueError(f"width_divisor must divide the head counts ({llm.num_heads} heads, {llm.num_kv_heads} KV "
                         f"heads) of {name}; got {width_divisor!r}")
    v = CLIP_L_336
    size = LlavaSize(
        image_size=v["image_size"], patch_size=v["patch_size"], vision_hidden=v["hidden"],
        vision_intermediate=v["intermediate"], vision_layers=vision_layers or v["layers"], vision_heads=v["heads"],
        projection_dim=768, text_hidden=llm.hidden_size // div, text_intermediate=llm.intermediate_size // div,
        text_layers=layers or llm.num_layers, text_heads=llm.num_heads // div, text_kv_heads=llm.num_kv_heads // div,
        text_head_dim=llm.hidden_size // llm.num_heads, vocab_size=32064,
    )
    return tiny_llava(size, attn_implementation, seed=0, dtype=dtype)


def checkpoint(path: str, dtype: torch.dtype, attn_implementation: str, device: str,
               quantization_config: Any = None) -> tuple[torch.nn.Module, Any]:
    """A checkpoint directory via ``from_pretrained`` (quantized on ``device`` when ``quantization_config`` is a
    ``BitsAndBytesConfig``) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if quantization_config is not None:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, quantization_config=quantization_config,
            device_map=device)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
        model = model.to(device)
    return model.eval(), AutoProcessor.from_pretrained(path)


def reload_quantized(model: torch.nn.Module, quantization_config: Any, attn_implementation: str,
                     device: str) -> torch.nn.Module:
    """A built (random-weight) preset saved with ``save_pretrained`` and loaded back quantized, as a user loads a
    checkpoint: bitsandbytes quantizes at load time only."""
    import tempfile

    from transformers import AutoModelForImageTextToText

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return AutoModelForImageTextToText.from_pretrained(
            folder, dtype=compute_dtype(model), attn_implementation=attn_implementation,
            quantization_config=quantization_config, device_map=device).eval()


def checkpoint_prompt(processor: Any, question: str) -> str:
    """The checkpoint's chat template around one image and ``question`` (LLaVA-1.5 style if it has none)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def load(model: str, *, layers: int | None = None, vision_layers: int | None = None, dtype: str = "float32",
         attn_implementation: str = "sdpa", device: str = "cpu", prompt: str | None = None,
         image_size: int | None = None, width_divisor: int = 1, quantization_config: Any = None) -> BenchModel:
    """A :class:`BenchModel` for a preset name (``tiny``, ``demo``, ``llava-1.5-7b``, ``llava-1.5-13b``) or a
    checkpoint directory, with one prompt and one generated image (``image_size`` px, default the model's);
    loaded quantized when ``quantization_config`` (a ``BitsAndBytesConfig``) is given."""
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if width_divisor != 1 and model not in LLAVA_PRESETS:
        raise ValueError(f"width_divisor applies to the presets {', '.join(LLAVA_PRESETS)}; got model {model!r}")
    if model in SMALL:
        size: LlavaSize = SMALL[model]
        if layers or vision_layers:
            from dataclasses import replace

            size = replace(size, text_layers=layers or size.text_layers,
                           vision_layers=vision_layers or size.vision_layers)
        net, processor = tiny_llava(size, attn_implementation=attn_implementation)
        net = net.to(device=device, dtype=torch_dtype)
        what = f"{model} LLaVA-1.5-architecture model, random weights ({_depths(net)})"
    elif model in LLAVA_PRESETS:
        net, processor = llava_preset(model, layers, vision_layers, torch_dtype, attn_implementation, width_divisor)
        net = net.to(device)
        what = f"{model} shapes, random weights ({_depths(net)})"
    elif model in PRESETS:
        raise ValueError(
            f"bench builds random-weight models for the presets {', '.join(list(SMALL) + list(LLAVA_PRESETS))}; "
            f"for {model!r} pass a checkpoint directory (its shapes are in `tokenprune flops --model {model}`)"
        )
    elif Path(model).exists():
        net, processor = checkpoint(model, torch_dtype, attn_implementation, device, quantization_config)
        what = f"checkpoint {model} ({_depths(net)})"
    else:
        raise ValueError(f"--model must be a preset ({', '.join(list(SMALL) + list(LLAVA_PRESETS))}) or an "
                         f"existing checkpoint directory; got {model!r}")
    if quantization_config is not None:
        if not Path(model).exists():
            net = reload_quantized(net, quantization_config, attn_implementation, device)
        what += f", {describe(quantization_config)}"
    if prompt is None:
        prompt = PRESET_PROMPT if model in SMALL or model in LLAVA_PRESETS else checkpoint_prompt(
            processor, CHECKPOINT_QUESTION)
    side = image_size or getattr(getattr(net.config, "vision_config", None), "image_size", 336)
    inputs = processor(images=[demo_image(side)], text=[prompt], return_tensors="pt").to(device)
    inputs = {k: (v.to(torch_dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
    what += f", {dtype}, {attn_implementation}, {device}"
    return BenchModel(net, processor, inputs, what, ModelShape.from_config(net.config, name=model))


def _depths(model: torch.nn.Module) -> str:
    text = model.config.get_text_config()
    vision = getattr(model.config, "vision_config", None)
    v_layers = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth", "?")
    return (f"LLM {text.num_hidden_layers} layers x d={text.hidden_size}/m={text.intermediate_size}, "
            f"vision {v_layers} layers")
