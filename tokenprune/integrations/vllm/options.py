"""The user's pruning options for vLLM (``hf_overrides={"tokenprune": {...}}``), parsed and checked up front.

No vLLM import here: the processor (API/engine process) and the model (every worker) parse the same dict from
``hf_config.tokenprune`` and must agree on the kept count, which :func:`kept_count` decides from the image size alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenprune.budget import Keep, kept_count, validate_keep, validate_scope
from tokenprune.methods import (
    ATTENTION_MAP,
    ATTENTION_RECEIVED,
    CLS_ATTENTION,
    CLS_HIDDEN,
    FEATURES,
    METHODS,
    TEXT_EMBEDDINGS,
    VISION_HIDDEN,
    VISION_KEYS,
    PruningMethod,
    make_method,
)

# The attribute of ``hf_config`` that carries the options (set through ``hf_overrides``).
CONFIG_KEY = "tokenprune"

# Signals the vLLM models compute (llava.py with clip_signals' probe, qwen_probe.py; text embeddings from the
# prompt text the processor carries to the model, prompt_text.py). Not computed: CLS_ATTENTION_WIDE (only
# Recoverable, whose count is content-adaptive anyway).
SIGNALS_WITH_CLS = frozenset({FEATURES, CLS_ATTENTION, ATTENTION_RECEIVED, ATTENTION_MAP, VISION_HIDDEN, CLS_HIDDEN,
                              VISION_KEYS, TEXT_EMBEDDINGS})   # LLaVA-1.5 (CLIP tower)
SIGNALS_WITHOUT_CLS = frozenset({FEATURES, ATTENTION_RECEIVED, VISION_HIDDEN, TEXT_EMBEDDINGS})  # Qwen2-VL / 2.5-VL
# What a request that passes precomputed image embeddings (``image_embeds``) still has: the projected features (and
# the prompt text); the vision tower does not run.
EMBEDDING_SIGNALS = frozenset({FEATURES, TEXT_EMBEDDINGS})


@dataclass(frozen=True)
class VllmPruning:
    """One vision-stage method, its budget ``keep`` (ratio in (0, 1] or token count) per selection unit, and the
    unit ``scope`` on LLaVA-NeXT (None: the method's paper convention, ``"crop"`` or ``"image"``)."""

    method: PruningMethod
    keep: Keep
    scope: str | None = None

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


# The nearest method the plugin runs, for a refused one: same idea (its vision-stage half, or the same signal read
# before the LLM), first entry that runs on the tower wins.
_NEAREST = {
    "recoverable": ("visionzip", "hiprune"), "flowcut": ("visionzip", "hiprune"),
    "todre": ("kcenter",), "visiondropfull": ("visiondrop",), "visiondropllm": ("visiondrop",),
    "vflowopt": ("fopru", "hiprune"), "vflowoptvit": ("fopru", "hiprune"),
    "fastervlm": ("holov", "hiprune"), "fopru": ("hiprune",), "visionzip": ("hiprune",),
}
_NEAREST_DEFAULT = ("fastervlm", "hiprune")  # decoder-stage attention methods: attention read before the LLM


def nearest_method(name: str, cls_token: bool) -> str:
    """The method the plugin runs that is closest to the refused ``name`` on this tower."""
    runs = supported_methods(cls_token)
    for candidate in _NEAREST.get(name, _NEAREST_DEFAULT) + ("divprune",):
        if candidate in runs:
            return candidate
    return runs[0]


def check_method(method: PruningMethod, cls_token: bool) -> None:
    """Raise a ``ValueError`` (naming the nearest method that runs, and all of them) unless ``method`` can run
    inside vLLM here."""
    reason = _why_not(method, cls_token)
    if reason is not None:
        nearest = nearest_method(method.name, cls_token)
        raise ValueError(
            f"{reason}; the nearest method the vLLM plugin runs on this model is {nearest!r} "
            f"(all: {supported_methods(cls_token)})"
        )


def embedding_methods(cls_token: bool) -> list[str]:
    """The methods the plugin runs on precomputed image embeddings (they select on the projected features)."""
    return [name for name in supported_methods(cls_token)
            if {r.name for r in make_method(name).requests(cls_token)} <= EMBEDDING_SIGNALS]


def check_embeddings(pruning: VllmPruning, cls_token: bool) -> None:
    """Raise a ``ValueError`` unless ``pruning``'s method can select on precomputed image embeddings."""
    needs = sorted({r.name for r in pruning.method.requests(cls_token)} - EMBEDDING_SIGNALS)
    if needs:
        raise ValueError(
            f"this request passes image embeddings (image_embeds) instead of pixels, so the vision tower does not "
            f"run; {pruning.method.name!r} reads {needs} inside it. Send the image's pixels, or serve a method that "
            f"selects on the projected features: {embedding_methods(cls_token)}"
        )


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
    name, keep, scope = options.pop("method"), options.pop("keep"), options.pop("scope", None)
    if isinstance(name, (list, tuple)):
        raise ValueError("the vLLM plugin runs one vision-stage method; got a method list " f"{list(name)}")
    validate_keep(keep)
    validate_scope(scope)
    method = make_method(name, **options)
    check_method(method, cls_token)
    return VllmPruning(method=method, keep=keep, scope=scope)
