"""Which image each visual placeholder of a prompt belongs to, for the decoder loop.

A run of placeholders is not always one image: LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision put no token between two
images (``"<image><image>"``), so their placeholders form one run. The model itself assigns its per-image features
to the placeholders in flat (row-major) order; the loop does the same with each image's placeholder count, which
the adapter knows (:meth:`~tokenprune.patches.base.VisionStageAdapter.decoder_image_counts`): from the call's
``mm_encoder_outputs`` (what ``generate`` pre-encodes, or a vision stage's kept spans) or from the family's
placeholder rule. Families that wrap every image in start/end tokens (Qwen, InternVL, Gemma 3) need no counts.
"""

from __future__ import annotations

from typing import Any

import torch

_MODALITIES = (("image", "image_token_id"), ("video", "video_token_id"))


def encoded_counts(kwargs: dict[str, Any], config: Any) -> dict[int, list[int]]:
    """Per placeholder id, the token count of each image (video) in the call's ``mm_encoder_outputs``, flat prompt
    order; modalities whose output does not say where one ends (a single flattened row) are left out."""
    outputs = kwargs.get("mm_encoder_outputs") or {}
    counts = {}
    for modality, attr in _MODALITIES:
        pooled = getattr(outputs.get(modality), "pooler_output", None)
        token = getattr(config, attr, None)
        if pooled is None or token is None:
            continue
        if isinstance(pooled, (list, tuple)):
            counts[int(token)] = [int(p.shape[0]) for p in pooled]
        elif isinstance(pooled, torch.Tensor) and pooled.ndim == 3 and pooled.shape[0] > 1:
            counts[int(token)] = [int(pooled.shape[1])] * int(pooled.shape[0])
    return counts


def image_numbers(ids: torch.Tensor, visual_ids: tuple[int, ...], counts: dict[int, list[int]]) -> torch.Tensor:
    """``[B, L]`` image number of each token within its row (-1 for text). An image starts where a run of visual
    placeholders starts, where the placeholder id changes (an image, then a video) and, for the ids in ``counts``
    (each image's placeholder count, flat prompt order), where the model's own flat assignment starts one."""
    visual = torch.isin(ids, torch.tensor(visual_ids, device=ids.device))
    previous = torch.nn.functional.pad(ids, (1, 0), value=-1)[:, :-1]
    starts = visual & ((previous != ids) | ~torch.nn.functional.pad(visual, (1, 0))[:, :-1])
    for token, sizes in counts.items():
        flat = (ids == token).reshape(-1).nonzero().squeeze(1)
        if flat.numel() != sum(sizes):
            raise ValueError(
                f"the prompt has {flat.numel()} placeholder tokens of id {token} but its {len(sizes)} image(s) hold "
                f"{sum(sizes)} tokens ({sizes}); the decoder stage cannot tell the images apart. Build the inputs "
                f"with the model's processor (one placeholder run per image)"
            )
        first = torch.tensor(sizes, device=ids.device).cumsum(0) - torch.tensor(sizes, device=ids.device)
        first = first[torch.tensor(sizes, device=ids.device) > 0]  # an image the vision stage removed entirely
        starts.view(-1)[flat[first]] = True
    number = starts.long().cumsum(1) - 1
    return number.masked_fill(~visual, -1)
