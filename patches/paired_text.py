"""The paired text of each image in an interleaved (multi-image, in-context) prompt: the PAIRED_TEXT signal.

Rule (every family): an image's paired text is the text between its placeholder block and the row's next image or
video block, or the row's end for its last image -- the caption or answer of an in-context example, the question
(and the chat template's tail) for the query image. The tokens that open and close a block (Qwen's
``<|vision_start|>``/``<|vision_end|>``, Gemma 3's begin/end-of-image tokens: whatever the model's config names) and
padding are not text. InternVL's config does not name its ``<img>``/``</img>`` tokens, so there they count as text.
"""

from __future__ import annotations

import torch

# Config attributes naming the tokens that open and close an image block (not part of any image's paired text).
_BLOCK_DELIMITERS = ("vision_start_token_id", "vision_end_token_id", "boi_token_id", "eoi_token_id",
                     "boi_token_index", "eoi_token_index")


def paired_text_embeddings(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None, row: int, end: int,
    placeholder_ids: tuple[int, ...],
) -> torch.Tensor:
    """PAIRED_TEXT (``methods/base.py``): LLM input embeddings of the text between the image whose last placeholder
    is at ``end`` and the row's next image/video placeholder (or the row's end), block delimiters and padding
    excluded. Raises when the image is followed directly by another image: interleaved-prompt methods (CATP) pair
    each image with its own text."""
    ids = input_ids[row]
    placeholder = torch.isin(ids, torch.tensor(placeholder_ids, device=ids.device))
    later = placeholder.clone()
    later[: end + 1] = False
    stop = int(later.nonzero().min()) if bool(later.any()) else ids.shape[0]
    config = model.config
    delimiters = [int(v) for a in _BLOCK_DELIMITERS if isinstance(v := getattr(config, a, None), int)]
    text = torch.zeros_like(placeholder)
    text[end + 1: stop] = True
    text &= ~torch.isin(ids, torch.tensor(delimiters + list(placeholder_ids), device=ids.device))
    if mask is not None:
        text &= mask[row].bool()
    if not bool(text.any()):
        starts = placeholder & ~torch.nn.functional.pad(placeholder, (1, 0))[:-1]
        number = int(starts[: end + 1].sum()) - 1
        found = "another image right after it" if stop < ids.shape[0] else "the end of the prompt right after it"
        raise ValueError(
            f"the image {number} of prompt row {row} has no paired text: found {found} (an interleaved in-context "
            f"prompt pairs every image with the text between it and the next image, e.g. its caption or answer, "
            f"and the query image with the question). Put that text after each image, or use a single-image "
            f"method such as 'divprune' for prompts without it"
        )
    with torch.no_grad():
        return model.get_input_embeddings()(ids[text])
