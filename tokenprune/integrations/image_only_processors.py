"""The real transformers processors minus their video processor, for machines without torchvision.

``AutoProcessor`` cannot build the Qwen2-VL/2.5-VL/3-VL, LLaVA-OneVision or InternVL processors without torchvision:
their video processors need it. The image path needs nothing of it (the PIL image processors), so these subclasses
keep each processor's own prompt expansion and image preprocessing, drop the video processor, and raise on videos.
The lmms-eval wrappers (:mod:`tokenprune.integrations.lmms_eval`) load them instead of ``AutoProcessor`` when
torchvision is missing; the offline smoke run saves tiny models with them.

``ProcessorMixin`` reads a processor's sub-processors from the parameter names of its ``__init__`` and the keys of
``processor_config.json`` from its positional parameters: each subclass therefore spells out the parent's
parameters without ``video_processor``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

VIDEOS_NEED_TORCHVISION = (
    "videos need the model's video processor, which needs torchvision; install a torch/torchvision pair that import "
    "together (e.g. a CUDA torch with its torchvision) to evaluate video tasks"
)


def torchvision_importable() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch fails at import (operator torchvision::nms ...)
        return False
    return True


class _NoVideos:
    """Mixin: a processor call with videos raises (there is no video processor)."""

    def __call__(self, *args: Any, videos: Any = None, video_metadata: Any = None, **kwargs: Any):
        if videos:
            raise NotImplementedError(VIDEOS_NEED_TORCHVISION)
        return super().__call__(*args, **kwargs)


def image_only_qwen_processor(base: type) -> type:
    """``base`` (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` or ``Qwen3VLProcessor``) without its video processor:
    the same prompt expansion, ``mm_token_type_ids`` and image preprocessing (``Qwen2VLImageProcessorPil``)."""

    class ImageOnlyQwenProcessor(_NoVideos, base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            for name, text in (("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):  # Qwen3-VL
                token = getattr(tokenizer, f"{name}_token", None) or text
                setattr(self, f"{name}_token", token)
                setattr(self, f"{name}_token_id", tokenizer.convert_tokens_to_ids(token))
            from transformers import ProcessorMixin

            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyQwenProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyQwenProcessor


def image_only_onevision_processor() -> type:
    """``LlavaOnevisionProcessor`` without its video processor: AnyRes-max image token counts, ``image_sizes``,
    ``batch_num_images`` exactly as the released processor."""
    from transformers import LlavaOnevisionProcessor

    class ImageOnlyLlavaOnevisionProcessor(_NoVideos, LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
            super().__init__(image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                             chat_template, image_token, video_token, vision_aspect_ratio, **kwargs)

    return ImageOnlyLlavaOnevisionProcessor


def image_only_internvl_processor() -> type:
    """``InternVLProcessor`` without its video processor: ``<img>`` + ``image_seq_length`` x tiles
    ``<IMG_CONTEXT>`` + ``</img>`` per image, tiles from ``GotOcr2ImageProcessorPil``, as the released processor."""
    from transformers import InternVLProcessor

    class ImageOnlyInternVLProcessor(_NoVideos, InternVLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                     **kwargs):
            super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)

    return ImageOnlyInternVLProcessor


# model_type -> builder of the image-only processor, for processors AutoProcessor cannot build without torchvision
IMAGE_ONLY_BY_MODEL_TYPE = {
    "llava_onevision": image_only_onevision_processor,
    "internvl": image_only_internvl_processor,
}
