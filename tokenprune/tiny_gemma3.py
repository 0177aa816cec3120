"""Small Gemma 3 models (``Gemma3ForConditionalGeneration``, model_type ``gemma3``), built offline from configs.

The real transformers classes with random weights, the real ``Gemma3Processor`` and ``Gemma3ImageProcessorPil``
(neither needs torchvision) and the word-level tokenizer of :mod:`tokenprune.tiny_models` with Gemma 3's three
vision tokens. What the tiny model keeps of Gemma 3, at small sizes:

* a SigLIP tower (no [CLS], no pooling head) on a fixed square input: 96 px / patch 4 = 24 x 24 patches,
  average-pooled 4 x 4 by the projector to 6 x 6 = 36 LLM tokens per image (the real 896 px / 14 = 64 x 64 patches
  pooled 4 x 4 to 256 tokens);
* each image written as ``<start_of_image>`` + the image tokens + ``<end_of_image>`` by the processor, with
  ``token_type_ids`` marking the image tokens (they attend to each other bidirectionally in the LLM);
* pan-and-scan crops (``do_pan_and_scan=True`` in the processor call): each crop is one more 36-token image;
* sliding-window and global layers (``layer_types``; the window is 16 tokens so that prompts exceed it), the LLM's
  scaled embeddings and its ``(1 + w)`` RMSNorms.

``Gemma3PreTrainedModel._init_weights`` zeroes the projector's weight and every RMSNorm weight (the image features
would all be 0 and the ``(1 + w)`` norms plain): :func:`tiny_gemma3` draws them at random instead.
"""

from __future__ import annotations

import torch

from tokenprune.tiny_models import _finish, make_tokenizer

GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
IMAGE_SIZE, PATCH, TOKENS_PER_IMAGE = 96, 4, 36
SLIDING_WINDOW = 16
# Runs of newlines that the real Gemma tokenizer has as single tokens and vLLM's Gemma 3 processor looks up (it
# writes each image as "\n\n<start_of_image>...<end_of_image>\n\n" and merges the runs it makes with a
# neighbouring "\n" as the tokenizer would). Only in the vLLM checkpoint's tokenizer (``newline_runs=True``).
NEWLINE_RUNS = ("\n\n", "\n\n\n", "\n\n\n\n")

# Depths of the public checkpoints (config.json on the Hugging Face hub), at tiny width: google/gemma-3-12b-it and
# google/gemma-3-27b-it share the SigLIP So400m tower (27 layers, 896 px, patch 14, mm_tokens_per_image 256); their
# LLMs have 48 (12B) and 62 (27B) layers, five sliding-window layers (window 1024) then one global layer
# (sliding_window_pattern 6).
GEMMA3_REAL_DEPTH = {"gemma-3-12b": dict(vision_layers=27, text_layers=48),
                     "gemma-3-27b": dict(vision_layers=27, text_layers=62)}


def gemma3_tokenizer(newline_runs: bool = False):
    """The word-level tokenizer with Gemma 3's ``boi_token`` / ``eoi_token`` / ``image_token`` attributes (what
    ``Gemma3Processor`` reads); ``newline_runs``: also :data:`NEWLINE_RUNS` as single tokens, as in the real
    tokenizer (matched longest first), which vLLM's Gemma 3 processor needs."""
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer(tuple(GEMMA3_TOKENS.values()) + (NEWLINE_RUNS if newline_runs else ()))
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="</s>", padding_side="left", extra_special_tokens=dict(GEMMA3_TOKENS),
    )


def tiny_gemma3(
    attn_implementation: str = "sdpa", seed: int = 0, text_layers: int = 2, vision_layers: int = 3,
    sliding_window: int = SLIDING_WINDOW, newline_runs: bool = False,
):
    """``(model, processor)``: a Gemma 3 model with random weights (eval mode, fp32).

    ``text_layers`` LLM layers in Gemma 3's pattern (five sliding-window layers, then a global one; with fewer than
    six layers the last one is global so both kinds always exist); ``vision_layers`` SigLIP layers (width 64).
    ``newline_runs``: the tokenizer of :func:`gemma3_tokenizer` with the newline runs (the vLLM checkpoint's).
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = gemma3_tokenizer(newline_runs)
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(text_layers)]
    if "full_attention" not in layer_types:
        layer_types[-1] = "full_attention"
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=sliding_window, layer_types=layer_types, max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS_PER_IMAGE,
        image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # undo the zero init (see the module docstring)
        projector = model.model.multi_modal_projector
        projector.mm_input_projection_weight.normal_(0.0, vision.hidden_size**-0.5)
        for module in model.modules():
            if "RMSNorm" in type(module).__name__:
                module.weight.normal_(0.0, 0.1)
    model = _finish(model, tok, attn_implementation)
    # Random weights may emit a vision token id, which a use_cache=False step would take for an image token.
    model.generation_config.suppress_tokens = [tok.image_token_id, tok.boi_token_id, tok.eoi_token_id]
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False, pan_and_scan_min_crop_size=16,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=TOKENS_PER_IMAGE)
    # The processor's own defaults (minimum crop 256 px) would override the image processor's at this tiny size.
    # (transformers < 5.20, vLLM's, keeps them in Gemma3ProcessorKwargs instead: tiny pan-and-scan crops do not
    # happen there.)
    if hasattr(Gemma3Processor, "images_kwargs"):
        processor.images_kwargs = {**Gemma3Processor.images_kwargs, "pan_and_scan_min_crop_size": 16}
    return model, processor


def real_depth_gemma3(attn_implementation: str = "sdpa", seed: int = 0, checkpoint: str = "gemma-3-12b"):
    """:func:`tiny_gemma3` as deep as ``checkpoint`` (a key of :data:`GEMMA3_REAL_DEPTH`)."""
    return tiny_gemma3(attn_implementation, seed, **GEMMA3_REAL_DEPTH[checkpoint])
