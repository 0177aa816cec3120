"""Integrations with evaluation frameworks. :mod:`tokenprune.integrations.lmms_eval` needs lmms-eval installed."""

from __future__ import annotations

_WRAPPERS = "tokenprune.integrations.lmms_eval"


def lmms_eval_models() -> list:
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` per tokenprune model.

    Kept free of heavy imports: lmms-eval loads entry points while ``lmms_eval.models`` itself is being imported,
    and imports a wrapper class only when its ``--model`` name is asked for.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest("tokenprune_llava_hf", simple_class_path=f"{_WRAPPERS}.TokenpruneLlavaHfSimple",
                      chat_class_path=f"{_WRAPPERS}.TokenpruneLlavaHf"),
        ModelManifest("tokenprune_qwen2_vl", simple_class_path=f"{_WRAPPERS}.TokenpruneQwen2VL"),
        ModelManifest("tokenprune_qwen2_5_vl", simple_class_path=f"{_WRAPPERS}.TokenpruneQwen25VLSimple",
                      chat_class_path=f"{_WRAPPERS}.TokenpruneQwen25VL"),
        ModelManifest("tokenprune_qwen3_vl", simple_class_path=f"{_WRAPPERS}.TokenpruneQwen3VLSimple",
                      chat_class_path=f"{_WRAPPERS}.TokenpruneQwen3VL"),
        ModelManifest("tokenprune_qwen3_5", simple_class_path=f"{_WRAPPERS}.TokenpruneQwen35Simple",
                      chat_class_path=f"{_WRAPPERS}.TokenpruneQwen35"),
        ModelManifest("tokenprune_internvl_hf", chat_class_path=f"{_WRAPPERS}.TokenpruneInternVLHf"),
        ModelManifest("tokenprune_gemma3", simple_class_path=f"{_WRAPPERS}.TokenpruneGemma3"),
    ]
