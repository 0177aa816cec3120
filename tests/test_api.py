"""The public API: enable/disable/pruning, reversibility, double enable, clear errors."""

import warnings

import pytest
import torch
from conftest import TINY_OPTIONS, hook_and_attribute_census, runnable_methods

from tokenprune import PruningConfig, disable_pruning, enable_pruning, get_handle, pruning
from tokenprune.methods import METHODS, DivPrune
from tokenprune.tiny_models import tiny_llava


def test_disable_restores_outputs_and_leaves_nothing_behind(llava, one_prompt):
    model, _ = llava
    with torch.no_grad():
        ref = model(**one_prompt).logits  # first, so transformers' own lazy state is in `before`
    before = hook_and_attribute_census(model)
    for method in runnable_methods():
        handle = enable_pruning(model, method, keep=0.2, **TINY_OPTIONS.get(method, {}))
        with torch.no_grad():
            pruned = model(**one_prompt).logits
            model.generate(**one_prompt, max_new_tokens=2)
        assert pruned.shape[1] < ref.shape[1]
        assert disable_pruning(model) is True
        assert not handle.active and get_handle(model) is None
        assert hook_and_attribute_census(model) == before
        assert model.forward.__func__ is type(model).forward
        with torch.no_grad():
            assert torch.equal(model(**one_prompt).logits, ref)
    assert disable_pruning(model) is False


def test_second_enable_replaces_the_first_with_a_warning(llava, one_prompt):
    model, _ = llava
    with torch.no_grad():
        model(**one_prompt)
    before = hook_and_attribute_census(model)
    first = enable_pruning(model, "fastervlm", keep=0.5)
    with pytest.warns(UserWarning, match=r"already enabled.*fastervlm.*replacing it with divprune"):
        second = enable_pruning(model, "divprune", keep=8)
    assert not first.active and second.active
    with torch.no_grad():
        model(**one_prompt)
    assert first.last is None and second.last.images[0].n_kept == 8
    disable_pruning(model)
    assert hook_and_attribute_census(model) == before


def test_context_manager_restores_the_previous_state(llava, one_prompt):
    model, _ = llava
    outer = enable_pruning(model, "uniform", keep=4)
    with pruning(model, "divprune", keep=0.5) as inner:
        with torch.no_grad():
            model(**one_prompt)
        assert inner.last.images[0].n_kept == 32
    assert outer.active and not inner.active
    with torch.no_grad():
        model(**one_prompt)
    assert outer.last.images[0].n_kept == 4
    disable_pruning(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pruning(model, "random", keep=0.5):
            pass
    assert get_handle(model) is None


def test_method_instance_and_config_are_accepted(llava, one_prompt):
    model, _ = llava
    handle = enable_pruning(model, DivPrune(), keep=5)
    assert handle.config == PruningConfig("divprune", 5)
    disable_pruning(model)
    handle = enable_pruning(model, PruningConfig.from_json('{"method": "random", "keep": 0.5, "options": {"seed": 2}}'))
    assert handle.method.seed == 2 and handle.config.keep == 0.5


def test_unknown_method_lists_the_known_ones(llava):
    model, _ = llava
    known = "known methods: " + ", ".join(sorted(METHODS))
    with pytest.raises(ValueError, match=f"unknown method 'fastv9'; {known}"):
        enable_pruning(model, "fastv9", keep=0.5)


@pytest.mark.parametrize("keep, exc, match", [
    (0.0, ValueError, r"ratio and must lie in \(0, 1\]"), (1.2, ValueError, r"\(0, 1\]"),
    (64.0, ValueError, "pass the int keep=64"), (-5, ValueError, ">= 1"), ("0.5", TypeError, "float ratio"),
    (None, TypeError, "needs keep="),
])
def test_bad_keep_is_rejected_before_touching_the_model(llava, keep, exc, match):
    model, _ = llava
    before = hook_and_attribute_census(model)
    with pytest.raises(exc, match=match):
        enable_pruning(model, "divprune", keep=keep)
    assert hook_and_attribute_census(model) == before


def test_unknown_option_is_rejected(llava):
    model, _ = llava
    with pytest.raises(TypeError, match=r"random got unknown option\(s\) \['sed'\]; its options are: seed"):
        enable_pruning(model, "random", keep=0.5, sed=1)


def test_unsupported_model_type_lists_the_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(ValueError, match="model_type 'llama'.*supported model types: .*llava, llava_next"):
        enable_pruning(model, "divprune", keep=0.5)
    with pytest.raises(TypeError, match="expects a transformers model"):
        enable_pruning(object(), "divprune", keep=0.5)


def test_fastervlm_needs_a_cls_token():
    """A LLaVA with a SigLIP tower (no [CLS]): FasterVLM refuses, DivPrune works."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2),
        image_token_index=5, vision_feature_select_strategy="full",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with pytest.raises(ValueError, match=r"has no \[CLS\] token.*'divprune'"):
        enable_pruning(model, "fastervlm", keep=0.5)
    enable_pruning(model, "divprune", keep=4)
    ids = torch.tensor([[1, 2] + [5] * 16 + [3]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert out.logits.shape[1] == 2 + 4 + 1


def test_mismatched_placeholders_are_explained(llava, one_prompt):
    model, _ = llava
    enable_pruning(model, "divprune", keep=0.5)
    ids = one_prompt["input_ids"][:, 5:]
    with pytest.raises(ValueError, match="image placeholder tokens but the 1 image"):
        model(input_ids=ids, pixel_values=one_prompt["pixel_values"])


def test_tiny_models_are_real_transformers_classes():
    from transformers import LlavaForConditionalGeneration

    model, processor = tiny_llava()
    assert type(model) is LlavaForConditionalGeneration and model.config.model_type == "llava"


def test_a_missing_vision_layer_fails_at_enable_time():
    """HiPrune's official object layer (9th) does not exist in a 3-layer tower: refused before touching the model."""
    from tokenprune.tiny_models import tiny_qwen

    for model in (tiny_llava()[0], tiny_qwen()[0]):
        with pytest.raises(ValueError, match="vision layer"):
            enable_pruning(model, "hiprune", keep=0.5)
        assert "forward" not in model.__dict__
