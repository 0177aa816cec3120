"""Run pruned prefills and draw them: one method at one budget, or a methods x budgets grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tokenprune.api import _adapter_class, list_methods, pruning
from tokenprune.budget import Keep
from tokenprune.compute_dtype import compute_dtype_device
from tokenprune.methods import make_method
from tokenprune.record import PruneRecord
from tokenprune.viz.overlay import draw_kept, image_record, legend_items, tile

QUESTION = "What is in the image?"
FALLBACK_PROMPT = "USER : <image>\nwhat is in the image ? ASSISTANT :"  # LLaVA-1.5's format, tiny-model vocabulary


def default_prompt(processor: Any) -> str:
    """The processor's chat template around one image and :data:`QUESTION`, or LLaVA-1.5's plain format."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return FALLBACK_PROMPT


def prune_once(
    model: torch.nn.Module, processor: Any, image: Image.Image, prompt: str | None = None,
    method: str = "divprune", keep: Keep = 0.11, **options: Any,
) -> PruneRecord:
    """One pruned prefill of ``prompt`` on ``image``; returns its record (``handle.last``). The model is left as it
    was (an earlier ``enable_pruning`` included)."""
    inputs = processor(images=image, text=prompt or default_prompt(processor), return_tensors="pt")
    dtype, device = compute_dtype_device(model)
    inputs = inputs.to(device)
    for name, value in inputs.items():
        if torch.is_floating_point(value):
            inputs[name] = value.to(dtype)
    with pruning(model, method, keep, **options) as handle, torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    if handle.last is None:
        raise RuntimeError("the prefill pruned nothing: does the prompt contain the model's image placeholder?")
    return handle.last


def runnable_methods(model: torch.nn.Module) -> list[str]:
    """The registered methods this model's adapter accepts (e.g. ``fastervlm`` needs a [CLS] token)."""
    adapter = _adapter_class(model)  # unsupported model type: a ValueError listing the supported ones
    names = []
    for name in list_methods():
        try:
            adapter(model, make_method(name), 1.0, None)  # validates method vs model; installs nothing
        except (ValueError, NotImplementedError):  # [CLS]-only on Qwen, decoder-stage methods, FlowCut off LLaVA
            continue
        names.append(name)
    return names


def keep_label(keep: Keep) -> str:
    return f"keep={keep}" if isinstance(keep, float) else f"keep={keep} tokens"


def compare(
    model: torch.nn.Module, processor: Any, image: Image.Image, prompt: str | None = None,
    methods: Sequence[str] | None = None, keeps: Sequence[Keep] = (0.25, 0.11, 0.05), *,
    image_index: int = 0, size: int = 224, save: str | Path | None = None,
) -> Image.Image:
    """A grid of overlays: rows = ``methods`` (default: every registered method that runs on the model),
    columns = budgets ``keeps``. Returns the figure; ``save`` also writes it as PNG."""
    methods = list(methods) if methods is not None else runnable_methods(model)
    if not methods or not keeps:
        raise ValueError(f"compare needs at least one method and one budget; got methods={methods}, keeps={keeps}")
    cells, legend, n = {}, {}, 0
    for method in methods:
        for keep in keeps:
            record = prune_once(model, processor, image, prompt, method, keep)
            rec = image_record(record, image_index)
            n = rec.n
            legend.update(legend_items(rec, image))  # label -> colour, in first-seen order
            cells[(method, keep_label(keep))] = draw_kept(
                image, record, image_index=image_index, size=size, title="", legend=False
            )
    title = f"kept visual tokens of {n} per image; rows = methods, columns = budgets"
    figure = tile(cells, methods, [keep_label(k) for k in keeps], title=title, legend=list(legend.items()))
    if save is not None:
        figure.save(save, format="PNG")
    return figure


def load(model_path: str | None = None, device: str | None = None) -> tuple[torch.nn.Module, Any]:
    """``(model, processor)``: ``from_pretrained(model_path)`` through the transformers Auto classes (without
    torchvision, LLaVA-OneVision and InternVL get their real processor minus the video processor), or the
    project's trained small LLaVA-1.5-architecture model (``tokenprune.tiny_models.trained_llava``: 256 tokens per
    image, trained on synthetic scenes of coloured shapes) when ``model_path`` is None."""
    if model_path is None:
        from tokenprune.tiny_models import trained_llava

        return trained_llava()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tokenprune.integrations.image_only_processors import IMAGE_ONLY_BY_MODEL_TYPE, torchvision_importable

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device).eval()
    image_only = IMAGE_ONLY_BY_MODEL_TYPE.get(model.config.model_type)
    if image_only is not None and not torchvision_importable():  # AutoProcessor needs torchvision for these
        return model, image_only().from_pretrained(model_path)
    return model, AutoProcessor.from_pretrained(model_path)
