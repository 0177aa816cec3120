"""Small LLaVA-1.5-architecture models built offline from configs, for tests, the demo and the notebooks.

They are the real transformers classes (``LlavaForConditionalGeneration``, ``LlavaProcessor``) with random
weights and a word-level tokenizer: every code path is the one a user's ``from_pretrained`` model takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    "USER ASSISTANT : what is in the image ? describe a cat dog red blue green yellow circle square triangle "
    "left right top bottom one two three yes no how many are there of and color shape"
).split()


def make_tokenizer():
    """A word-level fast tokenizer with LLaVA's special tokens (``<image>`` is matched before splitting)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + WORDS + [str(i) for i in range(10)] + list(".,!\n"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        padding_side="left",
    )


@dataclass(frozen=True)
class LlavaSize:
    """Shape of a small LLaVA-1.5-style model. ``image_size // patch_size`` squared = visual tokens per image."""

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


TINY = LlavaSize()
# 336 px / patch 14 = 24 x 24 = 576 visual tokens per image, like LLaVA-1.5; big enough to time on a CPU.
DEMO = LlavaSize(image_size=336, patch_size=14, vision_hidden=256, vision_layers=4, vision_heads=4,
                 text_hidden=512, text_layers=4, text_heads=8, text_kv_heads=8, text_intermediate=1376)


def tiny_llava(size: LlavaSize = TINY, attn_implementation: str = "sdpa", seed: int = 0):
    """``(model, processor)``: a LLaVA-1.5-architecture model with random weights (eval mode, fp32)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = make_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden, num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads, image_size=size.image_size, patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=size.text_hidden, intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers, num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    n_patches = (size.image_size // size.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tok.pad_token_id
    crop = {"height": size.image_size, "width": size.image_size}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size.image_size}, crop_size=crop)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=size.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    return model, processor


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
