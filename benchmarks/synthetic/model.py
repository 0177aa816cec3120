"""The shipped synthetic-VQA model's architecture: LLaVA-1.5's layout (CLIP ViT 224 px / patch 14 -> 256 patch tokens
+ [CLS], 2-layer GELU projector on the penultimate ViT layer, Llama LM) at small widths, with a word-level tokenizer
over the task's vocabulary. :func:`build` gives it with the recipe's initialisation (random weights)."""

from __future__ import annotations

import torch

from tokenprune.bench.synthetic.questions import vocabulary
from tokenprune.bench.synthetic.scenes import GRID, IMAGE_SIZE, PATCH
from tokenprune.tiny_models import LlavaSize, tiny_llava, word_tokenizer

ARCH = {
    "vision_hidden": 128, "vision_layers": 4, "vision_heads": 4,
    "text_hidden": 256, "text_layers": 4, "text_heads": 8, "text_intermediate": 512, "text_init_std": 0.1,
}


def make_tokenizer():
    """The word-level tokenizer over the task's vocabulary (LLaVA's special tokens first)."""
    return word_tokenizer(vocabulary() + ["\n"])


def size(arch: dict = ARCH) -> LlavaSize:
    """The :class:`~tokenprune.tiny_models.LlavaSize` of ``arch`` at the scenes' resolution (224 px / patch 14)."""
    return LlavaSize(
        image_size=IMAGE_SIZE, patch_size=PATCH, vision_hidden=arch["vision_hidden"],
        vision_layers=arch["vision_layers"], vision_heads=arch["vision_heads"], text_hidden=arch["text_hidden"],
        text_layers=arch["text_layers"], text_heads=arch["text_heads"], text_kv_heads=arch["text_heads"],
        text_intermediate=arch["text_intermediate"], max_positions=1024,
    )


def build(arch: dict = ARCH, seed: int = 0):
    """``(model, processor)`` with random weights: the project's LLaVA builder
    (:func:`tokenprune.tiny_models.tiny_llava`) at :func:`size`, then the recipe's initialisation (training mode)."""
    model, processor = tiny_llava(size(arch), seed=seed, tokenizer=make_tokenizer())
    model.train()
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
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
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
