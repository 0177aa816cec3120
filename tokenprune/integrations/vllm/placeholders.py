"""What vLLM's multimodal processors reserve for a pruned image: its placeholder run cut to the kept count, and the
refusal of a request whose image comes as precomputed embeddings when the method reads the vision tower."""

from __future__ import annotations

from tokenprune.integrations.vllm.options import VllmPruning, check_embeddings


def pruned_prompt_updates(updates, pruning: VllmPruning | None, only_embeddings_of=None) -> list:
    """The processor's prompt replacements with each image's placeholder run cut to its kept count (``pruning``
    None: unchanged). ``only_embeddings_of``: the request's items; cut only when its images are embeddings (LLaVA,
    whose pixel images already get the kept count from ``get_num_image_tokens``)."""
    from vllm.multimodal.processing import PromptReplacement

    if pruning is None or pruning.keeps_all:
        return list(updates)
    if only_embeddings_of is not None and not image_embeddings(only_embeddings_of):
        return list(updates)
    out = []
    for update in updates:
        if update.modality == "image":
            def replacement(item_idx: int, original=update.replacement):
                tokens = original(item_idx)
                return tokens[: pruning.kept(len(tokens))]
            update = PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)
        out.append(update)
    return out


def image_embeddings(mm_items) -> bool:
    """Whether the request's images are precomputed embeddings (``image_embeds``) rather than pixels."""
    from vllm.multimodal.parse import DictEmbeddingItems, EmbeddingItems

    return isinstance(mm_items.get("image"), (EmbeddingItems, DictEmbeddingItems))  # Qwen: a dict with the grid


def check_embedding_request(pruning: VllmPruning | None, mm_items, cls_token: bool) -> None:
    """Refuse (when the request is processed, before it reaches the engine) image embeddings for a method that
    needs signals from inside the vision tower."""
    if pruning is not None and not pruning.keeps_all and image_embeddings(mm_items):
        check_embeddings(pruning, cls_token)
