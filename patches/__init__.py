"""Model-family adapters, keyed by ``model.config.model_type`` (importable as ``tokenprune.patches``)."""

from __future__ import annotations

from tokenprune.patches.base import VisionStageAdapter
from tokenprune.patches.llava import LlavaAdapter
from tokenprune.patches.llava_next import LlavaNextAdapter
from tokenprune.patches.qwen2_vl import QwenVLAdapter
from tokenprune.patches.qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[VisionStageAdapter]] = {
    t: cls for cls in (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter, Qwen3VLAdapter) for t in cls.model_types
}

__all__ = ["ADAPTERS", "LlavaAdapter", "LlavaNextAdapter", "Qwen3VLAdapter", "QwenVLAdapter", "VisionStageAdapter"]
