"""``PruningConfig``: a serialisable description of what ``enable_pruning`` installs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenprune.budget import Keep, validate_budget
from tokenprune.methods import PruningMethod, make_method


@dataclass(frozen=True)
class PruningConfig:
    """Method name, budget and the method's hyper-parameters. Round-trips through a dict and JSON.

    The budget is either ``keep`` (a ratio or a token count per image) or ``flops`` (a fraction of the unpruned
    LLM prefill FLOPs, solved per prompt by :func:`tokenprune.budget.flops_kept_counts`), never both.

    >>> PruningConfig("random", 0.25, {"seed": 3}).to_dict()
    {'method': 'random', 'keep': 0.25, 'options': {'seed': 3}}
    >>> PruningConfig("divprune", flops=0.25).to_dict()
    {'method': 'divprune', 'flops': 0.25, 'options': {}}
    """

    method: str
    keep: Keep | None = None
    options: dict[str, Any] = field(default_factory=dict)
    flops: float | None = None

    def __post_init__(self) -> None:
        validate_budget(self.keep, self.flops)
        make_method(self.method, **self.options)  # validates the name and the option names/values

    @classmethod
    def from_method(cls, method: PruningMethod, keep: Keep | None = None, flops: float | None = None) -> PruningConfig:
        return cls(method.name, keep, method.options(), flops)

    def build_method(self) -> PruningMethod:
        return make_method(self.method, **self.options)

    @property
    def budget(self) -> str:
        """``"keep=0.11"`` or ``"flops=0.25"``: the budget as the user wrote it."""
        return f"keep={self.keep!r}" if self.flops is None else f"flops={self.flops!r}"

    def to_dict(self) -> dict[str, Any]:
        budget = {"keep": self.keep} if self.flops is None else {"flops": self.flops}
        return {"method": self.method, **budget, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        unknown = sorted(set(data) - {"method", "keep", "flops", "options"})
        if unknown:
            raise ValueError(
                f"unknown PruningConfig key(s) {unknown}; expected 'method', 'keep' or 'flops', and 'options'"
            )
        if "method" not in data or ("keep" not in data and "flops" not in data):
            raise ValueError(f"a PruningConfig needs 'method' and 'keep' (or 'flops'); got keys {sorted(data)}")
        return cls(data["method"], data.get("keep"), dict(data.get("options") or {}), data.get("flops"))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PruningConfig:
        return cls.from_dict(json.loads(text))
