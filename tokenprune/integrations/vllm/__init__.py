"""vLLM serving with visual-token pruning: the ``vllm.general_plugins`` entry point and the user-facing names.

``register()`` adds new architecture names (the stock ones stay untouched) and one runner fix; the model and
processor classes live in :mod:`.llava` and :mod:`.qwen`, imported lazily by vLLM. Select a pruned model per engine::

    LLM(model=path, hf_overrides={"architectures": ["TokenpruneLlavaForConditionalGeneration"],
                                  "tokenprune": {"method": "divprune", "keep": 64}})

or ``hf_overrides=vllm_overrides("llava", "divprune", keep=64)``. Guide: docs/vllm.md.
"""

from __future__ import annotations

from typing import Any

from tokenprune.budget import Keep

# model_type -> (stock vLLM architecture, tokenprune architecture, "module:Class")
ARCHITECTURES = {
    "llava": ("LlavaForConditionalGeneration", "TokenpruneLlavaForConditionalGeneration",
              "tokenprune.integrations.vllm.llava:TokenpruneLlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextForConditionalGeneration", "TokenpruneLlavaNextForConditionalGeneration",
                   "tokenprune.integrations.vllm.llava_next:TokenpruneLlavaNextForConditionalGeneration"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "TokenpruneQwen2VLForConditionalGeneration",
                 "tokenprune.integrations.vllm.qwen:TokenpruneQwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "TokenpruneQwen2_5_VLForConditionalGeneration",
                   "tokenprune.integrations.vllm.qwen:TokenpruneQwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "TokenpruneQwen3VLForConditionalGeneration",
                 "tokenprune.integrations.vllm.qwen3:TokenpruneQwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "TokenpruneQwen3VLMoeForConditionalGeneration",
                     "tokenprune.integrations.vllm.qwen3:TokenpruneQwen3VLMoeForConditionalGeneration"),
}
ARCHITECTURES["gemma3"] = ("Gemma3ForConditionalGeneration", "TokenpruneGemma3ForConditionalGeneration",
                           "tokenprune.integrations.vllm.gemma3:TokenpruneGemma3ForConditionalGeneration")
ARCHITECTURES["internvl"] = ("InternVLForConditionalGeneration", "TokenpruneInternVLForConditionalGeneration",
                             "tokenprune.integrations.vllm.internvl:TokenpruneInternVLForConditionalGeneration")
ARCHITECTURES["qwen3_5"] = ("Qwen3_5ForConditionalGeneration", "TokenpruneQwen3_5ForConditionalGeneration",
                            "tokenprune.integrations.vllm.qwen3_5:TokenpruneQwen3_5ForConditionalGeneration")
ARCHITECTURES["qwen3_5_moe"] = ("Qwen3_5MoeForConditionalGeneration", "TokenpruneQwen3_5MoeForConditionalGeneration",
                                "tokenprune.integrations.vllm.qwen3_5:TokenpruneQwen3_5MoeForConditionalGeneration")
ARCHITECTURES["llava_onevision"] = (
    "LlavaOnevisionForConditionalGeneration", "TokenpruneLlavaOnevisionForConditionalGeneration",
    "tokenprune.integrations.vllm.onevision:TokenpruneLlavaOnevisionForConditionalGeneration")


def vllm_overrides(model_type: str, method: str, keep: Keep, **options: Any) -> dict[str, Any]:
    """The ``hf_overrides`` dict that serves a ``model_type`` checkpoint with ``method`` at budget ``keep`` (per
    image; a ratio in (0, 1] or a token count) and the method's hyper-parameters ``options``."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}")
    return {"architectures": [ARCHITECTURES[model_type][1]],
            "tokenprune": {"method": method, "keep": keep, **options}}


def register() -> None:
    """The ``vllm.general_plugins`` entry point (run once in every vLLM process)."""
    from vllm import ModelRegistry

    from tokenprune.integrations.vllm.runner import patch_model_runners

    supported = set(ModelRegistry.get_supported_archs())
    for _, arch, target in ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    patch_model_runners()


__all__ = ["ARCHITECTURES", "register", "vllm_overrides"]
