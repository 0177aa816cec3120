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
    PAIRED_TEXT,
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
from tokenprune.methods.catp import CATP
from tokenprune.methods.cdpruner import CDPruner
from tokenprune.methods.corematching import CoreMatching
from tokenprune.methods.dart import DART
from tokenprune.methods.decoder_base import DecoderMethod, Recycled, RowSignals, StagePlan
from tokenprune.methods.divprune import DivPrune
from tokenprune.methods.fastervlm import FasterVLM
from tokenprune.methods.fastv import FastV
from tokenprune.methods.feather import FEATHER
from tokenprune.methods.flowcut import FlowCut
from tokenprune.methods.fopru import FoPru
from tokenprune.methods.hiprune import HiPrune
from tokenprune.methods.holitom import HoliTom, HoliTomMerge, HoliTomOuter
from tokenprune.methods.holov import HoloV
from tokenprune.methods.kcenter import KCenter
from tokenprune.methods.mmtok import MMTok
from tokenprune.methods.pdrop import PyramidDrop
from tokenprune.methods.recoverable import Recoverable
from tokenprune.methods.sparsevlm import AdaptInfer, SparseVLM
from tokenprune.methods.todre import ToDRE
from tokenprune.methods.transprune import TransPrune
from tokenprune.methods.two_stage import TwoStageMethod
from tokenprune.methods.vflowopt import VFlowOpt
from tokenprune.methods.visiondrop import VisionDropFull, VisionDropLLM
from tokenprune.methods.visionzip import VisionDrop, VisionZip

METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls
    for cls in (
        AdaptInfer, CDPruner, DivPrune, FasterVLM, FastV, FlowCut, FoPru, HiPrune, HoloV, KCenter, MMTok, PyramidDrop,
        RandomPrune, Recoverable, SparseVLM, UniformPrune, VFlowOpt, VisionDrop,
        VisionDropFull, VisionDropLLM, VisionZip,
        DART, FEATHER, ToDRE, TransPrune,
        CoreMatching,
        HoliTom, HoliTomOuter,
        CATP,
    )
}


def split_stages(methods: tuple[PruningMethod, ...]) -> tuple[PruningMethod | None, PruningMethod | None]:
    """``(vision, decoder)`` of a stage list: at most one of each, the vision stage first. A single
    :class:`TwoStageMethod` (e.g. ToDRE) is its own two stages."""
    if len(methods) == 1 and isinstance(methods[0], TwoStageMethod):
        return methods[0].stages()
    two = [m.name for m in methods if isinstance(m, TwoStageMethod)]
    if two:
        raise ValueError(
            f"{two} already prune(s) both before and inside the LLM (two-stage methods); use it alone, e.g. "
            f"method={two[0]!r}, or list its stages explicitly"
        )
    stages = ["decoder" if m.stage == "decoder" else "vision" for m in methods]  # FlowCut: "vision-encoder"
    if stages not in (["vision"], ["decoder"], ["vision", "decoder"]):
        raise ValueError(
            f"a method list is applied in order and may hold one vision-stage method followed by one decoder-stage "
            f"method (e.g. ['divprune', 'fastv']); got {[f'{m.name} ({m.stage})' for m in methods]}"
        )
    vision = methods[0] if stages[0] == "vision" else None
    decoder = methods[-1] if stages[-1] == "decoder" else None
    return vision, decoder


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
    "AdaptInfer", "Recycled", "SparseVLM", "VFlowOpt", "VisionDropFull", "VisionDropLLM",
    "ATTENTION_MAP", "ATTENTION_RECEIVED", "CLS_ATTENTION", "CLS_ATTENTION_WIDE", "CLS_HIDDEN", "CLS_SIGNALS",
    "FEATURES", "METHODS", "PAIRED_TEXT", "SIGNALS", "TEXT_EMBEDDINGS", "VISION_HIDDEN", "VISION_KEYS", "CDPruner",
    "DecoderMethod",
    "DivPrune", "FastV", "FasterVLM", "FlowCut", "FoPru", "HiPrune", "HoloV", "KCenter", "MMTok", "PruningMethod",
    "PyramidDrop", "RandomPrune", "Recoverable", "RowSignals", "Selection", "SelectionContext", "SignalRequest",
    "StagePlan", "TwoStageMethod", "UniformPrune", "VisionDrop", "VisionZip", "make_method", "split_stages",
    "DART", "FEATHER", "ToDRE", "TransPrune", "CATP",
    "HoliTom", "HoliTomMerge", "HoliTomOuter",
]
