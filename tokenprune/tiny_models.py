"""Small models of the four supported families, built offline from configs, for tests, the demo and the notebooks.

They are the real transformers classes (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and their processors) with random
weights and a word-level tokenizer: every code path is the one a user's ``from_pretrained`` model takes. The one
exception is the Qwen processor (:class:`TinyQwenProcessor`): transformers' ``Qwen2VLProcessor`` cannot be built
without torchvision (its video processor needs it), so the prompt expansion it does is reproduced here, on top of
the real ``Qwen2VLImageProcessorPil``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
QWEN_SPECIAL_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
WORDS = (
    "USER ASSISTANT : what is in the image ? describe a cat dog red blue green yellow circle square triangle "
    "left right top bottom one two three yes no how many are there of and color shape"
).split()


def word_tokenizer(words: list[str], specials: list[str] = SPECIAL_TOKENS):
    """A word-level fast tokenizer over ``specials`` then ``words`` (ids in that order), left padding; the special
    tokens (``<image>`` ...) are matched before the text is split on white space and newlines."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(specials) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        padding_side="left",
    )


def make_tokenizer(extra_special_tokens: tuple[str, ...] = ()):
    """The tiny models' tokenizer: :func:`word_tokenizer` over :data:`WORDS`, digits and punctuation, with LLaVA's
    special tokens plus ``extra_special_tokens``."""
    return word_tokenizer(WORDS + [str(i) for i in range(10)] + list(".,!\n"),
                          SPECIAL_TOKENS + list(extra_special_tokens))


@dataclass(frozen=True)
class LlavaSize:
    """Shape of a LLaVA-1.5-style model. ``image_size // patch_size`` squared = visual tokens per image.

    The defaults are the tiny test model; the real-shape benchmark presets (:mod:`tokenprune.bench.models`) and the
    trained synthetic model's recipe set the optional fields (``None``: derived as noted)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vision_intermediate: int | None = None  # None: 4 * vision_hidden
    projection_dim: int | None = None  # None: vision_hidden
    text_head_dim: int | None = None  # None: text_hidden // text_heads
    vocab_size: int | None = None  # None: the tokenizer's
    max_positions: int = 4096
    tie_word_embeddings: bool = False


TINY = LlavaSize()
# 336 px / patch 14 = 24 x 24 = 576 visual tokens per image, like LLaVA-1.5; big enough to time on a CPU.
DEMO = LlavaSize(image_size=336, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                 text_hidden=512, text_layers=4, text_heads=8, text_kv_heads=8, text_intermediate=1376)


def clip_vision_config(size: LlavaSize):
    """The CLIP vision tower's config of ``size`` (LLaVA-1.5 and LLaVA-NeXT)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=size.vision_intermediate or 4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads, image_size=size.image_size,
        patch_size=size.patch_size, projection_dim=size.projection_dim or size.vision_hidden,
    )


def llama_text_config(size: LlavaSize, tok):
    """The Llama LLM's config of ``size`` with ``tok``'s vocabulary and special ids (LLaVA; Qwen's text as a dict)."""
    from transformers import LlamaConfig

    extra = {} if size.text_head_dim is None else {"head_dim": size.text_head_dim}
    return LlamaConfig(
        vocab_size=size.vocab_size or len(tok), hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate, num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads, num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=size.max_positions, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=size.tie_word_embeddings, **extra,
    )


def tiny_llava(size: LlavaSize = TINY, attn_implementation: str = "sdpa", seed: int = 0, *, tokenizer=None,
               dtype: torch.dtype | None = None):
    """``(model, processor)``: a LLaVA-1.5-architecture model of ``size`` with random weights (eval mode).

    The one builder of every random LLaVA-1.5 model in the project: the tiny test models, the real-shape benchmark
    presets and the synthetic model's recipe. ``tokenizer`` defaults to :func:`make_tokenizer`; ``dtype`` (default
    fp32) is the dtype the weights are initialised in (no fp32 copy of a large preset)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tokenizer if tokenizer is not None else make_tokenizer()
    n_patches = (size.image_size // size.patch_size) ** 2
    config = LlavaConfig(
        vision_config=clip_vision_config(size), text_config=llama_text_config(size, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=n_patches, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        torch.manual_seed(seed)
        model = _finish(LlavaForConditionalGeneration(config), tok, attn_implementation)
    finally:
        torch.set_default_dtype(previous)
    crop = {"height": size.image_size, "width": size.image_size}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size.image_size}, crop_size=crop)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=size.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor


def _finish(model, tok, attn_implementation: str):
    model.eval()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


# LLaVA-NeXT: a 32-px base tile of 4x4 patches; AnyRes crops on a grid of up to 2x2 tiles.
NEXT_TILE = LlavaSize(image_size=32)
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_llava_next(attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 2, vision_layers: int = 3):
    """``(model, processor)``: a LLaVA-NeXT (AnyRes) model with random weights, real ``LlavaNextProcessor``;
    ``text_layers`` LLM decoder layers, ``vision_layers`` CLIP encoder layers.

    16 base-tile tokens per image plus the unpadded high-resolution grid with one ``image_newline`` per row, e.g.
    a 40x70 image gives 16 + 4 x (8 + 1) = 52 image tokens.
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = make_tokenizer()
    config = LlavaNextConfig(
        vision_config=clip_vision_config(replace(NEXT_TILE, vision_layers=vision_layers)),
        text_config=llama_text_config(replace(NEXT_TILE, text_layers=text_layers), tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=NEXT_PINPOINTS,
        image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = _finish(LlavaNextForConditionalGeneration(config), tok, attn_implementation)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def qwen_tokenizer():
    """``(tokenizer, config ids)``: the word-level tokenizer with Qwen's vision tokens, and the ``*_token_id`` config
    fields that name them (shared by the Qwen2 and Qwen3 builders)."""
    tok = make_tokenizer(tuple(QWEN_SPECIAL_TOKENS))
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    return tok, {field: tok.convert_tokens_to_ids(token) for field, token in names.items()}


class TinyQwenProcessor:
    """What ``Qwen2VLProcessor`` does to a prompt, on the real ``Qwen2VLImageProcessorPil``.

    Each ``<|image_pad|>`` (``<|video_pad|>``) of the text is expanded into the image's (video's) number of merged
    tokens ``t*h*w / merge**2`` and ``mm_token_type_ids`` marks them (1 image, 2 video). Videos are given as
    ready-made ``(pixel_values_videos, video_grid_thw)`` pairs (the real video processor needs torchvision).
    """

    def __init__(self, tokenizer, image_processor, merge_size: int = 2):
        self.tokenizer, self.image_processor, self.merge_size = tokenizer, image_processor, merge_size

    def __call__(self, text, images=None, videos=None, return_tensors="pt", padding=True):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        out: dict[str, torch.Tensor] = {}
        image_counts: list[int] = []
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            image_counts = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        video_counts: list[int] = []
        if videos:
            out["pixel_values_videos"] = torch.cat([v[0] for v in videos])
            out["video_grid_thw"] = torch.cat([v[1] for v in videos])
            video_counts = self._video_token_counts(out["video_grid_thw"])
        expanded = [expand_placeholders(t, "<|image_pad|>", image_counts) for t in texts]
        expanded = [expand_placeholders(t, "<|video_pad|>", video_counts) for t in expanded]
        if image_counts or video_counts:
            raise ValueError("more images/videos than placeholders in the text")
        enc = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        ids = enc["input_ids"]
        mm = torch.zeros_like(ids, dtype=torch.int32)
        mm[ids == self.tokenizer.convert_tokens_to_ids("<|image_pad|>")] = 1
        mm[ids == self.tokenizer.convert_tokens_to_ids("<|video_pad|>")] = 2
        return BatchFeature({**enc, "mm_token_type_ids": mm, **out})

    def _video_token_counts(self, grid_thw: torch.Tensor) -> list[int]:
        """What each ``<|video_pad|>`` of the text expands to, in order: one per video here (Qwen2-VL)."""
        return (grid_thw.prod(-1) // self.merge_size**2).tolist()



def expand_placeholders(text: str, placeholder: str, counts: list[int]) -> str:
    """Each ``placeholder`` of ``text`` repeated as many times as the next of ``counts`` says (consumed in order):
    what a processor does to the one placeholder per image or video that a chat template writes."""
    parts = text.split(placeholder)
    pieces = [parts[0]]
    for part in parts[1:]:
        if not counts:
            raise ValueError(f"more {placeholder} placeholders in the text than inputs")
        pieces.append(placeholder * counts.pop(0) + part)
    return "".join(pieces)


def tiny_qwen(
    version: str = "2", attn_implementation: str = "sdpa", seed: int = 0, max_pixels: int = 112 * 140,
    text_layers: int = 2,
    vision_layers: int = 2,
    fullatt_block_indexes: tuple[int, ...] | None = None,
):
    """``(model, processor)``: a Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) model with random weights
    (``text_layers`` LLM decoder layers, ``vision_layers`` ViT blocks).

    ViT patch 14, 2x2 merge (one LLM token per 28x28 pixels), dynamic resolution up to ``max_pixels``. The
    Qwen2.5-VL tower uses window attention (56 px windows = 2x2 merged tokens) in every block but the
    ``fullatt_block_indexes`` (default: the last block), so its window order differs from raster order on any image
    wider or taller than 56 px.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tok, ids = qwen_tokenizer()
    text = llama_text_config(replace(TINY, text_layers=text_layers), tok).to_dict()
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    text = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "transformers_version")}
    if version == "2":
        vision = dict(depth=vision_layers, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    elif version == "2.5":
        full = list(fullatt_block_indexes) if fullatt_block_indexes is not None else [vision_layers - 1]
        vision = dict(depth=vision_layers, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=full)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' (Qwen2-VL) or '2.5' (Qwen2.5-VL); got {version!r}")
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = _finish(cls(config), tok, attn_implementation)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=max_pixels,
    )
    return model, TinyQwenProcessor(tok, image_processor)


def random_video(frames: int, height: int, width: int, seed: int = 0, channels: int = 3, patch: int = 14):
    """``(pixel_values_videos, video_grid_thw)`` of a random clip, in the layout Qwen's video processor emits.

    ``frames`` must be even (temporal patch 2); ``height``/``width`` multiples of 28.
    """
    if frames % 2 or height % 28 or width % 28:
        raise ValueError("frames must be even and height/width multiples of 28")
    grid = torch.tensor([[frames // 2, height // patch, width // patch]])
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(grid.prod()), channels * 2 * patch * patch, generator=generator)
    return pixels, grid


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def demo_image(size: int = 336) -> Image.Image:
    """The bundled demo picture, drawn (not downloaded): a few coloured shapes on a soft gradient."""
    y, x = np.mgrid[0:size, 0:size] / size
    background = np.stack([200 + 40 * x, 210 + 30 * y, 230 - 30 * x], axis=-1).astype(np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    s = size / 336
    draw.ellipse([40 * s, 40 * s, 130 * s, 130 * s], fill=(220, 40, 40))
    draw.rectangle([200 * s, 60 * s, 290 * s, 150 * s], fill=(40, 90, 220))
    draw.polygon([(80 * s, 300 * s), (170 * s, 300 * s), (125 * s, 210 * s)], fill=(40, 170, 60))
    draw.ellipse([250 * s, 250 * s, 275 * s, 275 * s], fill=(240, 200, 30))
    return image


def large_image(size: int = 8000, blocks: int = 6) -> Image.Image:
    """A procedural ``size x size`` RGB picture for the large-image front-end (uint8 in PIL: 192 MB at 8,000 px, no
    float copy): a radial gradient with ``blocks`` bright rectangles along the diagonal."""
    image = Image.radial_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    step = size / (blocks + 1)
    for i in range(blocks):
        x, y = round(step * (i + 0.5)), round(step * (i + 0.7))
        draw.rectangle((x, y, x + round(step / 2), y + round(step / 4)), fill=(255, 40 * (i % 7), 0))
    return image

# The project's trained small model: a LLaVA-1.5-architecture VLM trained on synthetic VQA (model card:
# tokenprune/assets/synth-llava/README.md; recipe: python -m benchmarks.synthetic.train in the repository).
SYNTH_LLAVA = Path(__file__).resolve().parent / "assets" / "synth-llava"
SYNTH_PROMPT = "USER : <image>\n{question} ASSISTANT :"


def trained_llava(attn_implementation: str = "sdpa", path: str | Path | None = None, quantization_config=None):
    """``(model, processor)``: the shipped trained LLaVA-1.5-architecture model (CLIP ViT 224 px / patch 14 -> 256
    visual tokens + [CLS], 2-layer projector, 4-layer Llama LM; fp32, eval mode), via ``from_pretrained``; with a
    ``BitsAndBytesConfig`` as ``quantization_config``, loaded quantized on the CPU (bitsandbytes' CPU backend).

    It answers single-word questions about scenes of coloured shapes (:mod:`tokenprune.bench.synthetic`) with the
    prompt ``SYNTH_PROMPT``; :func:`tokenprune.bench.synthetic.scenes.synthetic_demo` gives a scene and a
    question.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path) if path is not None else SYNTH_LLAVA
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained model at {folder} (expected model.safetensors there); it ships with the package under "
            "tokenprune/assets/synth-llava; rebuild it from a checkout of the repository with `make train-synthetic`")
    quantized = {} if quantization_config is None else {"quantization_config": quantization_config,
                                                        "device_map": "cpu"}
    model = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation=attn_implementation,
                                                          dtype=torch.float32, **quantized)
    processor = AutoProcessor.from_pretrained(folder)
    return model.eval(), processor

