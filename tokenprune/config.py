"""``PruningConfig``: a serialisable description of what ``enable_pruning`` installs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenprune.budget import Keep, validate_budget, validate_flops, validate_keep, validate_scope
from tokenprune.methods import PruningMethod, TwoStageMethod, make_method, split_stages


@dataclass(frozen=True)
class PruningConfig:
    """Method name, budget, budget scope and the method's hyper-parameters. Round-trips through a dict and JSON.

    ``scope`` says what one budget covers (:data:`tokenprune.budget.SCOPES`): ``None`` follows the method's paper
    (per crop or per image on LLaVA-NeXT; per frame on videos), ``"image"`` one budget per image or video, ``"crop"``
    one per LLaVA-NeXT crop and per video frame.

    A list of stages (a vision-stage method followed by a decoder-stage method) is a tuple of names with a tuple
    of budgets and a tuple of option dicts (a single ``keep`` applies to every stage):

    The budget is either ``keep`` (a ratio or a token count per image) or ``flops`` (a fraction of the unpruned
    LLM prefill FLOPs, solved per prompt by :func:`tokenprune.budget.flops_kept_counts`), never both.

    >>> PruningConfig("random", 0.25, {"seed": 3}).to_dict()
    {'method': 'random', 'keep': 0.25, 'options': {'seed': 3}}
    >>> PruningConfig(["divprune", "fastv"], 0.5).to_dict()
    {'method': ['divprune', 'fastv'], 'keep': [0.5, 0.5], 'options': [{}, {'k': 2}]}
    >>> PruningConfig("divprune", flops=0.25).to_dict()
    {'method': 'divprune', 'flops': 0.25, 'options': {}}
    """

    method: str | tuple[str, ...]
    keep: Keep | tuple[Keep, ...] | None = None
    options: dict[str, Any] | tuple[dict[str, Any], ...] = field(default_factory=dict)
    scope: str | None = None
    flops: float | None = None

    def __post_init__(self) -> None:
        validate_scope(self.scope)
        if isinstance(self.method, str):
            validate_budget(self.keep, self.flops)
            if self.keep is not None:  # plain numbers (np.int64(64) -> 64): JSON round-trips, equality is exact
                object.__setattr__(self, "keep", validate_keep(self.keep))
            else:
                object.__setattr__(self, "flops", validate_flops(self.flops))
            built = make_method(self.method, **self.options)  # validates the name and the option names/values
            if self.flops is not None and isinstance(built, TwoStageMethod):
                raise ValueError(
                    f"flops= budgets apply to single-stage methods for now; {built.name!r} prunes before and inside "
                    f"the LLM: give it a keep= budget instead"
                )
            return
        if self.flops is not None:
            raise ValueError(
                "flops= budgets apply to a single method for now; give each stage a keep= budget instead"
            )
        names = tuple(self.method)
        keeps = tuple(self.keep) if isinstance(self.keep, (list, tuple)) else (self.keep,) * len(names)
        options = tuple(dict(o) for o in self.options) if isinstance(self.options, (list, tuple)) else (
            ({},) * len(names) if not self.options else None
        )
        if options is None or len(keeps) != len(names) or len(options) != len(names):
            raise ValueError(
                f"a stage list needs one keep (or a single keep for all) and one options dict per stage; got "
                f"method={list(names)}, keep={self.keep!r}, options={self.options!r}"
            )
        keeps = tuple(validate_keep(keep) for keep in keeps)
        built = tuple(make_method(n, **o) for n, o in zip(names, options, strict=True))
        split_stages(built)
        object.__setattr__(self, "method", names)
        object.__setattr__(self, "keep", keeps)
        object.__setattr__(self, "options", tuple(m.options() for m in built))

    @property
    def stages(self) -> tuple[tuple[str, Keep, dict[str, Any]], ...]:
        """``(method, keep, options)`` per stage, in order (one entry for a single method)."""
        if isinstance(self.method, str):
            return ((self.method, self.keep, dict(self.options)),)
        return tuple(zip(self.method, self.keep, self.options, strict=True))

    @classmethod
    def from_method(
        cls, method: PruningMethod | tuple[PruningMethod, ...], keep: Keep | tuple[Keep, ...] | None = None,
        scope: str | None = None, flops: float | None = None,
    ) -> PruningConfig:
        if isinstance(method, tuple):
            return cls(tuple(m.name for m in method), keep, tuple(m.options() for m in method), scope, flops)
        return cls(method.name, keep, method.options(), scope, flops)

    def build_method(self) -> PruningMethod | tuple[PruningMethod, ...]:
        """The method instance, or a tuple of instances for a stage list."""
        if isinstance(self.method, str):
            return make_method(self.method, **self.options)
        return tuple(make_method(n, **o) for n, _, o in self.stages)

    @property
    def budget(self) -> str:
        """``"keep=0.11"`` or ``"flops=0.25"``: the budget as the user wrote it."""
        return f"keep={self.keep!r}" if self.flops is None else f"flops={self.flops!r}"

    def to_dict(self) -> dict[str, Any]:
        budget = {"keep": self.keep} if self.flops is None else {"flops": self.flops}
        if isinstance(self.method, str):
            data = {"method": self.method, **budget, "options": dict(self.options)}
        else:
            data = {"method": list(self.method), "keep": list(self.keep), "options": [dict(o) for o in self.options]}
        if self.scope is not None:
            data["scope"] = self.scope
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        unknown = sorted(set(data) - {"method", "keep", "flops", "options", "scope"})
        if unknown:
            raise ValueError(
                f"unknown PruningConfig key(s) {unknown}; expected 'method', 'keep' or 'flops', 'options' and 'scope'"
            )
        if "method" not in data or ("keep" not in data and "flops" not in data):
            raise ValueError(f"a PruningConfig needs 'method' and 'keep' (or 'flops'); got keys {sorted(data)}")
        method, keep, options = data["method"], data.get("keep"), data.get("options") or {}
        if isinstance(method, list):
            method = tuple(method)
            keep = tuple(keep) if isinstance(keep, list) else keep
            options = tuple(dict(o) for o in options) if isinstance(options, list) else options
        else:
            options = dict(options)
        return cls(method, keep, options, data.get("scope"), data.get("flops"))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PruningConfig:
        return cls.from_dict(json.loads(text))
