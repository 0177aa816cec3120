"""The prompts of the large-image front-end: built with the model's own processor, one row each, with the LLM
prefill FLOPs they cost (:mod:`tokenprune.budget.flops`, "exact" formula, multiply-accumulates)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from tokenprune.api import pruning
from tokenprune.budget.flops import ModelShape, prefill_flops
from tokenprune.large_image import families
from tokenprune.methods.fastv import FastV


class Prompts:
    """One question about several tile images: relevance-pass inputs, the final answer, and the FLOPs so far."""

    def __init__(self, model: Any, processor: Any, question: str, template: str) -> None:
        self.model, self.processor, self.question, self.template = model, processor, question, template
        self.shape = ModelShape.from_config(model.config)
        self.prompt_length = self.visual = self.flops = 0

    def inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        """The processor's one-row inputs for ``images`` (placeholders in ``template`` order), on the model's device."""
        text = self.template.format(images=families.placeholder(self.model) * len(images), question=self.question)
        inputs = self.processor(text=text, images=images, return_tensors="pt")
        device = self.model.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def count_relevance_pass(self, inputs: dict[str, Any], layer: int) -> None:
        """A relevance pass runs the LLM layers below ``layer`` over the whole prompt (the one scoring row of
        ``layer`` is left out: it is a single query)."""
        n = int(inputs["input_ids"].shape[1])
        self.flops += prefill_flops(self.shape, [n] * layer + [0] * (self.shape.num_layers - layer))

    def everything_flops(self, visual_tokens: int) -> int:
        """The unpruned prefill of the last prompt's text with ``visual_tokens`` visual tokens."""
        text = self.prompt_length - self.visual
        return prefill_flops(self.shape, text + visual_tokens)

    def answer(
        self, images: list[Image.Image], method: Any, keep: float | int, layer: int, max_new_tokens: int,
        generate_kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, int, int]:
        """``(generated ids, visual tokens of the prompt, visual tokens kept)``; ``method="fastv"`` scores at
        ``layer`` (prunes from ``layer + 1``), ``None`` does not prune."""
        inputs = self.inputs(images)
        self.prompt_length = int(inputs["input_ids"].shape[1])
        self.visual = int((inputs["input_ids"] == families.image_token_id(self.model)).sum())
        options = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
        if method is None:
            with torch.no_grad():
                out = self.model.generate(**inputs, **options)
            self.flops += prefill_flops(self.shape, self.prompt_length)
            return out, self.visual, self.visual
        method = FastV(k=layer + 1) if method == "fastv" else method
        with pruning(self.model, method, keep=keep) as handle, torch.no_grad():
            out = self.model.generate(**inputs, **options)
        record = handle.last
        if record is None:  # nothing was pruned
            self.flops += prefill_flops(self.shape, self.prompt_length)
            return out, self.visual, self.visual
        if record.tflops_pruned is not None:
            self.flops += round(record.tflops_pruned * 1e12)
        else:  # decoder-stage records give the tokens per layer
            self.flops += prefill_flops(self.shape, list(record.tokens_per_layer))
        return out, self.visual, record.n_kept

    def decode(self, ids: torch.Tensor) -> str:
        """The generated text (the tokens after the final prompt)."""
        return self.processor.tokenizer.decode(ids[0, self.prompt_length:], skip_special_tokens=True)
