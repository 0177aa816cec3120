"""The quantized method matrix of tests/test_quantized.py on LLaVA-OneVision, InternVL3 and Gemma 3: real-depth tiny
models (``tokenprune.real_depth``: SigLIP / InternViT towers and LLMs as deep as LLaVA-OneVision-7B, InternVL3-8B and
Gemma-3-12B) saved with ``save_pretrained`` and reloaded in bitsandbytes 4-bit, 8-bit, torch's dynamic int8 and
torchao's int8 weight-only, each model built once per module.

Cases (kept small for the CI budget): bnb 4-bit every method on every family (each family another 4-bit variant:
LLaVA-OneVision nf4, InternVL3 fp4 + double quantization, Gemma 3 fp4); bnb 8-bit, dynamic int8 and torchao int8
weight-only every method once, spread over the nine (setting, family) pairs. ``TOKENPRUNE_FULL_QUANT_MATRIX=1`` runs
the full product. A method that declines a family at full precision must decline it quantized with the same message.
"""


import pytest
import test_quantized as matrix

FAMILIES = ("llava_onevision", "internvl", "gemma3")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


saved, quantized = matrix.matrix_fixtures(FAMILIES)  # tests/test_quantized.py


@pytest.mark.parametrize(("quantized", "method"), matrix.cases(FAMILIES, spread=True), indirect=["quantized"])
def test_method_on_the_quantized_model_of_a_new_family(quantized, saved, method):
    """keep=1.0 identical to the quantized model; keep=0.25 generates, returns the prompt and shortens every
    pruned layer's cache; disable_pruning leaves nothing (tests/test_quantized.py)."""
    matrix.check_method_on_quantized(quantized, saved, method)
