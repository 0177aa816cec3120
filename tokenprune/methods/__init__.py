"""Pruning methods: small dataclasses over :mod:`tokenprune.functional`, looked up by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from tokenprune.methods.base import (
    ATTENTION_MAP,
    ATTENTION_RECEIVED,
    CLS_ATTENTION,
    CLS_ATTENTION_WIDE,
    CLS_HIDDEN,
    CLS_SIGNALS,
    FEATURES,
    SIGNALS,
    TEXT_EMBEDDINGS,
    VISION_HIDDEN,
    VISION_KEYS,
    PruningMethod,
    Selection,
    SelectionContext,
    SignalRequest,
)
from tokenprune.methods.baselines import RandomPrune, UniformPrune
from tokenprune.methods.cdpruner import CDPruner
from tokenprune.methods.divprune import DivPrune
from tokenprune.methods.fastervlm import FasterVLM
from tokenprune.methods.flowcut import FlowCut
from tokenprune.methods.fopru import FoPru
from tokenprune.methods.hiprune import HiPrune
from tokenprune.methods.holov import HoloV
from tokenprune.methods.kcenter import KCenter
from tokenprune.methods.mmtok import MMTok
from tokenprune.methods.recoverable import Recoverable
from tokenprune.methods.visionzip import VisionDrop, VisionZip

METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls
    for cls in (
        CDPruner, DivPrune, FasterVLM, FlowCut, FoPru, HiPrune, HoloV, KCenter, MMTok, RandomPrune, Recoverable,
        UniformPrune, VisionDrop, VisionZip,
    )
}


def make_method(method: str | PruningMethod, **options: Any) -> PruningMethod:
    """A method instance from a name plus hyper-parameters (or an instance, returned as is)."""
    if isinstance(method, PruningMethod):
        if options:
            raise TypeError(
                f"hyper-parameters {sorted(options)} were given together with a method instance; set them on the "
                f"instance instead, e.g. {type(method).__name__}(...)"
            )
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name or a PruningMethod instance; got {type(method).__name__}")
    key = method.lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields)) or "none"
        raise TypeError(f"{cls.name} got unknown option(s) {unknown}; its options are: {allowed}")
    return cls(**options)


__all__ = [
    "ATTENTION_MAP", "ATTENTION_RECEIVED", "CLS_ATTENTION", "CLS_ATTENTION_WIDE", "CLS_HIDDEN", "CLS_SIGNALS",
    "FEATURES", "METHODS", "SIGNALS", "TEXT_EMBEDDINGS", "VISION_HIDDEN", "VISION_KEYS", "CDPruner", "DivPrune",
    "FasterVLM", "FlowCut", "FoPru", "HiPrune", "HoloV", "KCenter", "MMTok", "PruningMethod", "RandomPrune",
    "Recoverable", "Selection", "SelectionContext", "SignalRequest", "UniformPrune", "VisionDrop", "VisionZip",
    "make_method",
]
