"""Gemma 3's signals against the model's own computation (eager attention weights, the projector): the attention
rows decoder-stage methods recompute, VFlowOpt's pooled SigLIP attention map, and the projection of its recycled
tokens. The vision stage: tests/test_gemma3.py; the decoder stage: tests/test_gemma3_decoder.py."""

import pytest
import torch
from conftest import built
from gemma3_oracle import PROMPT, gemma3_inputs

from tokenprune.tiny_gemma3 import SLIDING_WINDOW, tiny_gemma3
from tokenprune.tiny_models import random_image

_MODELS: dict = {}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("layer_index", [0, 1])  # a sliding-window layer and a global one
def test_recomputed_attention_rows_are_the_models_own(layer_index):
    """The decoder-stage row recomputation (patches/attention_rows.py) uses the layer's own modules: Gemma 3's
    (1 + w) RMSNorms, per-head q_norm / k_norm, query_pre_attn_scalar scaling; checked against eager attention
    weights on a prompt shorter than the window."""
    from tokenprune.patches.attention_rows import attention_rows

    model, _ = built(_MODELS, "eager", lambda: tiny_gemma3("eager"))
    layer = model.model.language_model.layers[layer_index]
    seen = {}

    def hook(module, args, kwargs):
        seen.update(hidden=args[0] if args else kwargs["hidden_states"], rope=kwargs["position_embeddings"])

    ids = torch.arange(20, 20 + SLIDING_WINDOW - 2)[None]
    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            weights = model(input_ids=ids, output_attentions=True).attentions[layer_index]  # [1, H, N, N]
    finally:
        handle.remove()
    n = ids.shape[1]
    rows = torch.tensor([[n - 1, n // 2]])
    cos, sin = seen["rope"]
    got = attention_rows(layer, seen["hidden"], rows, cos, sin, torch.ones(1, n, dtype=torch.bool))
    torch.testing.assert_close(got[0], weights[0][:, rows[0]].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [256, 80])  # query patches a chunk: 16 or 5 pooled tokens (the last chunk ragged)
def test_pooled_attention_map_is_the_eager_siglip_map_pooled_by_hand(chunk, monkeypatch):
    """VFlowOpt's map on Gemma 3: P A P^T of the last SigLIP layer's head-mean attention (eager weights), each pooled
    token's row the mean over its 4 x 4 query patches of the sum over each token's 4 x 4 key patches."""
    from tokenprune.methods import ATTENTION_MAP
    from tokenprune.methods.vflowopt import VFlowOptViT
    from tokenprune.patches import clip_signals
    from tokenprune.patches.gemma3 import Gemma3Adapter

    monkeypatch.setattr(clip_signals, "_MAP_ROWS", chunk)
    model, processor = built(_MODELS, "eager", lambda: tiny_gemma3("eager"))
    images = [random_image(60, 80, seed=1), random_image(80, 60, seed=2)]
    pixels = gemma3_inputs(processor, [PROMPT, PROMPT], images)["pixel_values"]
    with torch.no_grad():
        weights = model.model.vision_tower(pixel_values=pixels, output_attentions=True).attentions[-1]  # [B, H, P, P]
        _, signals = Gemma3Adapter(model, VFlowOptViT(), 1.0, None)._encode(pixels)
    side, kernel = 24, 4  # 24 x 24 patches -> 6 x 6 tokens
    tokens = side // kernel
    for b, image in enumerate(signals):
        a = weights[b].float().mean(dim=0).reshape([tokens, kernel] * 4)  # query (row, i, col, j), key (row, i, ...)
        expected = a.sum(dim=(5, 7)).mean(dim=(1, 3)).reshape(tokens * tokens, tokens * tokens)
        torch.testing.assert_close(image[ATTENTION_MAP], expected)
        torch.testing.assert_close(image[ATTENTION_MAP].sum(dim=-1), torch.ones(tokens * tokens))
    assert not torch.equal(signals[0][ATTENTION_MAP], signals[1][ATTENTION_MAP])


def test_recycled_tokens_are_projected_as_the_projector_projects_a_pooled_token():
    """VFlowOpt recycles cells in the vision space (the last layer's post-layernorm output, pooled: what the
    projector averages); the adapter's projection of a pooled grid token is the model's own feature for it."""
    from tokenprune.methods import VISION_HIDDEN
    from tokenprune.methods.vflowopt import VFlowOptViT
    from tokenprune.patches.gemma3 import Gemma3Adapter

    model, processor = built(_MODELS, "sdpa", lambda: tiny_gemma3("sdpa"))
    pixels = gemma3_inputs(processor, [PROMPT], [random_image(60, 80, seed=1)])["pixel_values"]
    adapter = Gemma3Adapter(model, VFlowOptViT(), 1.0, None)
    with torch.no_grad():
        features, signals = adapter._encode(pixels)
    projected = adapter._project(signals[0][VISION_HIDDEN], like=features[0])
    torch.testing.assert_close(projected, features[0], rtol=1e-5, atol=1e-5)
