"""Model-family adapters, keyed by ``model.config.model_type``.

This folder IS the package ``tokenprune.patches``: pyproject.toml maps it there (setuptools ``package-dir``), so its
modules are imported as ``tokenprune.patches.<module>`` (first-party, like the rest of ``tokenprune``), never as
``patches``. It sits at the top of the repository because the layout promised to users keeps the model-specific
wiring apart from the model-agnostic core (``tokenprune/``): the adapters import the core, and the core looks up
:data:`ADAPTERS` only when a model is pruned (``tokenprune.api``) or the docs tables are generated.
"""

from __future__ import annotations

from tokenprune.patches.base import VisionStageAdapter
from tokenprune.patches.gemma3 import Gemma3Adapter
from tokenprune.patches.internvl import InternVLAdapter
from tokenprune.patches.llava import LlavaAdapter
from tokenprune.patches.llava_next import LlavaNextAdapter
from tokenprune.patches.llava_onevision import LlavaOnevisionAdapter
from tokenprune.patches.qwen2_vl import QwenVLAdapter
from tokenprune.patches.qwen3_vl import Qwen3VLAdapter

FAMILY_ADAPTERS: tuple[type[VisionStageAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    QwenVLAdapter,
    Qwen3VLAdapter,
    InternVLAdapter,
    Gemma3Adapter,
)
ADAPTERS: dict[str, type[VisionStageAdapter]] = {t: cls for cls in FAMILY_ADAPTERS for t in cls.model_types}

__all__ = [
    "ADAPTERS",
    "FAMILY_ADAPTERS",
    "Gemma3Adapter",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "Qwen3VLAdapter",
    "QwenVLAdapter",
    "VisionStageAdapter",
]
