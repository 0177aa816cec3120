"""The one-line API: ``enable_pruning``, ``disable_pruning``, ``pruning`` and ``list_methods``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from tokenprune.budget import Keep, validate_budget, validate_scope
from tokenprune.config import PruningConfig
from tokenprune.methods import METHODS, PruningMethod, TwoStageMethod, make_method, split_stages
from tokenprune.record import PruneRecord

_HANDLE_ATTR = "_tokenprune_handle"


class PruningHandle:
    """What ``enable_pruning`` returns: the active config, the method (a tuple of methods for a stage list) and the
    record of the last pruned prefill."""

    def __init__(
        self, model: torch.nn.Module, config: PruningConfig, method: PruningMethod | tuple[PruningMethod, ...]
    ):
        self.model = model
        self.config = config
        self.method = method
        self.last: PruneRecord | None = None
        self._adapter: Any = None

    def _record(self, record: PruneRecord) -> None:
        self.last = record

    @property
    def active(self) -> bool:
        return getattr(self.model, _HANDLE_ATTR, None) is self

    def remove(self) -> None:
        """Same as ``disable_pruning(model)`` (if this handle is still the active one)."""
        if self.active:
            disable_pruning(self.model)

    def describe(self) -> str:
        methods = self.method if isinstance(self.method, tuple) else (self.method,)
        return " -> ".join(m.describe() for m in methods)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruningHandle({self.describe()}, {self.config.budget}, {state})"


def _adapter_class(model: torch.nn.Module) -> type:
    from tokenprune.patches import ADAPTERS  # late import: the adapters import the core, not the other way round

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"tokenprune does not support model_type {model_type!r} ({type(model).__name__}); supported model types: "
            f"{', '.join(sorted(ADAPTERS))}. Load the model with its *ForConditionalGeneration class."
        )
    return ADAPTERS[model_type]


def enable_pruning(
    model: torch.nn.Module,
    method: str | PruningMethod | PruningConfig | list | tuple,
    keep: Keep | list | tuple | None = None,
    *,
    scope: str | None = None,
    flops: float | None = None,
    **options: Any,
) -> PruningHandle:
    """Prune the visual tokens of every later ``model.generate``/``model(...)`` call with images.

    ``method`` is a name from :func:`list_methods`, a method instance, a :class:`PruningConfig`, or a list of
    stages applied in order: a vision-stage method then a decoder-stage method (``["divprune", "fastv"]``; set
    hyper-parameters on instances, ``[DivPrune(), FastV(k=3)]``). ``keep`` a ratio in (0, 1] or an int token count
    per budget unit, in each method's paper convention (decoder methods: see their docstrings); for a stage list
    one ``keep`` per stage or a single one for all. Instead of ``keep``, ``flops`` a fraction in (0, 1] of the
    unpruned LLM prefill FLOPs (counts solved per prompt; ``handle.last`` reports the estimate). ``scope`` what one
    budget covers (``None``: the method's paper convention; ``"image"``; ``"crop"``: per LLaVA-NeXT crop and per
    video frame); ``options`` the method's hyper-parameters. Calling it again on the same model replaces the
    previous pruning (with a warning). Returns a :class:`PruningHandle`.
    """
    if isinstance(method, PruningConfig):
        if keep is not None or flops is not None or options or scope is not None:
            raise TypeError("pass either a PruningConfig or method/keep/flops/scope/options, not both")
        config = method
        instance = config.build_method()
    elif isinstance(method, (list, tuple)):
        if keep is None:
            raise TypeError("enable_pruning needs keep=: one budget per stage (keep=[0.5, 0.5]) or one for all")
        if options:
            raise TypeError(
                f"hyper-parameters {sorted(options)} are ambiguous with a list of methods; set them on the instances, "
                f"e.g. [DivPrune(), FastV(k=3)]"
            )
        validate_scope(scope)
        instance = tuple(make_method(m) for m in method)
        config = PruningConfig.from_method(instance, tuple(keep) if isinstance(keep, (list, tuple)) else keep, scope)
    else:
        if keep is None and flops is None:
            raise TypeError(
                "enable_pruning needs keep= (a ratio in (0, 1] such as keep=0.11, or a token count such as keep=64) "
                "or flops= (a fraction of the unpruned LLM prefill FLOPs, such as flops=0.25)"
            )
        validate_budget(keep, flops)
        validate_scope(scope)
        instance = make_method(method, **options)
        config = PruningConfig.from_method(instance, keep, scope, flops)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"enable_pruning expects a transformers model (torch.nn.Module); got {type(model).__name__}")
    adapter_cls = _adapter_class(model)

    previous = getattr(model, _HANDLE_ATTR, None)
    handle = PruningHandle(model, config, instance)
    # the adapter validates method vs model before touching anything
    vision, decoder = split_stages(instance if isinstance(instance, tuple) else (instance,))
    if isinstance(instance, TwoStageMethod):
        vision_keep, decoder_keep = instance.stage_keeps(config.keep)
    else:
        keeps = {name: k for name, k, _ in config.stages}
        vision_keep = keeps[vision.name] if vision else config.stages[0][1]
        decoder_keep = keeps[decoder.name] if decoder else None
    adapter = adapter_cls(
        model, vision, vision_keep, handle, scope=config.scope, decoder=decoder, decoder_keep=decoder_keep
    )
    if previous is not None:
        warnings.warn(
            f"pruning was already enabled on this model ({previous.describe()}, {previous.config.budget});"
            f" replacing it with {handle.describe()}, {config.budget}",
            UserWarning,
            stacklevel=2,
        )
        disable_pruning(model)
    handle._adapter = adapter
    _activate(handle)
    return handle


def _activate(handle: PruningHandle) -> None:
    handle._adapter.install()
    setattr(handle.model, _HANDLE_ATTR, handle)


def disable_pruning(model: torch.nn.Module) -> bool:
    """Remove everything ``enable_pruning`` installed. Returns False if pruning was not enabled."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        return False
    handle._adapter.uninstall()
    del model.__dict__[_HANDLE_ATTR]
    return True


def get_handle(model: torch.nn.Module) -> PruningHandle | None:
    """The active handle of ``model``, or None."""
    return model.__dict__.get(_HANDLE_ATTR)


@contextlib.contextmanager
def pruning(
    model: torch.nn.Module,
    method: str | PruningMethod | PruningConfig | list | tuple,
    keep: Keep | list | tuple | None = None,
    *,
    scope: str | None = None,
    flops: float | None = None,
    **options: Any,
) -> Iterator[PruningHandle]:
    """Context manager: pruning inside the block; on exit the model is restored (including an earlier pruning)."""
    previous = get_handle(model)
    if previous is not None:
        disable_pruning(model)
    handle = enable_pruning(model, method, keep, scope=scope, flops=flops, **options)
    try:
        yield handle
    finally:
        disable_pruning(model)
        if previous is not None:
            _activate(previous)


def list_methods() -> dict[str, str]:
    """Registered methods: name -> paper."""
    return {name: METHODS[name].paper for name in sorted(METHODS)}
