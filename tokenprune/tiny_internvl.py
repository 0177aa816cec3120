"""Small InternVL3 models (``InternVLForConditionalGeneration``, model_type ``internvl``), built offline from configs.

The real transformers classes with random weights, the real ``GotOcr2ImageProcessorPil`` (dynamic tiling: a grid of
square tiles chosen by the image's aspect ratio, plus a thumbnail of the whole image when there is more than one
tile) and the word-level tokenizer of :mod:`tokenprune.tiny_models` with InternVL's image tokens (``<img>``,
``</img>``, ``<IMG_CONTEXT>``). The processor is a stand-in (:class:`TinyInternVLProcessor`): transformers'
``InternVLProcessor`` cannot be built without torchvision (its video processor needs it). What the tiny model keeps
of InternVL3:

* InternViT with its [CLS] token (dropped before the pixel shuffle), learned absolute position embeddings, layer
  scale, ``vision_feature_layer=-1``;
* pixel shuffle 2x2 -> one LLM token (``downsample_ratio=0.5``) and the LayerNorm + 2-layer MLP projector;
* a Qwen2 LLM (1-D RoPE), as InternVL3's Qwen2.5 language models.

Tiles are 64 px with 8-px patches: 8 x 8 patches -> 4 x 4 = 16 LLM tokens per tile (the real model: 448 px, patch
14, 32 x 32 -> 256), up to ``max_tiles`` tiles per image.
"""

from __future__ import annotations

import torch

from tokenprune.tiny_models import _finish, make_tokenizer

TILE = 64
PATCH = 8
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
# Depths of the public checkpoint OpenGVLab/InternVL3-8B-hf (config.json on the Hugging Face hub), at tiny width:
# InternViT-300M: 24 layers (vision_feature_layer -1); Qwen2.5-7B LLM: 28 layers.
INTERNVL_REAL_DEPTH = dict(vision_layers=24, text_layers=28)


class TinyInternVLProcessor:
    """What ``InternVLProcessor`` does to a prompt, on the real ``GotOcr2ImageProcessorPil``: each ``<IMG_CONTEXT>``
    of the text (one per image, in order) becomes ``<img>`` + ``image_seq_length`` x (the image's tile count)
    ``<IMG_CONTEXT>`` + ``</img>``; ``pixel_values`` holds every image's tiles (grid tiles, then the thumbnail) in
    prompt order. Left padding, as InternVL's processor."""

    def __init__(self, tokenizer, image_processor, image_seq_length: int = TOKENS_PER_TILE):
        self.tokenizer, self.image_processor, self.image_seq_length = tokenizer, image_processor, image_seq_length

    def __call__(self, text, images=None, return_tensors="pt", padding=True):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
        out: dict[str, torch.Tensor] = {}
        tiles: list[int] = []
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = vision["pixel_values"]
            tiles = [int(n) for n in vision["num_patches"]]
        context, expanded = INTERNVL_TOKENS["context_image_token"], []
        for t in texts:
            parts = t.split(context)
            if len(parts) - 1 > len(tiles):
                raise ValueError(f"more {context} placeholders in the text than images")
            pieces = [parts[0]]
            for part in parts[1:]:
                pieces.append(f"<img>{context * (self.image_seq_length * tiles.pop(0))}</img>{part}")
            expanded.append("".join(pieces))
        if tiles:
            raise ValueError(f"more images than {context} placeholders in the text")
        enc = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        return BatchFeature({**enc, **out})


def named_tokenizer(tokenizer):
    """``tokenizer`` (the tiny word-level one) with InternVL's image tokens as attributes, as the released tokenizers
    have them (``start_image_token``, ``context_image_token``, ... and their ids): what the real ``InternVLProcessor``
    reads."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", padding_side="left", extra_special_tokens=dict(INTERNVL_TOKENS),
    )


def tiny_internvl(
    attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 2, vision_layers: int = 3,
    max_tiles: int = 4,
):
    """``(model, processor)``: an InternVL3-architecture model with random weights (eval mode, fp32);
    ``text_layers`` Qwen2 decoder layers, ``vision_layers`` InternViT layers, at most ``max_tiles`` tiles per image
    (plus the thumbnail)."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        Qwen2Config,
    )

    tok = make_tokenizer(tuple(INTERNVL_TOKENS.values()))
    vision = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=TILE, patch_size=PATCH, use_mean_pooling=True, norm_type="layer_norm",
    )
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ).to_dict()
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():  # HF initialises [CLS] and the position embeddings to zeros: give them random values
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_(std=0.5)
        embeddings.position_embeddings.normal_(std=0.5)
    model = _finish(model, tok, attn_implementation)
    model.generation_config.suppress_tokens = sorted(tok.convert_tokens_to_ids(list(INTERNVL_TOKENS.values())))
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
    )
    return model, TinyInternVLProcessor(tok, image_processor)

