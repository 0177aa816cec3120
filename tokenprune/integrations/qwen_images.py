"""``qwen_vl_utils.process_vision_info`` for images only, without torchvision.

``qwen_vl_utils`` (0.0.14) imports torchvision at module top for its video readers, so on a machine with the CPU
torch wheel and no torchvision it cannot be imported and lmms-eval's Qwen wrappers have no way to prepare images.
The image path of that function needs only PIL; this is it, rule for rule (``smart_resize`` to multiples of
``patch * merge`` = 28 px within ``[min_pixels, max_pixels]``, RGBA on white, PIL's default resampling). The
tests compare it with the original on the same messages. Videos raise.
"""

from __future__ import annotations

import base64
import copy
import math
from io import BytesIO
from typing import Any

from PIL import Image

SPATIAL_MERGE_SIZE = 2
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
MAX_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int]:
    """``(h, w)``: multiples of ``factor``, pixel count within ``[min_pixels, max_pixels]``, aspect ratio kept."""
    max_pixels = max_pixels if max_pixels is not None else IMAGE_MAX_TOKEN_NUM * factor**2
    min_pixels = min_pixels if min_pixels is not None else IMAGE_MIN_TOKEN_NUM * factor**2
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}; got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, str):
        raise ValueError(f"unrecognised image input {type(image).__name__}; expected a PIL image, path or data URL")
    if image.startswith("data:image") and "base64," in image:
        with BytesIO(base64.b64decode(image.split("base64,", 1)[1])) as bio:
            return copy.deepcopy(Image.open(bio))
    if image.startswith(("http://", "https://")):
        raise ValueError("image URLs are not fetched here (offline); pass a PIL image, a path or a data URL")
    return Image.open(image[7:] if image.startswith("file://") else image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def fetch_image(ele: dict[str, Any], image_patch_size: int = 14) -> Image.Image:
    factor = image_patch_size * SPATIAL_MERGE_SIZE
    image = _to_rgb(_open(ele["image"] if "image" in ele else ele["image_url"]))
    if "resized_height" in ele and "resized_width" in ele:
        height, width = smart_resize(ele["resized_height"], ele["resized_width"], factor=factor)
    else:
        width, height = image.size
        height, width = smart_resize(
            height, width, factor=factor, min_pixels=ele.get("min_pixels", IMAGE_MIN_TOKEN_NUM * factor**2),
            max_pixels=ele.get("max_pixels", IMAGE_MAX_TOKEN_NUM * factor**2),
        )
    return image.resize((width, height))


def process_vision_info(conversations: list, return_video_kwargs: bool = False, return_video_metadata: bool = False,
                        image_patch_size: int = 14):
    """Same signature and return values as ``qwen_vl_utils.process_vision_info``; images only."""
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    images = []
    for conversation in conversations:
        for message in conversation:
            if not isinstance(message["content"], list):
                continue
            for ele in message["content"]:
                if "video" in ele or ele.get("type") == "video":
                    raise NotImplementedError(
                        "videos need qwen_vl_utils' video readers, which need torchvision; evaluate video tasks with "
                        "a torch/torchvision pair that import together"
                    )
                if "image" in ele or "image_url" in ele:
                    images.append(fetch_image(ele, image_patch_size=image_patch_size))
                elif ele.get("type", "text") in ("image", "image_url"):
                    raise ValueError("image, image_url or video should be in content")
    video_kwargs: dict[str, Any] = {"do_sample_frames": False}
    if not return_video_metadata:
        video_kwargs["fps"] = []
    images = images or None
    return (images, None, video_kwargs) if return_video_kwargs else (images, None)
