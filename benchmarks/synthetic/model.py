"""The shipped synthetic-VQA model's architecture: LLaVA-1.5's layout (CLIP ViT 224 px / patch 14 -> 256 patch tokens
+ [CLS], 2-layer GELU projector on the penultimate ViT layer, Llama LM) at small widths, with a word-level tokenizer
over the task's vocabulary. :func:`build` gives it with the recipe's initialisation (random weights)."""

from __future__ import annotations

import torch

from tokenprune.bench.synthetic.questions import vocabulary
from tokenprune.bench.synthetic.scenes import GRID, IMAGE_SIZE, PATCH

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
ARCH = {
    "vision_hidden": 128, "vision_layers": 4, "vision_heads": 4,
    "text_hidden": 256, "text_layers": 4, "text_heads": 8, "text_intermediate": 512, "text_init_std": 0.1,
}


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + vocabulary() + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


def build(arch: dict = ARCH, seed: int = 0):
    """``(model, processor)`` with random weights."""
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
        hidden_size=arch["vision_hidden"], intermediate_size=4 * arch["vision_hidden"],
        num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"], image_size=IMAGE_SIZE,
        patch_size=PATCH, projection_dim=arch["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch["text_hidden"], intermediate_size=arch["text_intermediate"],
        num_hidden_layers=arch["text_layers"], num_attention_heads=arch["text_heads"],
        num_key_value_heads=arch["text_heads"], max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=GRID * GRID, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        # The LM's weights (embeddings, attention, MLP) start at std 0.1 instead of Llama's 0.02. With 0.02 the
        # question tokens attend uniformly to the 256 visual tokens, an object's features are diluted 1:30 in that
        # mean, and the LM never learned to read even the colour of a lone object (loss stuck at the uniform-colour
        # value for hundreds of steps); at 0.1 the initial attention is content-dependent and selective reading
        # appears within ~100 steps. The projector and lm_head keep the default initialisation.
        for module in model.model.language_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, arch["text_init_std"])
                if getattr(module, "padding_idx", None) is not None:
                    module.weight[module.padding_idx].zero_()
        # 2-D sin-cos start for CLIP's learned position embeddings (still trained), as in MAE
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(
            sincos_2d(arch["vision_hidden"], GRID))
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=crop)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """``(1 + grid*grid, dim)``: 2-D sine-cosine position embeddings (half the channels encode the row, half the
    column; MAE's ``get_2d_sincos_pos_embed`` convention) with a zero row for [CLS]. Randomly initialised CLIP
    position embeddings (std 0.02) are drowned by the patch content: after the vision pre-training the visual
    tokens still did not tell where they are (row / column linear probes near chance), which the position,
    relative and top questions need."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def enc(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], 1)

    table = torch.cat([enc(rows), enc(cols)], 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], 0).float()
