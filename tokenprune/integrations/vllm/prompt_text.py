"""The prompt's text for prompt-dependent methods (CDPruner, MMTok): carried from vLLM's processor to the model.

vLLM runs the vision encoder without the prompt. The processor does see it, so for a method that needs
``text_embeddings`` it attaches to each image item one extra field, :data:`TEXT_FIELD`: the ids of the prompt's text
tokens after that image (the definition of ``TEXT_EMBEDDINGS`` in ``tokenprune/methods/base.py``), which the model
embeds with the language model's own embedding table inside ``embed_multimodal``. The item's hash (vLLM's key for
its processor, encoder and prefix caches) is salted with those ids, so the same image under two prompts is two
items: a pruned image computed for one question is never reused for another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

TEXT_FIELD = "tokenprune_text_ids"


def text_after_images(prompt: Sequence[int], n_images: int, image_token_id: int,
                      placeholder_ids: Sequence[int]) -> list[list[int]]:
    """Per image of ``prompt`` (token ids, placeholders unexpanded: one ``image_token_id`` per image, or expanded
    runs), the ids of the text tokens after it: every token that is not a placeholder (``placeholder_ids``) and
    comes after the image's last placeholder; every text token of the prompt if none follows."""
    ids = list(prompt)
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(at) == n_images:
        ends = at
    else:  # already expanded: one run of placeholders per image
        ends = [i for i in at if i + 1 == len(ids) or ids[i + 1] != image_token_id]
        if len(ends) != n_images:
            raise ValueError(
                f"the prompt has {len(at)} image placeholder token(s) in {len(ends)} run(s) for {n_images} image(s); "
                f"expected one placeholder (or one run) per image"
            )
    placeholders = set(placeholder_ids)
    text = [(i, t) for i, t in enumerate(ids) if t not in placeholders]
    out = []
    for end in ends:
        after = [t for i, t in text if i > end]
        out.append(after if after else [t for _, t in text])
    return out


def salted_hash(item_hash: str, text_ids: Sequence[int]) -> str:
    """The item's hash made specific to the text it is pruned for."""
    digest = hashlib.sha256(f"{item_hash}|{','.join(map(str, text_ids))}".encode()).hexdigest()
    return f"{item_hash}-tokenprune-{digest[:32]}"


class PromptTextProcessor:
    """Mixed in before a vLLM multimodal processor: salts image hashes with, and attaches, the text after each image
    when the configured method needs ``text_embeddings`` (``self._tokenprune_text()`` says which ids count as
    placeholders, or None when the method does not need text)."""

    def _tokenprune_text(self) -> tuple[int, tuple[int, ...]] | None:
        raise NotImplementedError

    def _texts(self, inputs) -> list[list[int]] | None:
        spec = self._tokenprune_text()
        items = inputs.mm_data_items
        if spec is None or "image" not in items:
            return None
        image_token_id, placeholders = spec
        return text_after_images(self._tokenprune_prompt(list(inputs.prompt)), items.get_count("image", strict=False),
                                 image_token_id, placeholders)

    def _tokenprune_prompt(self, prompt: list[int]) -> list[int]:
        """The prompt's ids as the Hugging Face processor writes them around each image, where that differs from
        the raw prompt (text the processor adds next to an image is text to ``enable_pruning``)."""
        return prompt

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        texts = self._texts(inputs)
        if texts is not None:
            hashes = dict(hashes)
            hashes["image"] = [salted_hash(h, t) for h, t in zip(hashes["image"], texts, strict=True)]
        return hashes

    def _cached_apply_hf_processor(self, inputs, timing_ctx):
        from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem

        result = super()._cached_apply_hf_processor(inputs, timing_ctx)
        texts = self._texts(inputs)
        if texts is not None:
            field = MultiModalBatchedField(keep_on_cpu=True)
            for item, text in zip(result.kwargs["image"], texts, strict=True):
                if item is not None:  # None: cached in the engine, with this field (the hash includes the text)
                    item[TEXT_FIELD] = MultiModalFieldElem(data=torch.tensor(text, dtype=torch.long), field=field)
        return result


def check_cache_type(vllm_config) -> None:
    """Refuse vLLM's shared-memory processor cache for prompt-dependent methods: it serializes an item before the
    text field is attached, so a cache hit would come back without it."""
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and getattr(mm_config, "mm_processor_cache_type", None) == "shm":
        raise ValueError(
            "tokenprune's prompt-dependent methods attach the prompt text to each image item, which vLLM's "
            "shared-memory processor cache (mm_processor_cache_type='shm') drops; use the default 'lru' cache"
        )


class PromptTextModel:
    """Mixed in before a vLLM model: holds :data:`TEXT_FIELD` of the current encoder call and embeds the text
    after image ``item`` with the language model's own embedding table, for a method that needs it."""

    _text_ids: list[torch.Tensor] | None = None

    def embed_multimodal(self, **kwargs: object):
        text = kwargs.pop(TEXT_FIELD, None)
        self._text_ids = None if text is None else list(text)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._text_ids = None

    def _text_signals(self, item: int, device: torch.device, cls_token: bool) -> dict[str, torch.Tensor]:
        """``{TEXT_EMBEDDINGS: [M, D]}`` for image ``item`` of this call, or ``{}`` when the method needs no text."""
        from tokenprune.methods import TEXT_EMBEDDINGS

        if TEXT_EMBEDDINGS not in self.tokenprune.method.signals_needed(cls_token=cls_token):
            return {}
        if self._text_ids is None:
            raise RuntimeError(f"{self.tokenprune.method.name} needs the prompt text; the processor did not attach "
                               f"it ({TEXT_FIELD})")
        ids = self._text_ids[item].reshape(-1).to(device)
        return {TEXT_EMBEDDINGS: self.get_language_model().embed_input_ids(ids)}
