"""The quantized method matrix of tests/test_quantized.py on Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE:
real-depth tiny models (``tokenprune.real_depth``: 27 ViT blocks, DeepStack blocks 8/16/24, LLMs of 36/48/32/40
layers) saved with ``save_pretrained`` and reloaded in bitsandbytes 4-bit, 8-bit, torch's dynamic int8 and torchao's
int8 weight-only, each model built once per module.

Cases (kept small for the CI budget): bnb 4-bit every method on every family (each family another 4-bit variant:
nf4, fp4 + double quantization, fp4, nf4 + double quantization); bnb 8-bit, dynamic int8 and torchao int8
weight-only every method once, spread over the twelve (setting, family) pairs. ``TOKENPRUNE_FULL_QUANT_MATRIX=1``
runs the full product. A method that declines a family
at full precision (the [CLS]-based ones; decoder-stage methods on Qwen3.5's hybrid LLM) must decline it quantized
with the same message. The MoE experts are fused 3-D parameters, not ``nn.Linear``: they stay in full precision in
every setting (as transformers loads them), the attention, dense MLP, projector and vision tower are quantized.
"""


import pytest
import test_quantized as matrix

from tokenprune.tiny_qwen3 import QWEN3_FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


saved, quantized = matrix.matrix_fixtures(QWEN3_FAMILIES)  # tests/test_quantized.py


@pytest.mark.parametrize(("quantized", "method"), matrix.cases(QWEN3_FAMILIES, spread=True), indirect=["quantized"])
def test_method_on_the_quantized_qwen3_model(quantized, saved, method):
    """keep=1.0 identical to the quantized model; keep=0.25 generates, returns the prompt and shortens every
    pruned layer's cache; disable_pruning leaves nothing (tests/test_quantized.py)."""
    matrix.check_method_on_quantized(quantized, saved, method)
