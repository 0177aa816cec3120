"""``PruningConfig``: a serialisable description of what ``enable_pruning`` installs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenprune.budget import Keep, validate_keep, validate_scope
from tokenprune.methods import PruningMethod, make_method


@dataclass(frozen=True)
class PruningConfig:
    """Method name, budget, budget scope and the method's hyper-parameters. Round-trips through a dict and JSON.

    ``scope`` says what one budget covers (:data:`tokenprune.budget.SCOPES`): ``None`` follows the method's paper
    (per crop or per image on LLaVA-NeXT; per frame on videos), ``"image"`` one budget per image or video, ``"crop"``
    one per LLaVA-NeXT crop and per video frame.

    >>> PruningConfig("random", 0.25, {"seed": 3}).to_dict()
    {'method': 'random', 'keep': 0.25, 'options': {'seed': 3}}
    """

    method: str
    keep: Keep
    options: dict[str, Any] = field(default_factory=dict)
    scope: str | None = None

    def __post_init__(self) -> None:
        validate_keep(self.keep)
        validate_scope(self.scope)
        make_method(self.method, **self.options)  # validates the name and the option names/values

    @classmethod
    def from_method(cls, method: PruningMethod, keep: Keep, scope: str | None = None) -> PruningConfig:
        return cls(method.name, keep, method.options(), scope)

    def build_method(self) -> PruningMethod:
        return make_method(self.method, **self.options)

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method, "keep": self.keep, "options": dict(self.options)}
        if self.scope is not None:
            data["scope"] = self.scope
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        unknown = sorted(set(data) - {"method", "keep", "options", "scope"})
        if unknown:
            raise ValueError(
                f"unknown PruningConfig key(s) {unknown}; expected 'method', 'keep', 'options' and 'scope'"
            )
        if "method" not in data or "keep" not in data:
            raise ValueError(f"a PruningConfig needs 'method' and 'keep'; got keys {sorted(data)}")
        return cls(data["method"], data["keep"], dict(data.get("options") or {}), data.get("scope"))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PruningConfig:
        return cls.from_dict(json.loads(text))
