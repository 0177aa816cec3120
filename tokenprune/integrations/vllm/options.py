"""The user's pruning options for vLLM (``hf_overrides={"tokenprune": {...}}``), parsed and checked up front.

No vLLM import here: the processor (API/engine process) and the model (every worker) parse the same dict from
``hf_config.tokenprune`` and must agree on the kept count, which :func:`kept_count` decides from the image size alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenprune.budget import Keep, kept_count, validate_keep
from tokenprune.methods import CLS_ATTENTION, FEATURES, METHODS, PruningMethod, make_method

# The attribute of ``hf_config`` that carries the options (set through ``hf_overrides``).
CONFIG_KEY = "tokenprune"

# Signals the vLLM models compute (see llava.py / qwen.py). Everything else (text embeddings, attention maps,
# keys, hidden states) would need the prompt or more of the tower than vLLM's encoder path exposes.
SIGNALS_WITH_CLS = frozenset({FEATURES, CLS_ATTENTION})   # LLaVA-1.5 (CLIP tower)
SIGNALS_WITHOUT_CLS = frozenset({FEATURES})               # Qwen2-VL / Qwen2.5-VL


@dataclass(frozen=True)
class VllmPruning:
    """One vision-stage method and its per-image budget ``keep`` (ratio in (0, 1] or token count)."""

    method: PruningMethod
    keep: Keep

    def kept(self, n: int) -> int:
        """Kept tokens of an image with ``n`` visual tokens (the same rule as ``enable_pruning``)."""
        return kept_count(self.keep, n)

    @property
    def keeps_all(self) -> bool:
        """``keep=1.0``: nothing is pruned, the stock vLLM code path runs unchanged."""
        return isinstance(self.keep, float) and self.keep == 1.0


def supported_methods(cls_token: bool) -> list[str]:
    """Names of the registered methods that :func:`parse_options` accepts on a tower with/without [CLS]."""
    names = []
    for name in sorted(METHODS):
        try:
            method = make_method(name)
        except (TypeError, ValueError):  # a method without defaults for its hyper-parameters
            continue
        if _why_not(method, cls_token) is None:
            names.append(name)
    return names


def _why_not(method: PruningMethod, cls_token: bool) -> str | None:
    """Why ``method`` cannot run inside vLLM on this tower, or ``None`` if it can."""
    if method.stage != "vision":
        return (
            f"method {method.name!r} runs at the {method.stage!r} stage; the vLLM plugin runs vision-stage methods "
            f"only (pruning after the projector, before the LLM)"
        )
    if not method.fixed_budget:
        return (
            f"method {method.name!r} decides its kept count from the image content, but vLLM needs each image's "
            f"placeholder count when the prompt is processed, before the vision tower runs; use a method with a "
            f"fixed budget"
        )
    try:
        names = {request.name for request in method.requests(cls_token)}
    except (ValueError, NotImplementedError) as error:  # e.g. FasterVLM on a tower without [CLS]
        return str(error)
    supported = SIGNALS_WITH_CLS if cls_token else SIGNALS_WITHOUT_CLS
    missing = sorted(names - supported)
    if missing:
        return (
            f"method {method.name!r} needs the signal(s) {missing}, which the vLLM plugin does not compute on this "
            f"model (it computes {sorted(supported)})"
        )
    return None


def check_method(method: PruningMethod, cls_token: bool) -> None:
    """Raise a ``ValueError`` (listing the methods that do run) unless ``method`` can run inside vLLM here."""
    reason = _why_not(method, cls_token)
    if reason is not None:
        raise ValueError(f"{reason}; methods the vLLM plugin runs on this model: {supported_methods(cls_token)}")


def parse_options(raw: Any, cls_token: bool) -> VllmPruning | None:
    """``hf_config.tokenprune`` -> :class:`VllmPruning` (``None`` when absent): ``{"method": name, "keep": ...,
    **hyper_parameters}`` as in ``enable_pruning(model, method=..., keep=..., **options)``."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise TypeError(
            f"hf_overrides[{CONFIG_KEY!r}] must be a dict such as {{'method': 'divprune', 'keep': 64}}; "
            f"got {type(raw).__name__}"
        )
    options = dict(raw)
    if "method" not in options or "keep" not in options:
        raise ValueError(
            f"hf_overrides[{CONFIG_KEY!r}] needs 'method' and 'keep', e.g. {{'method': 'divprune', 'keep': 64}}; "
            f"got keys {sorted(options)}"
        )
    name, keep = options.pop("method"), options.pop("keep")
    if isinstance(name, (list, tuple)):
        raise ValueError("the vLLM plugin runs one vision-stage method; got a method list " f"{list(name)}")
    validate_keep(keep)
    method = make_method(name, **options)
    check_method(method, cls_token)
    return VllmPruning(method=method, keep=keep)
