"""``PruningConfig``: a serialisable description of what ``enable_pruning`` installs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenprune.budget import Keep, validate_keep
from tokenprune.methods import PruningMethod, make_method


@dataclass(frozen=True)
class PruningConfig:
    """Method name, budget and the method's hyper-parameters. Round-trips through a dict and JSON.

    >>> PruningConfig("random", 0.25, {"seed": 3}).to_dict()
    {'method': 'random', 'keep': 0.25, 'options': {'seed': 3}}
    """

    method: str
    keep: Keep
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_keep(self.keep)
        make_method(self.method, **self.options)  # validates the name and the option names/values

    @classmethod
    def from_method(cls, method: PruningMethod, keep: Keep) -> PruningConfig:
        return cls(method.name, keep, method.options())

    def build_method(self) -> PruningMethod:
        return make_method(self.method, **self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "keep": self.keep, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        unknown = sorted(set(data) - {"method", "keep", "options"})
        if unknown:
            raise ValueError(f"unknown PruningConfig key(s) {unknown}; expected 'method', 'keep' and 'options'")
        if "method" not in data or "keep" not in data:
            raise ValueError(f"a PruningConfig needs 'method' and 'keep'; got keys {sorted(data)}")
        return cls(data["method"], data["keep"], dict(data.get("options") or {}))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PruningConfig:
        return cls.from_dict(json.loads(text))
