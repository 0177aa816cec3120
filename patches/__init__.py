"""Model-family adapters, keyed by ``model.config.model_type``.

This folder IS the package ``tokenprune.patches``: pyproject.toml maps it there (setuptools ``package-dir``), so its
modules are imported as ``tokenprune.patches.<module>`` (first-party, like the rest of ``tokenprune``), never as
``patches``. It sits at the top of the repository because the layout promised to users keeps the model-specific
wiring apart from the model-agnostic core (``tokenprune/``): the adapters import the core, and the core looks up
:data:`ADAPTERS` only when a model is pruned (``tokenprune.api``) or the docs tables are generated.
"""

from __future__ import annotations

from tokenprune.patches.base import VisionStageAdapter
from tokenprune.patches.llava import LlavaAdapter
from tokenprune.patches.llava_next import LlavaNextAdapter
from tokenprune.patches.llava_onevision import LlavaOnevisionAdapter
from tokenprune.patches.qwen2_vl import QwenVLAdapter
from tokenprune.patches.qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[VisionStageAdapter]] = {
    t: cls for cls in (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter, Qwen3VLAdapter) for t in cls.model_types
}
ADAPTERS["llava_onevision"] = LlavaOnevisionAdapter

__all__ = ["ADAPTERS", "LlavaAdapter", "LlavaNextAdapter", "Qwen3VLAdapter", "QwenVLAdapter", "VisionStageAdapter"]
__all__ += ["LlavaOnevisionAdapter"]
